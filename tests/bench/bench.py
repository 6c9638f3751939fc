#!/usr/bin/python3
"""make bench: chatfcgi beside its peers, in one table.

    /usr/bin/python3 tests/bench/bench.py      (what `make bench` runs)

Starts chatfcgi + nginx with deploy/local/stack.py against the shared
harness's Redis (16379) and fake OpenAI upstream (18000), then:

  1. cpu        the CPU one turn costs per process group (app, web, redis,
                fake model, wrk, other; cpu_split.py) for chatfcgi (8
                workers), peer-a-w2, peer-b-c8 and ceil-proxy, model 0 ms,
                histories at the trim limit, wrk -c64; 2 rounds, the targets
                interleaved
  2. table      the built-in targets (ceil-proxy, peer-a-w2, peer-b-c8) and
                chatfcgi, delays 0 and 50 ms, c = 16, 64, 256, in two
                session modes: conn (4 sessions per connection, histories
                warmed to the trim limit first: bench.py's loop with
                session.lua) then request (a fresh session per request: the
                shared harness's run.sh); ratios of chatfcgi to each of them
                per (mode, delay, conc)
  3. stream     time to the first delta over keep-alive connections
                (stream_client.py): chatfcgi, the ceil-proxy nginx and the
                fake upstream itself; first-delta overhead = chatfcgi's time
                minus the upstream's own
  4. memory     pool PSS (master + workers) at 64 and 256 workers after
                20,000 requests each; one worker's RSS at 10,000 and 100,000
                requests (CHATFCGI_WORKERS=1)

then prints one report (the CPU split, the table, the ratios, the streaming
and memory results, the targets met or missed) and appends it, with the
date and the git revision, to tests/bench/results.md.

Without the shared harness (BENCH_DIR missing) it starts a Redis and a fake
model of its own (tests/bench/fake-upstream.conf.in: nginx + echo module)
and measures chatfcgi alone (its CPU split and its rows, session.lua).

Every setting is an environment variable; README.md in this directory lists
them. Python 3 standard library only.
"""

import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

from benchlib import (BaseCfg, BenchError, Chatfcgi, SharedHarness,
                      check_ready, cpu_pct, cpu_snap, descendants, die,
                      env_int, env_list, env_str, finish_report, fmt,
                      git_rev, health_report, host_line, problem,
                      proc_kib, progress, pss_mib, redis_flush, stack_mod)
import cpu_split
import stream_client

HERE = Path(__file__).resolve().parent
NGINX = "/usr/sbin/nginx"
REDIS_SERVER = "/usr/bin/redis-server"
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
PEER_A, PEER_B, CEIL = "peer-a", "peer-b", "ceil-proxy"


# ------------------------------------------------------------ settings

def parse_workers(spec):
    """"16" -> {None: 16}; "0=16,50=256" -> {0: 16, 50: 256}."""
    out = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            d, w = part.split("=", 1)
            out[int(d)] = int(w)
        else:
            out[None] = int(part)
    return out


class Cfg(BaseCfg):
    def __init__(self):
        super().__init__()
        self.duration = env_str("BENCH_DURATION", "8s")
        if not self.duration.endswith("s"):
            self.duration += "s"
        self.delays = [int(d) for d in env_list("BENCH_DELAYS", "0,50")]
        self.concs = [int(c) for c in env_list("BENCH_CONC", "16,64,256")]
        self.targets = env_list("BENCH_TARGETS", "ceil-proxy,peer-a-w2,peer-b-c8")
        self.workers = parse_workers(env_str("BENCH_WORKERS", "0=8,50=256"))
        self.streams = env_int("BENCH_STREAMS", 1000)
        self.stream_conns = env_int("BENCH_STREAM_CONNS", 4)
        self.stream_warmup = env_int("BENCH_STREAM_WARMUP", 50)
        self.chunk_gap = env_int("BENCH_CHUNK_GAP_MS", 10)
        self.stream_workers = env_int("BENCH_STREAM_WORKERS", 16)
        self.mem_pools = [int(w) for w in env_list("BENCH_MEM_POOLS", "64,256")]
        self.mem_requests = env_int("BENCH_MEM_REQUESTS", 20000)
        self.rss_first = env_int("BENCH_RSS_FIRST", 10000)
        self.rss_last = env_int("BENCH_RSS_LAST", 100000)
        self.rss_conc = env_int("BENCH_RSS_CONC", 8)
        self.threads = env_int("BENCH_THREADS", 2)
        self.phases = env_list("BENCH_PHASES", "cpu,table,stream,memory")
        self.modes = env_list("BENCH_MODES", "conn,request")
        bad = [m for m in self.modes if m not in ("conn", "request")]
        if bad:
            die(f"BENCH_MODES: unknown mode(s) {', '.join(bad)} (conn, request)")
        # a history holds 20 messages (HISTORY_MAX_MESSAGES, chatfcgi's
        # history_max_messages): 10 turns fill it, the 11th is trimmed
        self.warm_turns = env_int("BENCH_WARM_TURNS", 11)
        self.warm_cap_s = env_int("BENCH_WARM_CAP_S", 120)
        self.cpu_duration = env_str("BENCH_CPU_DURATION", "5s")
        if not self.cpu_duration.endswith("s"):
            self.cpu_duration += "s"
        self.cpu_conc = env_int("BENCH_CPU_CONC", 64)
        self.cpu_workers = env_int("BENCH_CPU_WORKERS", 8)
        self.cpu_rounds = env_int("BENCH_CPU_ROUNDS", 2)

    def workers_for(self, delay):
        if delay in self.workers:
            return self.workers[delay]
        if None in self.workers:
            return self.workers[None]
        # the entry of the nearest listed delay
        near = min((d for d in self.workers if d is not None),
                   key=lambda d: abs(d - delay))
        return self.workers[near]


# ------------------------------------------------------------ helpers

def parse_result(text):
    m = re.search(r"@@RESULT (.*)", text)
    if not m:
        return None
    return dict(kv.split("=", 1) for kv in m.group(1).split())


def ratio(a, b):
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return None
    return a / b if b else None


# ------------------------------------------------------------ harnesses

