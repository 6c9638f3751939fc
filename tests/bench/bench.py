#!/usr/bin/python3
"""make bench: chatfcgi beside its peers, in one table.

    /usr/bin/python3 tests/bench/bench.py      (what `make bench` runs)

Starts chatfcgi + nginx with deploy/local/stack.py against the shared
harness's Redis (16379) and fake OpenAI upstream (18000), then:

  1. table      the shared harness (../shared/bench/run.sh) measures the
                built-in targets (ceil-proxy, peer-a-w2, peer-b-c8) and
                chatfcgi, delays 0 and 50 ms, c = 16, 64, 256; ratios of
                chatfcgi to each of them per (delay, conc)
  2. stream     time to the first delta over keep-alive connections
                (stream_client.py): chatfcgi, the ceil-proxy nginx and the
                fake upstream itself; first-delta overhead = chatfcgi's time
                minus the upstream's own
  3. memory     pool PSS (master + workers) at 64 and 256 workers after
                20,000 requests each; one worker's RSS at 10,000 and 100,000
                requests (CHATFCGI_WORKERS=1)

then prints one report (the table, the ratios, the streaming and memory
results, the targets met or missed) and appends it, with the date and the
git revision, to tests/bench/results.md.

Without the shared harness (BENCH_DIR missing) it starts a Redis and a fake
model of its own (tests/bench/fake-upstream.conf.in: nginx + echo module)
and measures chatfcgi's own rows with wrk and tests/bench/post.lua.

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
from pathlib import Path

from benchlib import (BaseCfg, BenchError, Chatfcgi, SharedHarness,
                      check_ready, cpu_pct, cpu_snap, descendants, die,
                      env_int, env_list, env_str, finish_report, fmt,
                      git_rev, health_report, host_line, problem,
                      proc_kib, progress, pss_mib, stack_mod)
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
        self.phases = env_list("BENCH_PHASES", "table,stream,memory")

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


# ------------------------------------------------------------ phase 1: table

TSV_FIELDS = ["date", "target", "delay_ms", "conc", "req_s", "p50_ms", "p99_ms",
              "non2xx", "sockerr", "app_pss_mib", "web_pss_mib", "cpu_pct",
              "steal_pct"]


def phase_table(cfg, harness, healths):
    rows = []
    groups = {}
    for d in cfg.delays:
        groups.setdefault(cfg.workers_for(d), []).append(d)
    for workers, delays in groups.items():
        harness.start_base(delays[0])
        chat = Chatfcgi(cfg, f"table-w{workers}", workers).start()
        try:
            if harness.kind == "shared":
                rows += run_shared(cfg, harness, chat, delays)
            else:
                rows += run_own(cfg, harness, chat, delays)
        finally:
            healths.append(chat.stop())
            harness.stop_all()
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
               # A fresh session per request, for every target: chatfcgi
               # refuses a second concurrent turn of one session (409) and
               # the peers do not, while the harness's default "conn" mode
               # round-robins sessions so that two connections can send
               # turns of one session at once. Those 409s would count as
               # errors, and as cheap answers.
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


def run_own(cfg, harness, chat, delays):
    """run.sh's loop for chatfcgi alone: per delay, a 1 s warm-up, then one
    wrk run per concurrency, PSS after each."""
    rows = []
    url = f"{chat.url}/api/chat"
    script = HERE / "post.lua"
    for d in delays:
        harness.set_delay(d)
        wrk(url, 16, "1s", cfg.threads, script, [8]).communicate()
        for c in cfg.concs:
            spt = max(1, c // cfg.threads)
            s0 = cpu_snap()
            out, _ = wrk(url, c, cfg.duration, cfg.threads, script, [spt]).communicate()
            cpu, steal = cpu_pct(s0, cpu_snap())
            res = parse_result(out) or {}
            row = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%FT%TZ"),
                   "target": "chatfcgi", "delay_ms": str(d), "conc": str(c),
                   "req_s": res.get("rps", "-"), "p50_ms": res.get("p50_ms", "-"),
                   "p99_ms": res.get("p99_ms", "-"), "non2xx": res.get("non2xx", "-"),
                   "sockerr": res.get("sockerr", "-"),
                   "app_pss_mib": f"{pss_mib([chat.master_pid()]):.1f}",
                   "web_pss_mib": f"{pss_mib([chat.nginx_pid()]):.1f}",
                   "cpu_pct": f"{cpu:.0f}", "steal_pct": f"{steal:.0f}",
                   "workers": chat.workers}
            progress(f"chatfcgi delay={d} c={c}: {row['req_s']} req/s, "
                     f"p99 {row['p99_ms']} ms, errors {row['non2xx']}+{row['sockerr']}")
            rows.append(row)
            time.sleep(1)
    return rows


def peer_name(cfg, prefix):
    for t in cfg.targets:
        if t.startswith(prefix):
            return t
    return None


def table_report(cfg, rows, out):
    order = {t: i for i, t in enumerate(cfg.targets + ["chatfcgi"])}
    rows = sorted(rows, key=lambda r: (int(r["delay_ms"]), int(r["conc"]),
                                       order.get(r["target"], 99)))
    out.append("## Throughput and latency (wrk, POST /api/chat, "
               f"{cfg.duration} per row)")
    out.append("")
    hdr = (f"{'target':<14} {'delay':>5} {'conc':>4} {'req/s':>9} {'p50_ms':>8} "
           f"{'p99_ms':>8} {'errors':>9} {'app_PSS':>8} {'web_PSS':>8} {'cpu%':>4} "
           f"{'steal%':>6}")
    out.append(hdr)
    out.append("-" * len(hdr))
    last = None
    for r in rows:
        key = (r["delay_ms"], r["conc"])
        if last is not None and key != last:
            out.append("")
        last = key
        name = r["target"] + (f"-w{r['workers']}" if r.get("workers") else "")
        out.append(f"{name:<14} {r['delay_ms']:>5} {r['conc']:>4} {r['req_s']:>9} "
                   f"{r['p50_ms']:>8} {r['p99_ms']:>8} "
                   f"{r['non2xx'] + '+' + r['sockerr']:>9} {r['app_pss_mib']:>8} "
                   f"{r['web_pss_mib']:>8} {r['cpu_pct']:>4} {r['steal_pct']:>6}")
    out.append("")
    out.append("errors = non-2xx + socket errors; PSS in MiB (app: processes "
               "and descendants; web: its nginx); cpu% = host CPU busy during "
               "the run (both cores, wrk included); steal% = CPU taken by the "
               "hypervisor.")
    out.append("")
    # ratios
    idx = {(r["target"], r["delay_ms"], r["conc"]): r for r in rows}
    pa, pb = peer_name(cfg, "peer-a"), peer_name(cfg, "peer-b")
    cols = [(pa, None), (pb, None), (CEIL if CEIL in cfg.targets else None, "slow")]
    cols = [(t, w) for t, w in cols
            if t and any(r["target"] == t for r in rows)]
    if not cols:
        return {}
    out.append("## chatfcgi / peer (req/s ratio: higher is better; p99 ratio: "
               "lower is better)")
    out.append("")
    h = f"{'delay':>5} {'conc':>4} " + " ".join(
        f"{'rps x ' + t:>18} {'p99 x ' + t:>18}" for t, _ in cols)
    out.append(h)
    out.append("-" * len(h))
    ratios = {}
    for d in cfg.delays:
        for c in cfg.concs:
            me = idx.get(("chatfcgi", str(d), str(c)))
            if not me:
                continue
            cells = []
            for t, when in cols:
                peer = idx.get((t, str(d), str(c)))
                if peer is None or (when == "slow" and d == 0):
                    cells.append(f"{'-':>18} {'-':>18}")
                    continue
                rr = ratio(me["req_s"], peer["req_s"])
                pr = ratio(me["p99_ms"], peer["p99_ms"])
                ratios[(t, d, c)] = (rr, pr)
                cells.append(f"{fmt(rr, 2) + 'x':>18} {fmt(pr, 2) + 'x':>18}")
            out.append(f"{d:>5} {c:>4} " + " ".join(cells))
    out.append("")
    out.append("(ceil-proxy columns only for delays > 0: there it is the "
               "ceiling of a web server + one hop at the same concurrency)")
    out.append("")
    return ratios


# ------------------------------------------------------------ phase 2: stream

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


# ------------------------------------------------------------ phase 3: memory

def phase_memory(cfg, harness, healths):
    harness.start_base(0)
    script = HERE / "post.lua"
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

def targets_report(cfg, rows, ratios, ov, mem, rss_ratio, out):
    lines = []

    def check(ok, text):
        tag = "n/a " if ok is None else ("PASS" if ok else "MISS")
        lines.append(f"[{tag}] {text}")

    idx = {(r["target"], r["delay_ms"], r["conc"]): r for r in rows}
    pa, pb = peer_name(cfg, "peer-a"), peer_name(cfg, "peer-b")
    me = idx.get(("chatfcgi", "0", "64"))
    if me:
        rr = ratios.get((pa, 0, 64), (None, None))
        check(None if rr[0] is None else rr[0] >= 5,
              f"0 ms, c=64: req/s >= 5x {pa}: {fmt(rr[0], 2)}x")
        rb = ratios.get((pb, 0, 64), (None, None))
        check(None if rb[0] is None else rb[0] >= 4,
              f"0 ms, c=64: req/s >= 4x {pb}: {fmt(rb[0], 2)}x")
        errs = int(me["non2xx"]) + int(me["sockerr"]) if me["non2xx"] != "-" else None
        check(None if errs is None else errs == 0,
              f"0 ms, c=64: zero errors: {me['non2xx']}+{me['sockerr']}")
        check(None if rr[1] is None else rr[1] <= 0.2,
              f"0 ms, c=64: p99 <= 1/5 of {pa}'s: {me['p99_ms']} ms vs "
              f"{idx.get((pa, '0', '64'), {}).get('p99_ms', '-')} ms "
              f"({fmt(rr[1], 2)}x)")
    rc = ratios.get((CEIL, 50, 256), (None, None))
    if ("chatfcgi", "50", "256") in idx:
        check(None if rc[0] is None else rc[0] >= 0.9,
              f"50 ms, c=256: req/s >= 90% of ceil-proxy: "
              f"{fmt(None if rc[0] is None else rc[0] * 100, 0)}%")
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
        out.append("## Targets")
        out.append("")
        out.extend(lines)
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
    rows, ratios, stream_res, mem = [], {}, {}, None
    try:
        preflight(cfg, harness)
        host = host_line()
        progress(host)
        for name, fn in (("table", phase_table), ("stream", phase_stream),
                         ("memory", phase_memory)):
            if name not in cfg.phases:
                continue
            try:
                got = fn(cfg, harness, healths)
            except BenchError as e:
                problem(f"{name}: {e}")
                harness.stop_all()
                continue
            if name == "table":
                rows = got
            elif name == "stream":
                stream_res = got
            else:
                mem = got
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
               f"took {int((ended - started).total_seconds())} s")
    wk = ", ".join(f"{d} ms: {cfg.workers_for(d)}" for d in cfg.delays)
    out.append(f"chatfcgi workers (static pool) per model delay: {wk}; "
               f"wrk -t{cfg.threads}, {cfg.duration} per row, a fresh "
               f"session per request (run.sh --session-mode request); no "
               f"access logs")
    out.append("")
    if rows:
        ratios = table_report(cfg, rows, out)
    ov = stream_report(cfg, stream_res, out) if stream_res else {}
    rss_ratio = memory_report(cfg, mem, out) if mem else None
    targets_report(cfg, rows, ratios, ov, mem, rss_ratio, out)
    health_report(healths, out, note="(499 = the client went away: wrk "
                  "closes its open connections when a run ends)")
    return finish_report(cfg, started, out)


if __name__ == "__main__":
    sys.exit(main())
