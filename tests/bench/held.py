#!/usr/bin/python3
"""make bench-held: many slow streamed answers held open at once.

    /usr/bin/python3 tests/bench/held.py [--n 1000,4000]
        [--targets chatfcgi,peer-a,peer-b] [--upstreams plain,tls]
        [--rounds 3] [--no-record]

The shared harness's fake model answers a stream in 5.5 s: the first token
after 0.5 s, then 5 chunks 1 s apart. For each upstream (plain HTTP on
18000, TLS on 18443), each N and each target, N clients open one
keep-alive connection each, all at once (one burst), and each streams
ROUNDS answers back to back (POST /api/chat, "stream": true, read to the
end), so that N streams are held for about ROUNDS x 5.5 s. Per row:

  req/s      answers that ended well / the time from the burst to the last
             byte, beside the ideal N / 5.5 s
  p50, p99   answer time (s), connect to last byte
  errors     non-200 + broken streams + socket errors
  KiB/stream the drop of MemAvailable (/proc/meminfo) from just before the
             burst to its lowest while all N streams were held, / N: the
             whole host's cost of a held stream (client, web server, app,
             fake model)
  pool PSS   the app's processes and descendants (/proc/PID/smaps_rollup),
             read once all N streams were held and past their first token
  cooldown   whether chatfcgi put the provider in cooldown during the run
             (chatfcgi_provider_cooldowns_total); the peers have no metrics

Targets: chatfcgi (N workers, every other setting its default, its local
nginx as deploy/local sizes it: 10,000 streams), peer-a (FastAPI, uvicorn --workers 2) and peer-b (PHP-FPM, N
children, only for N <= HELD_PEER_B_MAX: a child per stream). Prints the
table and appends it to tests/bench/results.md.

Settings: the flags above, or HELD_N, HELD_TARGETS, HELD_UPSTREAMS,
HELD_ROUNDS, HELD_PEER_B_MAX (1000), HELD_PEER_A_WORKERS (2),
HELD_TIMEOUT_S (60, per stream), BENCH_RECORD=0; README.md in this
directory has the rest. Python 3 standard library only.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (REPO, BaseCfg, BenchError, Chatfcgi, SharedHarness,
                      check_ready, die, env_int, env_list, finish_report,
                      git_rev, health_report, host_line, problem,
                      progress, pss_mib, stack_mod)
import stream_client

HERE = Path(__file__).resolve().parent
PYTHON = "/usr/bin/python3"
FIRST_TOKEN_MS, CHUNK_GAP_MS, CHUNKS = 500, 1000, 5
ANSWER_S = (FIRST_TOKEN_MS + CHUNKS * CHUNK_GAP_MS) / 1000.0
CONF = REPO / "conf" / "chatfcgi.conf"
PEER_PORTS = {"peer-a": 18010, "peer-b": 18020}
# Processes that may come and go on a quiet host during a row (cron, a
# shell) before its memory figure is called unreliable.
OTHER_PROCS_MAX = 20


# ------------------------------------------------------------ settings

class Cfg(BaseCfg):
    def __init__(self, args):
        super().__init__()
        self.ns = [int(n) for n in args.n.split(",") if n.strip()]
        self.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        self.upstreams = [u.strip() for u in args.upstreams.split(",")
                          if u.strip()]
        self.rounds = args.rounds
        self.peer_b_max = env_int("HELD_PEER_B_MAX", 1000)
        self.peer_a_workers = env_int("HELD_PEER_A_WORKERS", 2)
        self.timeout_s = env_int("HELD_TIMEOUT_S", 60)
        self.record = self.record and not args.no_record
        self.held_dir = self.out / "held"
        bad = [t for t in self.targets if t not in ("chatfcgi", *PEER_PORTS)]
        bad += [u for u in self.upstreams if u not in ("plain", "tls")]
        if bad or not self.ns or min(self.ns) < 1 or self.rounds < 1:
            die(f"bad settings: {bad or 'N and rounds must be >= 1'}")

    @property
    def ca(self):
        """The harness's CA (lib.sh make_tls, made with the fake model)."""
        return self.run_dir / "tls" / "ca.crt"

    def upstream_url(self, upstream):
        if upstream == "tls":
            return f"https://127.0.0.1:{self.upstream_tls_port}/v1"
        return f"http://127.0.0.1:{self.upstream_port}/v1"


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Flags win over the HELD_* variables; see tests/bench/README.md.")
    ap.add_argument("--n", default=",".join(env_list("HELD_N", "1000,4000")),
                    help="held streams per row, a list (HELD_N)")
    ap.add_argument("--targets", default=",".join(
        env_list("HELD_TARGETS", "chatfcgi,peer-a,peer-b")),
        help="chatfcgi, peer-a, peer-b (HELD_TARGETS)")
    ap.add_argument("--upstreams", default=",".join(
        env_list("HELD_UPSTREAMS", "plain,tls")),
        help="plain, tls (HELD_UPSTREAMS)")
    ap.add_argument("--rounds", type=int, default=env_int("HELD_ROUNDS", 3),
                    help="answers each client streams back to back "
                         "(HELD_ROUNDS)")
    ap.add_argument("--no-record", action="store_true",
                    help="do not append to results.md (BENCH_RECORD=0)")
    return ap.parse_args(argv)