class OwnHarness:
    """Without the shared bench: a Redis and a fake model (nginx + echo
    module, tests/bench/fake-upstream.conf.in) of our own, same ports."""

    kind = "own"

    def __init__(self, cfg):
        self.cfg = cfg
        self.run = cfg.run_dir
        self.procs = {}
        self.chunk_gap_ms = 50
        self.delay = 0

    def _render_upstream(self):
        user_line = "user root;" if os.geteuid() == 0 else ""
        text = (HERE / "fake-upstream.conf.in").read_text()
        values = {"LOAD_ECHO": f"load_module {ECHO_MODULE};",
                  "USER_LINE": user_line, "RUN": str(self.run),
                  "UPSTREAM_PORT": str(self.cfg.upstream_port),
                  "DEFAULT_DELAY_S": f"{self.delay / 1000:.3f}",
                  "CHUNK_GAP_S": f"{self.chunk_gap_ms / 1000:.3f}"}
        text = re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], text)
        conf = self.run / "conf" / "fake-upstream.conf"
        conf.write_text(text)
        return conf

    def start_base(self, delay=0, chunk_gap_ms=None):
        for d in ("logs", "tmp", "conf", "redis"):
            (self.run / d).mkdir(parents=True, exist_ok=True)
        self.delay = delay
        self.chunk_gap_ms = chunk_gap_ms or 50
        if "redis" not in self.procs:
            log = open(self.run / "logs" / "redis.log", "ab")
            self.procs["redis"] = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.cfg.redis_port),
                 "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.run / "redis"), "--daemonize", "no",
                 "--maxclients", "10000"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
            self._wait(lambda: stack_mod._redis_ping(self.cfg.redis_port), "redis")
        if "upstream" not in self.procs:
            conf = self._render_upstream()
            args = [NGINX, "-p", f"{self.run}/", "-e",
                    str(self.run / "logs" / "fake-upstream.error.log"),
                    "-c", str(conf), "-g", "daemon off;"]
            r = subprocess.run(args[:1] + ["-t", "-q"] + args[1:],
                               capture_output=True, text=True)
            if r.returncode:
                die(f"fake upstream config is invalid:\n{r.stderr}")
            self.procs["upstream"] = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)
            self._wait(lambda: stack_mod._tcp_open(self.cfg.upstream_port),
                       "fake upstream")
        else:
            self.set_delay(delay)

    def _wait(self, ready, what):
        for _ in range(100):
            if ready():
                return
            time.sleep(0.1)
        die(f"{what} did not start (logs in {self.run}/logs)")

    def set_delay(self, ms):
        if ms == self.delay and "upstream" in self.procs:
            return
        self.delay = ms
        self._render_upstream()
        self.procs["upstream"].send_signal(signal.SIGHUP)
        time.sleep(0.5)  # let the old worker finish

    def start_ceil_proxy(self):
        return None  # only the shared harness has the ceilings

    def stop_ceil_proxy(self):
        pass

    def stop_all(self):
        for name in ("upstream", "redis"):
            p = self.procs.pop(name, None)
            if p is None:
                continue
            stack_mod.terminate(p.pid, signal.SIGQUIT if name == "upstream"
                                else signal.SIGTERM,
                                alive=lambda p=p: p.poll() is None)

    def ports(self):
        return [self.cfg.redis_port, self.cfg.upstream_port]

    def pids(self, name):
        p = self.procs.get({"fake-upstream": "upstream"}.get(name, name))
        return [p.pid] if p is not None and p.poll() is None else []


# ------------------------------------------------------------ wrk

def wrk(url, conc, duration, threads, script, args=(), env=None):
    threads = max(1, min(threads, conc))
    cmd = ["wrk", f"-t{threads}", f"-c{conc}", f"-d{duration}", "--timeout", "10s",
           "-s", str(script), url, "--", *map(str, args)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=dict(os.environ, **(env or {})))
    return p