# ------------------------------------------------------------ trust

def conf_error(extra_env):
    """chatfcgi -t with these settings: None, or its complaint."""
    env = dict(os.environ, **extra_env)
    r = subprocess.run([str(REPO / "bin" / "chatfcgi"), "-t", "-c", str(CONF)],
                       env=env, capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr or r.stdout).strip()


def peer_trust(cfg, target):
    """The environment that makes a peer trust the harness's CA: OpenSSL's
    SSL_CERT_FILE for aiohttp; for php-curl, curl.cainfo in an extra ini
    directory (php-fpm's clear_env keeps SSL_CERT_FILE from the children,
    but PHP_INI_SCAN_DIR reaches the master; the leading ':' keeps the
    distribution's own directory)."""
    if target == "peer-a":
        return {"SSL_CERT_FILE": str(cfg.ca)}
    ini = cfg.held_dir / "php-ini"
    ini.mkdir(parents=True, exist_ok=True)
    (ini / "zz-bench-ca.ini").write_text(f"curl.cainfo = {cfg.ca}\n")
    return {"PHP_INI_SCAN_DIR": f":{ini}"}


# ------------------------------------------------------------ targets

class ChatfcgiTarget:
    """chatfcgi with N workers (a prefork worker holds one stream) and
    its defaults otherwise (listen_backlog follows the pool)."""

    def __init__(self, cfg, upstream, n):
        self.n, self.upstream = n, upstream
        env = {"CHATFCGI_UPSTREAM_URL": cfg.upstream_url(upstream),
               "CHATFCGI_NGINX_STREAMS": str(stack_mod.NGINX_STREAMS)}
        if upstream == "tls":
            env["CHATFCGI_UPSTREAM_CA_FILE"] = str(cfg.ca)
        self.chat = Chatfcgi(cfg, f"held-{upstream}-{n}", n, env)
        self.name = f"chatfcgi-w{n}"
        self.url = f"{self.chat.url}/api/chat"
        self.cooldowns0 = 0

    def start(self):
        self.chat.start()
        self.chat.wait_workers(60 + self.n / 20)
        self.cooldowns0 = self.cooldowns()

    def cooldowns(self):
        return sum(self.chat.counters(
            "chatfcgi_provider_cooldowns_total").values())

    def cooldown(self):
        k = self.cooldowns() - self.cooldowns0
        return f"yes ({k})" if k else "no"

    def handshakes(self):
        """The pool's TLS handshakes with the provider, full and resumed
        (None over plain HTTP)."""
        if self.upstream != "tls":
            return None
        by = self.chat.counters("chatfcgi_tls_handshakes_total")
        kind = {k.split('kind="')[1].rstrip('"'): v for k, v in by.items()}
        return f"full {kind.get('full', 0)}, resumed {kind.get('resumed', 0)}"

    def pss(self):
        return pss_mib([self.chat.master_pid()])

    def stop(self):
        return self.chat.stop()


class PeerTarget:
    """peer-a-wW or peer-b-cN of the shared harness, started by its ctl.sh
    with the upstream's URL (and the CA) in the environment lib.sh reads."""

    def __init__(self, cfg, harness, target, upstream, n):
        self.cfg, self.harness = cfg, harness
        self.name = (f"peer-a-w{cfg.peer_a_workers}" if target == "peer-a"
                     else f"peer-b-c{n}")
        self.env = {"UPSTREAM_BASE_URL": cfg.upstream_url(upstream),
                    **(peer_trust(cfg, target) if upstream == "tls" else {})}
        self.url = f"http://127.0.0.1:{PEER_PORTS[target]}/api/chat"

    def start(self):
        progress(f"starting {self.name}")
        self.harness.ctl("start", self.name, extra=self.env)

    def cooldown(self):
        return "-"

    def handshakes(self):
        return None

    def pss(self):
        try:
            pid = int((self.cfg.run_dir / f"{self.name}-app.pid").read_text())
        except (OSError, ValueError):
            return None
        return pss_mib([pid])

    def stop(self):
        self.harness.ctl("stop", self.name)
        return None


# ------------------------------------------------------------ one row

def mem_available_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def host_procs():
    """Processes on the host. The targets fork nothing during a burst, so
    a change means other work came or went, moving MemAvailable too."""
    return sum(1 for e in os.listdir("/proc") if e.isdigit())


def parse_tick(line):
    """@@TICK t=S active=A started=B ended=C -> {"t": S, "active": A, ...}"""
    return {k: float(v) for k, v in
            (kv.split("=", 1) for kv in line.split()[1:])}


def hold(cfg, target, n):
    """The burst: N connections, ROUNDS answers each, in a client process
    of its own (its loop must not wait while this one reads /proc). The
    "before" sample is taken once that process has started, so that its
    interpreter is not counted; then MemAvailable (and the host's process
    count) at each tick with all N streams in progress, and the pool's PSS
    once, at the first such tick past the first token."""
    cmd = [PYTHON, str(HERE / "stream_client.py"), target.url, "--kind",
           "chat", "-n", str(n * cfg.rounds), "-c", str(n), "--timeout",
           str(cfg.timeout_s), "--ticks", "--ready", "--json"]
    progress(f"{target.name}: {n} streams held, {cfg.rounds} rounds "
             f"(about {cfg.rounds * ANSWER_S:.0f} s)")
    # In a session of its own, as clients on other hosts would be: the
    # scheduler then shares the CPU between it and Redis (which runs in
    # this script's session) as groups (autogroup), not task by task.
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
    held, before, pss, res = [], None, None, None  # held: (KiB, procs)
    try:
        for line in p.stdout:
            if line.startswith("@@READY"):
                time.sleep(0.5)
                before = (mem_available_kib(), host_procs())
                p.stdin.write("go\n")
                p.stdin.flush()
            elif line.startswith("@@TICK"):
                tick = parse_tick(line)
                if tick["active"] == n:
                    held.append((mem_available_kib(), host_procs()))
                    if pss is None and tick["t"] >= FIRST_TOKEN_MS / 1000 + 1:
                        pss = target.pss()
            elif line.startswith("{"):
                res = json.loads(line)
    finally:
        if p.poll() is None and res is None:
            p.kill()
        p.wait()
    if res is None:
        die(f"{target.name}: stream_client exited {p.returncode}")
    return res, before, held, pss


def measure(cfg, target, n):
    """Warm up with one answer (it also proves the upstream's TLS is
    trusted), let the host settle, then hold N streams."""
    warm = stream_client.run(target.url, "chat", 1, 1, cfg.timeout_s)
    if warm["ok"] != 1:
        die(f"{target.name}: the warm-up answer failed: "
            f"{'; '.join(warm['first_errors'])}")
    time.sleep(1)
    res, before, held, pss = hold(cfg, target, n)
    rate = res["ok"] / res["elapsed_s"] if res["elapsed_s"] else 0.0
    kib = other = None
    if held and before:
        low = min(held)
        kib = (before[0] - low[0]) / n
        other = max(abs(procs - before[1]) for _, procs in held)
    return {"req_s": rate, "ideal": n / ANSWER_S,
            "p50_s": sec(res["answer_p50_ms"]),
            "p99_s": sec(res["answer_p99_ms"]),
            # A connection whose streams fail fast starts more than
            # ROUNDS of them: rounds past ROUNDS are only those.
            "p99_s_by_round": [sec(ms) for ms in
                               res["answer_p99_ms_by_round"][:cfg.rounds]],
            "errors": f"{res['non200']}+{res['broken']}+{res['sockerr']}",
            "first_errors": res["first_errors"],
            "kib": kib, "other_procs": other,
            "pss": pss, "cooldown": target.cooldown(),
            "handshakes": target.handshakes()}