def wrk_until(chat, target, conc, threads, script):
    """Run wrk on chatfcgi until its chat workers have served `target`
    requests in all (each wrk thread also stops itself after its share);
    returns the count served."""
    threads = max(1, min(threads, conc))
    base = chat.served()
    need = target - base
    if need <= 0:
        return base
    spt = max(1, conc // threads)
    p = wrk(f"{chat.url}/api/chat", conc, "3600s", threads, script, [spt],
            env={"BENCH_STOP_AFTER": str(-(-need // threads))})
    try:
        while p.poll() is None:
            if chat.served() >= target:
                break
            time.sleep(0.05)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        try:
            out, _ = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
    res = parse_result(out or "")
    if res is None:
        die(f"wrk failed:\n{out}")
    time.sleep(0.3)  # let the last answers finish
    return chat.served()


SESSION_LUA = HERE / "session.lua"


def seed_of(target):
    """A fixed BENCH_SEED per target: its warm-up and its measured runs send
    the same session ids, and no two targets share one (they share Redis
    and, peers and chatfcgi, the key names)."""
    return zlib.crc32(target.encode()) % 1000000 + 1


def session_cmd(url, conc, duration, threads):
    """wrk with session.lua (the harness's post.lua, seeded): argv, spt."""
    threads = max(1, min(threads, conc))
    spt = max(1, conc // threads)
    return (["wrk", f"-t{threads}", f"-c{conc}", f"-d{duration}", "--timeout",
             "10s", "-s", str(SESSION_LUA), url, "--", str(spt)], threads, spt)


def session_env(mode, seed, **extra):
    env = dict(os.environ, SESSION_MODE=mode, BENCH_SEED=str(seed))
    env.pop("BENCH_STOP_AFTER", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def session_run(url, conc, duration, threads, mode, seed):
    """One wrk run with session.lua; its @@RESULT fields ({} if none)."""
    cmd, _, _ = session_cmd(url, conc, duration, threads)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, env=session_env(mode, seed))
    return parse_result(r.stdout) or {}


def warm_histories(cfg, name, url, conc, seed):
    """Conn mode: send every session of the pool of `conc` connections
    (4 per connection, session.lua's ids for `seed`) cfg.warm_turns turns,
    so that the measured runs start with every history at the trim limit.
    Each wrk thread stops after its share (turns x pool + one turn per
    connection, for the turns still in flight) and prints @@DONE; wrk
    runs out its -d, so it gets SIGINT when all have. Returns (requests,
    seconds)."""
    cmd, threads, spt = session_cmd(url, conc, f"{cfg.warm_cap_s}s",
                                    cfg.threads)
    share = cfg.warm_turns * 4 * spt + spt
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=session_env("conn", seed,
                                                    BENCH_STOP_AFTER=share))
    lines, done = [], 0
    try:
        for line in p.stdout:
            lines.append(line)
            if line.startswith("@@DONE"):
                done += 1
                if done == threads:
                    p.send_signal(signal.SIGINT)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        p.wait()
    secs = time.monotonic() - t0
    res = parse_result("".join(lines)) or {}
    if done < threads:
        problem(f"{name}: the history warm-up (c={conc}, {cfg.warm_turns} "
                f"turns per session) did not finish in {cfg.warm_cap_s} s "
                f"({res.get('requests', '?')} requests): its histories are "
                f"not all at the limit")
    elif int(res.get("non2xx", 0)) + int(res.get("sockerr", 0)):
        problem(f"{name}: the history warm-up had errors: "
                f"{res.get('non2xx')}+{res.get('sockerr')}")
    progress(f"{name}: warmed {4 * spt * threads} sessions x "
             f"{cfg.warm_turns} turns: {res.get('requests', '?')} requests "
             f"in {secs:.1f} s")
    time.sleep(0.5)  # the turns in flight when wrk stopped end
    return res.get("requests"), secs


# ------------------------------------------------------------ phase: table

TSV_FIELDS = ["date", "target", "delay_ms", "conc", "req_s", "p50_ms", "p99_ms",
              "non2xx", "sockerr", "app_pss_mib", "web_pss_mib", "cpu_pct",
              "steal_pct"]


def phase_table(cfg, harness, healths):
    rows = []
    for mode in cfg.modes:
        if mode == "conn":
            rows += table_conn(cfg, harness, healths)
        else:
            rows += table_request(cfg, harness, healths)
    return rows


def worker_groups(cfg):
    """{chatfcgi workers: [delays]} in the order of cfg.delays."""
    groups = {}
    for d in cfg.delays:
        groups.setdefault(cfg.workers_for(d), []).append(d)
    return groups


def table_request(cfg, harness, healths):
    """A fresh session per request: run.sh --session-mode request (or, with
    no shared harness, our own loop in request mode)."""
    rows = []
    for workers, delays in worker_groups(cfg).items():
        harness.start_base(delays[0])
        chat = Chatfcgi(cfg, f"request-w{workers}", workers).start()
        try:
            if harness.kind == "shared":
                rows += run_shared(cfg, harness, chat, delays)
            else:
                rows += session_rows(cfg, harness, "chatfcgi", f"{chat.url}/api/chat",
                                  delays, [chat.master_pid()], [chat.nginx_pid()],
                                  "request", chat.workers)
        finally:
            healths.append(chat.stop())
            harness.stop_all()
    return rows


def table_conn(cfg, harness, healths):
    """Four sessions per connection, histories at the trim limit: per
    target (the harness's built-in ones, then chatfcgi) its Redis is
    flushed, its histories are warmed at 0 ms (warm_histories, at the
    largest concurrency: its pool holds the smaller ones'), then per delay
    a 1 s warm-up and one wrk run per concurrency, all with session.lua and
    the target's seed. run.sh cannot do this: its warm-up and every row
    are separate wrk runs of post.lua, each with new random ids."""
    rows = []
    harness.start_base(0)
    try:
        if harness.kind == "shared":
            for t in cfg.targets:
                rows += conn_target(cfg, harness, t)
        first = True
        for workers, delays in worker_groups(cfg).items():
            chat = Chatfcgi(cfg, f"conn-w{workers}", workers).start()
            try:
                url = f"{chat.url}/api/chat"
                if first:
                    redis_flush(cfg)
                    harness.set_delay(0)
                    warm_histories(cfg, "chatfcgi", url, max(cfg.concs),
                                   seed_of("chatfcgi"))
                    first = False
                rows += session_rows(cfg, harness, "chatfcgi", url, delays,
                                  [chat.master_pid()], [chat.nginx_pid()],
                                  "conn", chat.workers)
            finally:
                healths.append(chat.stop())
    finally:
        harness.stop_all()
    return rows


def start_target(harness, t):
    """ctl.sh start TARGET, once more if it did not start in time (a busy
    host); stopped again when the second try fails too."""
    try:
        harness.ctl("start", t)
    except BenchError as e:
        progress(f"{t} did not start, once more: {str(e).splitlines()[0]}")
        harness.ctl("stop", t)
        try:
            harness.ctl("start", t)
        except BenchError:
            harness.ctl("stop", t)
            raise


def conn_target(cfg, harness, t):
    try:
        start_target(harness, t)
    except BenchError as e:
        problem(f"table (conn): {t}: {e}")
        return []
    try:
        url = f"{harness.target_url(t)}/api/chat"
        redis_flush(cfg)
        harness.set_delay(0)
        warm_histories(cfg, t, url, max(cfg.concs), seed_of(t))
        return session_rows(cfg, harness, t, url, cfg.delays,
                         harness.pids(f"{t}-app"), harness.pids(f"{t}-web"),
                         "conn", None)
    finally:
        harness.ctl("stop", t)


def session_rows(cfg, harness, name, url, delays, app_pids, web_pids, mode,
              workers):
    """run.sh's loop for one running target, with session.lua: per delay a
    1 s warm-up (c=16, the same ids), then one wrk run per concurrency,
    PSS after each."""
    rows = []
    seed = seed_of(name)
    for d in delays:
        harness.set_delay(d)
        session_run(url, 16, "1s", cfg.threads, mode, seed)
        for c in cfg.concs:
            s0 = cpu_snap()
            res = session_run(url, c, cfg.duration, cfg.threads, mode, seed)
            cpu, steal = cpu_pct(s0, cpu_snap())
            row = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%FT%TZ"),
                   "target": name, "delay_ms": str(d), "conc": str(c),
                   "req_s": res.get("rps", "-"), "p50_ms": res.get("p50_ms", "-"),
                   "p99_ms": res.get("p99_ms", "-"), "non2xx": res.get("non2xx", "-"),
                   "sockerr": res.get("sockerr", "-"),
                   "app_pss_mib": f"{pss_mib(app_pids):.1f}" if app_pids else "-",
                   "web_pss_mib": f"{pss_mib(web_pids):.1f}" if web_pids else "-",
                   "cpu_pct": f"{cpu:.0f}", "steal_pct": f"{steal:.0f}",
                   "workers": workers, "mode": mode}
            progress(f"{name} ({mode}) delay={d} c={c}: {row['req_s']} req/s, "
                     f"p99 {row['p99_ms']} ms, errors {row['non2xx']}+{row['sockerr']}")
            if not res:
                problem(f"{name} ({mode}) delay={d} c={c}: wrk gave no result")
            rows.append(row)
            time.sleep(1)
    return rows


def run_shared(cfg, harness, chat, delays):
    """run.sh for the built-in targets and chatfcgi. A failed run.sh (a peer
    that did not start in time on a busy host, say) is retried once; if the
    retry fails too, the rows it did measure are kept and the failure is
    reported."""
    best = []
    for attempt in (1, 2):
        tsv = cfg.out / "rows.tsv"
        tsv.unlink(missing_ok=True)
        cmd = [str(cfg.bench_dir / "run.sh"),
               "--targets", ",".join(cfg.targets) or "none",
               "--delays", ",".join(map(str, delays)),
               "--conc", ",".join(map(str, cfg.concs)),
               "--duration", cfg.duration, "--threads", str(cfg.threads),
               # A fresh session per request, for every target (empty
               # histories); the conn-mode rows are table_conn's.
               "--session-mode", "request",
               "--target", f"chatfcgi={chat.url}",
               "--pss", f"chatfcgi={chat.pid_file}",
               "--web-pss", f"chatfcgi={chat.nginx_pid_file}",
               "--out", str(tsv)]
        progress("run.sh " + " ".join(cmd[1:]))
        env = dict(os.environ, BENCH_RUN_DIR=str(cfg.run_dir))
        r = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
        rows = []
        if tsv.exists():
            for line in tsv.read_text().splitlines():
                f = line.split("\t")
                if f[0] == "date" or len(f) != len(TSV_FIELDS):
                    continue
                row = dict(zip(TSV_FIELDS, f))
                row["workers"] = chat.workers if row["target"] == "chatfcgi" else None
                row["mode"] = "request"
                rows.append(row)
        if r.returncode == 0:
            return rows
        if len(rows) > len(best):
            best = rows
        problem(f"run.sh (delays {','.join(map(str, delays))}, attempt "
                f"{attempt}) exited with status {r.returncode} after "
                f"{len(rows)} rows; its logs: {cfg.run_dir}/logs")
        if attempt == 1:
            harness.start_base(delays[0])  # run.sh stopped them on exit
    return best


def peer_name(cfg, prefix):
    for t in cfg.targets:
        if t.startswith(prefix):
            return t
    return None


MODE_WHAT = {"conn": "4 sessions per connection, histories warmed to the "
                     "trim limit first; session.lua, bench.py's loop",
             "request": "a fresh session per request, empty histories; "
                        "run.sh --session-mode request"}


def table_report(cfg, rows, out):
    """The rows, grouped by mode, then (delay, conc); the ratios of
    chatfcgi to each peer per mode. Returns {(mode, target, delay, conc):
    (req/s ratio, p99 ratio)}."""
    order = {t: i for i, t in enumerate(cfg.targets + ["chatfcgi"])}
    morder = {m: i for i, m in enumerate(cfg.modes)}
    rows = sorted(rows, key=lambda r: (morder.get(r["mode"], 9),
                                       int(r["delay_ms"]), int(r["conc"]),
                                       order.get(r["target"], 99)))
    out.append("## Throughput and latency (wrk, POST /api/chat, "
               f"{cfg.duration} per row)")
    out.append("")
    for m in cfg.modes:
        if any(r["mode"] == m for r in rows):
            out.append(f"{m + ':':<9} {MODE_WHAT.get(m, m)}")
    out.append("")
    hdr = (f"{'target':<14} {'mode':<7} {'delay':>5} {'conc':>4} {'req/s':>9} "
           f"{'p50_ms':>8} {'p99_ms':>8} {'errors':>9} {'app_PSS':>8} "
           f"{'web_PSS':>8} {'cpu%':>4} {'steal%':>6}")
    out.append(hdr)
    out.append("-" * len(hdr))
    last = None
    for r in rows:
        key = (r["mode"], r["delay_ms"], r["conc"])
        if last is not None and key != last:
            out.append("")
        last = key
        name = r["target"] + (f"-w{r['workers']}" if r.get("workers") else "")
        out.append(f"{name:<14} {r['mode']:<7} {r['delay_ms']:>5} {r['conc']:>4} "
                   f"{r['req_s']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8} "
                   f"{r['non2xx'] + '+' + r['sockerr']:>9} {r['app_pss_mib']:>8} "
                   f"{r['web_pss_mib']:>8} {r['cpu_pct']:>4} {r['steal_pct']:>6}")
    out.append("")
    out.append("errors = non-2xx + socket errors (in conn mode a 409 would be "
               "two turns of one session at once); PSS in MiB (app: processes "
               "and descendants; web: its nginx); cpu% = host CPU busy during "
               "the run (both cores, wrk included); steal% = CPU taken by the "
               "hypervisor.")
    out.append("")
    # ratios, per mode
    idx = {(r["mode"], r["target"], r["delay_ms"], r["conc"]): r for r in rows}
    pa, pb = peer_name(cfg, "peer-a"), peer_name(cfg, "peer-b")
    cols = [(pa, None), (pb, None), (CEIL if CEIL in cfg.targets else None, "slow")]
    cols = [(t, w) for t, w in cols
            if t and any(r["target"] == t for r in rows)]
    if not cols:
        return {}
    out.append("## chatfcgi / peer, per mode (req/s ratio: higher is better; "
               "p99 ratio: lower is better)")
    out.append("")
    h = f"{'mode':<7} {'delay':>5} {'conc':>4} " + " ".join(
        f"{'rps x ' + t:>18} {'p99 x ' + t:>18}" for t, _ in cols)
    out.append(h)
    out.append("-" * len(h))
    ratios = {}
    for m in cfg.modes:
        for d in cfg.delays:
            for c in cfg.concs:
                me = idx.get((m, "chatfcgi", str(d), str(c)))
                if not me:
                    continue
                cells = []
                for t, when in cols:
                    peer = idx.get((m, t, str(d), str(c)))
                    if peer is None or (when == "slow" and d == 0):
                        cells.append(f"{'-':>18} {'-':>18}")
                        continue
                    rr = ratio(me["req_s"], peer["req_s"])
                    pr = ratio(me["p99_ms"], peer["p99_ms"])
                    ratios[(m, t, d, c)] = (rr, pr)
                    cells.append(f"{fmt(rr, 2) + 'x':>18} {fmt(pr, 2) + 'x':>18}")
                out.append(f"{m:<7} {d:>5} {c:>4} " + " ".join(cells))
    out.append("")
    out.append("(ceil-proxy columns only for delays > 0: there it is the "
               "ceiling of a web server + one hop at the same concurrency)")
    out.append("")
    return ratios


# ------------------------------------------------------------ phase: cpu

CPU_COLS = ("app", "web", "redis", "stack", "fake model", "wrk", "other")


def cpu_order(cfg, harness):
    """chatfcgi, then the peers, then the ceilings (the harness's targets)."""
    if harness.kind != "shared":
        return ["chatfcgi"]
    peers = [t for t in cfg.targets if t.startswith("peer-")]
    return ["chatfcgi"] + peers + [t for t in cfg.targets if t not in peers]


def phase_cpu(cfg, harness, healths):
    """The CPU one turn costs, per process group: per target (started alone,
    histories warmed to the limit at c=cfg.cpu_conc), cpu_split.split()
    around one wrk run of session.lua in conn mode, model delay 0;
    cfg.cpu_rounds rounds, the targets interleaved in each."""
    order = cpu_order(cfg, harness)
    res = {t: [] for t in order}
    harness.start_base(0)
    try:
        redis_flush(cfg)
        for rnd in range(1, cfg.cpu_rounds + 1):
            for t in order:
                try:
                    res[t].append(cpu_one(cfg, harness, t, rnd, healths))
                except (BenchError, cpu_split.SplitError) as e:
                    problem(f"cpu: {t}, round {rnd}: {e}")
    finally:
        harness.stop_all()
    return res


def cpu_one(cfg, harness, t, rnd, healths):
    chat = None
    if t == "chatfcgi":
        chat = Chatfcgi(cfg, f"cpu-w{cfg.cpu_workers}-{rnd}",
                        cfg.cpu_workers).start()
        url = chat.url
        app, web = [chat.master_pid()], [chat.nginx_pid()]
    else:
        start_target(harness, t)
        url = harness.target_url(t)
        app, web = harness.pids(f"{t}-app"), harness.pids(f"{t}-web")
    try:
        url += "/api/chat"
        warm_histories(cfg, f"{t} (cpu, round {rnd})", url, cfg.cpu_conc,
                       seed_of(t))
        labels = [(app, "app"), (web, "web"), (harness.pids("redis"), "redis"),
                  (harness.pids("fake-upstream"), "fake model")]
        cmd, _, _ = session_cmd(url, cfg.cpu_conc, cfg.cpu_duration, cfg.threads)
        progress(f"cpu split, round {rnd}: {t}, {' '.join(cmd[:5])}")
        s0 = cpu_snap()
        us, n, result = cpu_split.split(cmd, [lb for lb in labels if lb[0]],
                                        env=session_env("conn", seed_of(t)))
        cpu, steal = cpu_pct(s0, cpu_snap())
    finally:
        if chat:
            healths.append(chat.stop())
        else:
            harness.ctl("stop", t)
    # a group with no process (ceil-proxy has no app) is None, "-" below
    named = {name: (us.pop(name, 0.0) if pids else None)
             for pids, name in labels + [([0], "wrk")]}
    named["stack"] = sum(named[k] or 0.0 for k in ("app", "web", "redis"))
    named["other"] = sum(us.values())
    top = sorted(us.items(), key=lambda kv: -kv[1])[:3]
    return {"us": named, "others": top, "requests": n,
            "rps": float(result["rps"]), "non2xx": int(result["non2xx"]),
            "sockerr": int(result["sockerr"]), "cpu_pct": cpu,
            "steal_pct": steal, "workers": cfg.cpu_workers if chat else None}


def span(vals, nd=0):
    """'lo-hi' of a list of numbers ('v' when they round the same; '-'
    when there are none)."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    lo, hi = fmt(min(vals), nd), fmt(max(vals), nd)
    return lo if lo == hi else f"{lo}-{hi}"


def cpu_report(cfg, res, out):
    runs = max((len(v) for v in res.values()), default=0)
    out.append(f"## CPU per turn by process group (conn mode, histories at the "
               f"limit, model 0 ms, wrk -t{cfg.threads} -c{cfg.cpu_conc} "
               f"-d{cfg.cpu_duration}; {cfg.cpu_rounds} "
               f"round{'s' if cfg.cpu_rounds != 1 else ''}, targets "
               f"interleaved; lo-hi over the rounds)")
    out.append("")
    hdr = (f"{'target':<14} " + " ".join(f"{c:>11}" for c in CPU_COLS) +
           f" {'req/s':>11} {'errors':>7} {'cpu%':>7}")
    out.append(hdr)
    out.append("-" * len(hdr))
    for t, rs in res.items():
        if not rs:
            out.append(f"{t:<14} (not measured: see Problems)")
            continue
        name = t + (f"-w{rs[0]['workers']}" if rs[0]["workers"] else "")
        cells = [span([r["us"][c] for r in rs]) for c in CPU_COLS]
        errs = f"{sum(r['non2xx'] for r in rs)}+{sum(r['sockerr'] for r in rs)}"
        out.append(f"{name:<14} " + " ".join(f"{c:>11}" for c in cells) +
                   f" {span([r['rps'] for r in rs]):>11} {errs:>7} "
                   f"{span([r['cpu_pct'] for r in rs]):>7}")
    out.append("")
    out.append("us of CPU (user + system, /proc/PID/stat) per request over "
               "the wrk run: app = chatfcgi's master and workers / uvicorn / "
               "php-fpm; web = the target's nginx; redis; stack = app + web + "
               "redis; fake model = the fake upstream's nginx; wrk = the load "
               "generator; other = every other process on the host (other "
               "work on it shows there; largest below). errors = non-2xx + "
               "socket errors over all rounds; cpu% = host CPU busy.")
    for t, rs in res.items():
        tops = {}
        for r in rs:
            for k, v in r["others"]:
                tops[k] = max(tops.get(k, 0.0), v)
        if tops:
            big = sorted(tops.items(), key=lambda kv: -kv[1])[:3]
            out.append(f"  other, {t}: " + ", ".join(
                f"{k} {v:.1f}" for k, v in big))
    if runs < cfg.cpu_rounds:
        out.append(f"(fewer than {cfg.cpu_rounds} rounds for some targets: "
                   f"see Problems)")
    out.append("")


def cpu_mean(res, t, col="stack"):
    rs = res.get(t) or []
    if not rs:
        return None, []
    vals = [r["us"][col] for r in rs]
    return sum(vals) / len(vals), vals


# ------------------------------------------------------------ phase: stream

def phase_stream(cfg, harness, healths):
    harness.start_base(0, chunk_gap_ms=cfg.chunk_gap)
    chat = None
    results = {}
    try:
        proxy = harness.start_ceil_proxy()
        chat = Chatfcgi(cfg, f"stream-w{cfg.stream_workers}",
                        cfg.stream_workers).start()
        runs = [("upstream", f"http://127.0.0.1:{cfg.upstream_port}/v1/chat/completions",
                 "openai")]
        if proxy:
            runs.append(("ceil-proxy", f"{proxy}/api/chat", "openai"))
        runs.append(("chatfcgi", f"{chat.url}/api/chat", "chat"))
        for name, url, kind in runs:
            if cfg.stream_warmup:
                stream_client.run(url, kind, cfg.stream_warmup, cfg.stream_conns)
            progress(f"streaming: {cfg.streams} streams to {name} ({url}), "
                     f"{cfg.stream_conns} keep-alive connections")
            r = stream_client.run(url, kind, cfg.streams, cfg.stream_conns)
            r.pop("samples_ms", None)
            results[name] = r
    finally:
        if chat:
            healths.append(chat.stop())
        harness.stop_ceil_proxy()
    return results


def stream_report(cfg, res, out):
    out.append(f"## Streaming: time to first delta ({cfg.streams} streams, "
               f"{cfg.stream_conns} keep-alive connections, model delay 0, "
               f"chunks {cfg.chunk_gap} ms apart, chatfcgi "
               f"{cfg.stream_workers} workers)")
    out.append("")
    hdr = (f"{'path':<38} {'ok':>5} {'err':>4} {'p50_ms':>8} {'p90_ms':>8} "
           f"{'p99_ms':>8} {'max_ms':>8}")
    out.append(hdr)
    out.append("-" * len(hdr))
    what = {"upstream": "fake upstream directly (first chunk)",
            "ceil-proxy": "ceil-proxy nginx -> upstream",
            "chatfcgi": "chatfcgi (first event: delta)"}
    for name in ("upstream", "ceil-proxy", "chatfcgi"):
        r = res.get(name)
        if not r:
            continue
        out.append(f"{what[name]:<38} {r['ok']:>5} {r['errors']:>4} "
                   f"{fmt(r['p50_ms'], 2):>8} {fmt(r['p90_ms'], 2):>8} "
                   f"{fmt(r['p99_ms'], 2):>8} {fmt(r['max_ms'], 2):>8}")
        for e in r.get("first_errors", []):
            out.append(f"    error: {e}")
    out.append("")
    up = res.get("upstream")
    ov = {}
    for name in ("ceil-proxy", "chatfcgi"):
        r = res.get(name)
        if r and up and r["p50_ms"] is not None and up["p50_ms"] is not None:
            ov[name] = (r["p50_ms"] - up["p50_ms"], r["p99_ms"] - up["p99_ms"])
            out.append(f"first-delta overhead of {name:<10} (minus the upstream's "
                       f"own): p50 {ov[name][0]:+.2f} ms, p99 {ov[name][1]:+.2f} ms")
    if "chatfcgi" in ov and "ceil-proxy" in ov:
        out.append(f"chatfcgi - ceil-proxy: p50 "
                   f"{ov['chatfcgi'][0] - ov['ceil-proxy'][0]:+.2f} ms, p99 "
                   f"{ov['chatfcgi'][1] - ov['ceil-proxy'][1]:+.2f} ms")
    out.append("")
    return ov


# ------------------------------------------------------------ phase: memory

def phase_memory(cfg, harness, healths):
    harness.start_base(0)
    script = SESSION_LUA
    res = {"pools": [], "rss": None}
    try:
        for w in cfg.mem_pools:
            chat = Chatfcgi(cfg, f"mem-w{w}", w).start()
            try:
                conc = min(w, 256)
                progress(f"memory: {cfg.mem_requests} requests to {w} workers, c={conc}")
                before = pss_mib([chat.master_pid()])
                served = wrk_until(chat, cfg.mem_requests, conc, cfg.threads, script)
                time.sleep(0.5)
                workers = chat.chat_workers()
                pids = descendants([chat.master_pid()])
                pss = pss_mib([chat.master_pid()])
                rss = sum(proc_kib(p, "Rss") for p in pids) / 1024.0
                used = sum(1 for p in workers if p["requests"] > 0)
                res["pools"].append({
                    "workers": w, "conc": conc, "served": served,
                    "procs": len(pids), "pss_before": before, "pss": pss,
                    "rss_sum": rss, "per_worker": pss / w,
                    "used": used,
                    "min_req": min((p["requests"] for p in workers), default=0),
                    "max_req": max((p["requests"] for p in workers), default=0),
                    "nginx_pss": pss_mib([chat.nginx_pid()])})
            finally:
                healths.append(chat.stop())
        if cfg.rss_last > 0:
            chat = Chatfcgi(cfg, "mem-w1", 1).start()
            try:
                pid = chat.chat_workers()[0]["pid"]
                samples = []
                for n in (cfg.rss_first, cfg.rss_last):
                    progress(f"memory: one worker (pid {pid}) up to {n} requests")
                    served = wrk_until(chat, n, cfg.rss_conc, cfg.threads, script)
                    time.sleep(0.3)
                    now_pid = chat.chat_workers()[0]["pid"]
                    samples.append({"served": served, "pid": now_pid,
                                    "rss_kib": proc_kib(now_pid, "VmRSS", "status"),
                                    "pss_kib": proc_kib(now_pid, "Pss"),
                                    "heap_kib": heap_kib(now_pid)})
                res["rss"] = samples
            finally:
                healths.append(chat.stop())
    finally:
        harness.stop_all()
    return res


def heap_kib(pid):
    """Rss of the [heap] mapping of a process (kB), 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/smaps") as f:
            inside = False
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    inside = line.rstrip().endswith("[heap]")
                elif inside and line.startswith("Rss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_report(cfg, res, out):
    out.append("## Memory (model delay 0; pool PSS = master + control worker "
               "+ chat workers, from /proc/PID/smaps_rollup)")
    out.append("")
    if res["pools"]:
        hdr = (f"{'workers':>7} {'conc':>4} {'requests':>8} {'used':>5} "
               f"{'req/worker min..max':>19} {'PSS_MiB':>8} {'MiB/worker':>10} "
               f"{'RSS_sum_MiB':>11} {'idle_PSS':>8} {'nginx':>6}")
        out.append(hdr)
        out.append("-" * len(hdr))
        for p in res["pools"]:
            out.append(f"{p['workers']:>7} {p['conc']:>4} {p['served']:>8} "
                       f"{p['used']:>5} {str(p['min_req']) + '..' + str(p['max_req']):>19} "
                       f"{p['pss']:>8.1f} {p['per_worker']:>10.3f} "
                       f"{p['rss_sum']:>11.1f} {p['pss_before']:>8.1f} "
                       f"{p['nginx_pss']:>6.1f}")
        out.append("")
        out.append("used = workers that served at least one request; idle_PSS = "
                   "the pool's PSS right after start; MiB/worker = PSS / workers.")
        out.append("")
    s = res.get("rss")
    if s:
        a, b = s[0], s[-1]
        r = b["rss_kib"] / a["rss_kib"] if a["rss_kib"] else None
        out.append(f"one worker (CHATFCGI_WORKERS=1, c={cfg.rss_conc}):")
        for x in s:
            out.append(f"  after {x['served']:>7} requests: RSS {x['rss_kib']} KiB, "
                       f"PSS {x['pss_kib']} KiB, heap {x['heap_kib']} KiB "
                       f"(pid {x['pid']})")
        if a["pid"] != b["pid"]:
            out.append("  NOTE: the worker was replaced between the samples")
        out.append(f"  RSS ratio {b['served']}/{a['served']}: {fmt(r, 3)}")
        out.append("")
        return r
    return None


# ------------------------------------------------------------ targets

def targets_report(cfg, rows, ratios, cpu, ov, mem, rss_ratio, out):
    """The project's targets, PASS or MISS (n/a: not measured in this run):
    the throughput ones per session mode, issue 16's in conn mode (its CPU
    split and its table rows), then memory and streaming."""
    sections = []
    lines = []

    def check(ok, text):
        tag = "n/a " if ok is None else ("PASS" if ok else "MISS")
        lines.append(f"[{tag}] {text}")

    pa, pb = peer_name(cfg, "peer-a"), peer_name(cfg, "peer-b")
    for m in cfg.modes:
        idx = {(r["target"], r["delay_ms"], r["conc"]): r for r in rows
               if r["mode"] == m}
        lines = []
        if m == "conn" and cpu:
            me, me_v = cpu_mean(cpu, "chatfcgi")
            pe, pe_v = cpu_mean(cpu, pa) if pa else (None, [])
            rng = f" (runs {', '.join(f'{v:.0f}' for v in me_v)})" if me_v else ""
            check(None if me is None else me <= 200,
                  f"issue 16 (a): chatfcgi's stack CPU per turn (app + web + "
                  f"redis, mean of the cpu rounds) <= 200 us: "
                  f"{fmt(me, 0)} us{rng}")
            rat = pe / me if me and pe is not None else None
            check(None if rat is None else rat >= 4.8,
                  f"issue 16 (a): <= 1/4.8 of {pa}'s: {fmt(me, 0)} vs "
                  f"{fmt(pe, 0)} us, {pa} / chatfcgi = {fmt(rat, 2)}x"
                  + (f" (runs {', '.join(f'{v:.0f}' for v in pe_v)})"
                     if pe_v else ""))
        if ("chatfcgi", "50", "256") in idx:
            rc = ratios.get((m, CEIL, 50, 256), (None, None))
            check(None if rc[0] is None else rc[0] >= 0.9,
                  ("issue 16 (b): " if m == "conn" else "") +
                  f"50 ms, c=256: req/s >= 90% of ceil-proxy: "
                  f"{fmt(None if rc[0] is None else rc[0] * 100, 0)}%")
        me = idx.get(("chatfcgi", "0", "64"))
        if me:
            rr = ratios.get((m, pa, 0, 64), (None, None))
            rb = ratios.get((m, pb, 0, 64), (None, None))
            if m == "conn":
                check(None if rr[0] is None else rr[0] >= 3,
                      f"issue 16 (c): 0 ms, c=64: req/s >= 3x {pa}: "
                      f"{fmt(rr[0], 2)}x")
                check(None if rb[0] is None else rb[0] >= 3,
                      f"issue 16 (c): 0 ms, c=64: req/s >= 3x {pb}: "
                      f"{fmt(rb[0], 2)}x")
            check(None if rr[0] is None else rr[0] >= 5,
                  f"0 ms, c=64: req/s >= 5x {pa}: {fmt(rr[0], 2)}x")
            check(None if rb[0] is None else rb[0] >= 4,
                  f"0 ms, c=64: req/s >= 4x {pb}: {fmt(rb[0], 2)}x")
            errs = (int(me["non2xx"]) + int(me["sockerr"])
                    if me["non2xx"] != "-" else None)
            check(None if errs is None else errs == 0,
                  f"0 ms, c=64: zero errors: {me['non2xx']}+{me['sockerr']}")
            check(None if rr[1] is None else rr[1] <= 0.2,
                  f"0 ms, c=64: p99 <= 1/5 of {pa}'s: {me['p99_ms']} ms vs "
                  f"{idx.get((pa, '0', '64'), {}).get('p99_ms', '-')} ms "
                  f"({fmt(rr[1], 2)}x)")
        if lines:
            sections.append((f"{m} mode ({MODE_WHAT[m].split(';')[0]})",
                             lines))
    if "conn" not in cfg.modes and cpu:
        lines = []
        me, _ = cpu_mean(cpu, "chatfcgi")
        check(None if me is None else me <= 200,
              f"issue 16 (a): chatfcgi's stack CPU per turn <= 200 us: "
              f"{fmt(me, 0)} us")
        sections.append(("cpu phase", lines))
    lines = []
    for p in (mem or {}).get("pools", []):
        check(p["per_worker"] <= 0.5,
              f"PSS per worker <= 0.5 MiB at {p['workers']} workers after "
              f"{p['served']} requests: {p['per_worker']:.3f} MiB")
    if rss_ratio is not None:
        check(abs(rss_ratio - 1) <= 0.10,
              f"one worker's RSS flat within 10% from {cfg.rss_first} to "
              f"{cfg.rss_last} requests: x{rss_ratio:.3f}")
    if ov and "chatfcgi" in ov:
        check(ov["chatfcgi"][0] < 2.0,
              f"first-delta overhead p50 < 2 ms: {ov['chatfcgi'][0]:+.2f} ms")
        if "ceil-proxy" in ov:
            check(ov["chatfcgi"][0] <= ov["ceil-proxy"][0] + 1.0,
                  f"first-delta overhead p50 <= ceil-proxy's + 1 ms: "
                  f"{ov['chatfcgi'][0]:+.2f} vs {ov['ceil-proxy'][0]:+.2f} ms")
    if lines:
        sections.append(("memory and streaming", lines))
    if sections:
        out.append("## Targets")
        out.append("")
        for title, ls in sections:
            out.append(f"{title}:")
            out.extend(ls)
            out.append("")


# ------------------------------------------------------------ main

def preflight(cfg, harness):
    missing = [t for t in ("wrk", "nginx", "redis-server", "redis-cli")
               if not shutil.which(t) and not Path(f"/usr/sbin/{t}").exists()]
    if not Path(ECHO_MODULE).is_file():
        missing.append("the nginx echo module")
    if harness.kind == "shared" and missing:
        harness.install_deps(missing)
    elif missing:
        pkgs = "wrk libnginx-mod-http-echo redis-server redis-tools nginx"
        if os.geteuid() == 0:
            progress(f"missing: {', '.join(missing)}: apt-get install {pkgs}")
            subprocess.run(["apt-get", "install", "-y", "-q",
                            "--no-install-recommends", *pkgs.split()],
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
                           stdout=sys.stderr, check=False)
        else:
            die(f"missing: {', '.join(missing)}: sudo apt-get install {pkgs}")
    check_ready(cfg, harness)


def main():
    if len(sys.argv) > 1:
        # Settings are environment variables; any argument (--help or a
        # mistake) gets the usage, not a seven-minute run.
        print(__doc__.strip())
        return 0 if sys.argv[1] in ("-h", "--help") else 2
    cfg = Cfg()
    cfg.out.mkdir(parents=True, exist_ok=True)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    harness = SharedHarness(cfg) if cfg.shared else OwnHarness(cfg)
    if not cfg.shared:
        progress(f"{cfg.bench_dir} not found: measuring chatfcgi alone, with "
                 f"its own Redis and fake model (tests/bench/)")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = datetime.datetime.now(datetime.timezone.utc)
    healths = []
    took = {}
    got = {}
    try:
        preflight(cfg, harness)
        host = host_line()
        progress(host)
        for name, fn in (("cpu", phase_cpu), ("table", phase_table),
                         ("stream", phase_stream), ("memory", phase_memory)):
            if name not in cfg.phases:
                continue
            t0 = time.monotonic()
            try:
                got[name] = fn(cfg, harness, healths)
            except BenchError as e:
                problem(f"{name}: {e}")
                harness.stop_all()
            took[name] = time.monotonic() - t0
    except KeyboardInterrupt:
        progress("interrupted: stopping what was started")
        harness.stop_all()
        return 130
    except BenchError as e:
        progress(f"error: {e}")
        harness.stop_all()
        return 1
    finally:
        harness.stop_all()

    ended = datetime.datetime.now(datetime.timezone.utc)
    out = []
    out.append(f"# chatfcgi bench, {started:%Y-%m-%d %H:%M} UTC, {git_rev()}")
    out.append("")
    out.append(host)
    out.append(f"harness: {cfg.bench_dir if cfg.shared else 'tests/bench (own Redis and fake model; no peers)'}; "
               f"took {int((ended - started).total_seconds())} s ("
               + ", ".join(f"{k} {v:.0f} s" for k, v in took.items()) + ")")
    wk = ", ".join(f"{d} ms: {cfg.workers_for(d)}" for d in cfg.delays)
    out.append(f"chatfcgi workers (static pool) per model delay: {wk}; "
               f"wrk -t{cfg.threads}, {cfg.duration} per row; session modes: "
               f"{', '.join(cfg.modes)}; no access logs")
    out.append("")
    rows, ratios, cpu = got.get("table", []), {}, got.get("cpu")
    if cpu:
        cpu_report(cfg, cpu, out)
    if rows:
        ratios = table_report(cfg, rows, out)
    stream_res, mem = got.get("stream"), got.get("memory")
    ov = stream_report(cfg, stream_res, out) if stream_res else {}
    rss_ratio = memory_report(cfg, mem, out) if mem else None
    targets_report(cfg, rows, ratios, cpu, ov, mem, rss_ratio, out)
    health_report(healths, out, note="(499 = the client went away: wrk "
                  "closes its open connections when a run ends)")
    return finish_report(cfg, started, out)


if __name__ == "__main__":
    sys.exit(main())