def sec(ms):
    return None if ms is None else ms / 1000.0


def make_target(cfg, harness, name, upstream, n):
    """The target of a row, or the reason it does not run."""
    if name == "peer-b" and n > cfg.peer_b_max:
        return None, None  # not asked for: no row
    if name != "chatfcgi":
        return PeerTarget(cfg, harness, name, upstream, n), None
    why = conf_error({"CHATFCGI_WORKERS": str(n)})
    if why:
        return None, f"chatfcgi refuses {n} workers: {why}"
    return ChatfcgiTarget(cfg, upstream, n), None


def run_row(cfg, harness, name, upstream, n, healths):
    target, why = make_target(cfg, harness, name, upstream, n)
    if target is None:
        return why and {"target": name, "upstream": upstream, "n": n,
                        "note": f"not run: {why}"}
    row = {"target": target.name, "upstream": upstream, "n": n}
    try:
        target.start()
        row.update(measure(cfg, target, n))
    except BenchError as e:
        problem(f"{target.name} {upstream} N={n}: {e}")
        row["note"] = f"failed: {str(e).splitlines()[0]}"
    finally:
        h = target.stop()
        if h:
            healths.append(h)
    return row


# ------------------------------------------------------------ report

def table(cfg, rows, out):
    out.append(f"## Held streams ({cfg.rounds} answers of {ANSWER_S} s "
               f"per client, back to back)")
    out.append("")
    hdr = (f"{'target':<15} {'upstream':<8} {'N':>6} {'req/s':>8} "
           f"{'ideal':>7} {'%':>4} {'p50_s':>6} {'p99_s':>6} "
           f"{'errors':>11} {'KiB/stream':>10} {'pool_PSS_MiB':>12} "
           f"{'cooldown':>8}")
    out.append(hdr)
    out.append("-" * len(hdr))
    for r in rows:
        if "req_s" not in r:
            out.append(f"{r['target']:<15} {r['upstream']:<8} {r['n']:>6}  "
                       f"{r['note']}")
            continue
        out.append(f"{r['target']:<15} {r['upstream']:<8} {r['n']:>6} "
                   f"{r['req_s']:>8.1f} {r['ideal']:>7.1f} "
                   f"{100 * r['req_s'] / r['ideal']:>4.0f} "
                   f"{num(r['p50_s'], 2):>6} {num(r['p99_s'], 2):>6} "
                   f"{r['errors']:>11} {num(r['kib'], 1):>10} "
                   f"{num(r['pss'], 1):>12} {r['cooldown']:>8}")
        if len(r["p99_s_by_round"]) > 1:
            out.append("    p99_s by round: " + " / ".join(
                num(s, 2) for s in r["p99_s_by_round"]))
        if r["handshakes"]:
            out.append(f"    TLS handshakes of the pool: {r['handshakes']}")
        for e in r["first_errors"]:
            out.append(f"    error: {e}")
        if (r["other_procs"] or 0) > OTHER_PROCS_MAX:
            out.append(f"    KiB/stream unreliable: the host's process count "
                       f"moved by up to {r['other_procs']} while the streams "
                       f"were held (other work on the host): rerun")
    out.append("")
    out.append(f"req/s = answers that ended well / (burst to last byte); "
               f"ideal = N / {ANSWER_S} s; p50/p99 = answer time, connect to "
               f"last byte (by round: each client's k-th answer; the "
               f"first meets a cold pool, every worker's first call); "
               f"errors = non-200 + broken streams + socket "
               f"errors; KiB/stream = drop of MemAvailable (host-wide) while "
               f"all N were held / N; pool PSS = the app's processes and "
               f"descendants; cooldown = chatfcgi put the provider in "
               f"cooldown (- : no metrics)")
    out.append("")


def num(v, nd):
    return "-" if v is None else f"{v:.{nd}f}"


def header(cfg, host, took):
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    return [
        host,
        f"harness: {cfg.bench_dir}; took {took} s; model: first token after "
        f"{FIRST_TOKEN_MS} ms, {CHUNKS} chunks {CHUNK_GAP_MS} ms apart; "
        f"N clients in one burst, one keep-alive connection each",
        f"chatfcgi: N workers, defaults otherwise, nginx sized for 10,000 "
        f"streams (net.core.somaxconn {somaxconn} caps every backlog); "
        f"TLS trust: chatfcgi [upstream] ca_file, "
        f"peer-a SSL_CERT_FILE, peer-b curl.cainfo (PHP_INI_SCAN_DIR); "
        f"peer-b only for N <= {cfg.peer_b_max}",
        ""]


# ------------------------------------------------------------ main

# Redis clients besides chatfcgi's workers: its control worker, the
# harness's redis-cli, a peer's pool.
REDIS_CLIENTS_SPARE = 1024


def preflight(cfg, harness):
    if not cfg.shared:
        die(f"{cfg.bench_dir} not found: the held-stream bench needs the "
            f"shared harness (BENCH_DIR)")
    peers = subprocess.run([PYTHON, "-c", "import uvicorn, fastapi, aiohttp"],
                           capture_output=True).returncode
    missing = [t[0] for t in (("nginx",), ("redis-server",),
                              ("php-fpm8.2", "php-fpm"))
               if not any(shutil.which(x) or Path(f"/usr/sbin/{x}").exists()
                          for x in t)]
    if peers or missing:
        harness.install_deps(missing + (["peer-a's modules"] if peers else []))
    check_ready(cfg, harness)
    stream_client.raise_nofile(max(cfg.ns) + 64)


def redis_maxclients(cfg, n):
    """Each of chatfcgi's N workers keeps a Redis connection: the harness
    starts Redis with maxclients 10000, which 10,000 workers exceed (the
    connection past it is closed at once). Raised, never lowered."""
    r = subprocess.run(["redis-cli", "-p", str(cfg.redis_port), "config",
                        "get", "maxclients"], capture_output=True, text=True)
    have = int(r.stdout.split()[1]) if r.returncode == 0 else 0
    if have < n:
        subprocess.run(["redis-cli", "-p", str(cfg.redis_port), "config",
                        "set", "maxclients", str(n)], check=True,
                       capture_output=True)


def start_base(cfg, harness):
    """Redis and the slow fake model; a worker of the model per 8192 of its
    connections (its worker_connections), which chatfcgi's N workers hold
    one each."""
    workers = -(-(max(cfg.ns) + 1024) // 8192)
    harness.ctl("start", "redis")
    redis_maxclients(cfg, max(cfg.ns) + REDIS_CLIENTS_SPARE)
    harness.ctl("start", "upstream", FIRST_TOKEN_MS,
                extra={"CHUNK_GAP_MS": str(CHUNK_GAP_MS),
                       "UPSTREAM_WORKERS": str(workers)})


def run_all(cfg, harness, healths):
    rows = []
    start_base(cfg, harness)
    for upstream in cfg.upstreams:
        for n in cfg.ns:
            for name in cfg.targets:
                row = run_row(cfg, harness, name, upstream, n, healths)
                if row:
                    rows.append(row)
    return rows


def main(argv=None):
    try:
        cfg = Cfg(parse_args(argv))
    except BenchError as e:
        progress(f"error: {e}")
        return 2
    cfg.held_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    harness = SharedHarness(cfg)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = datetime.datetime.now(datetime.timezone.utc)
    healths = []
    try:
        preflight(cfg, harness)
        host = host_line()
        progress(host)
        rows = run_all(cfg, harness, healths)
    except KeyboardInterrupt:
        progress("interrupted: stopping what was started")
        return 130
    except BenchError as e:
        progress(f"error: {e}")
        return 1
    finally:
        harness.stop_all()
    took = int((datetime.datetime.now(datetime.timezone.utc) - started)
               .total_seconds())
    out = [f"# chatfcgi held streams, {started:%Y-%m-%d %H:%M} UTC, "
           f"{git_rev()}", ""]
    out += header(cfg, host, took)
    table(cfg, rows, out)
    if healths:
        health_report(healths, out)
    return finish_report(cfg, started, out)


if __name__ == "__main__":
    sys.exit(main())
