#!/usr/bin/python3
"""What bench.py (make bench) and held.py (make bench-held) share.

Settings from the environment, the run's problems and progress lines, PSS
from /proc, the shared harness (../shared/bench: its ctl.sh starts Redis,
the fake model and the peers), one chatfcgi + nginx stack from
deploy/local/stack.py with its own account of a run, the host line and the
append to results.md. Python 3 standard library only.
"""

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "deploy" / "local"))

import stack as stack_mod  # noqa: E402  (deploy/local/stack.py)

RESULTS = HERE / "results.md"
SYSTEM_PROMPT = "You are a helpful assistant."


# ------------------------------------------------------------ settings

def env_str(name, default):
    v = os.environ.get(name)
    return v if v not in (None, "") else default


def env_int(name, default):
    v = env_str(name, None)
    if v is None:
        return default
    try:
        return int(v)
    except ValueError:
        die(f"{name}={v} is not an integer")


def env_list(name, default):
    return [x.strip() for x in env_str(name, default).split(",") if x.strip()]

class BaseCfg:
    """The settings every bench driver has: where the harness, the run
    dirs and the ports are, and whether to record the report."""

    def __init__(self):
        self.bench_dir = Path(env_str("BENCH_DIR",
                                      str(REPO.parent / "shared" / "bench")))
        self.shared = (self.bench_dir / "run.sh").is_file()
        self.out = Path(env_str("BENCH_OUT_DIR", str(REPO / "build" / "bench")))
        self.run_dir = Path(env_str("BENCH_RUN_DIR", str(self.out / "harness")))
        self.port = env_int("BENCH_PORT", 18100)
        self.redis_port = env_int("REDIS_PORT", 16379)
        self.upstream_port = env_int("UPSTREAM_PORT", 18000)
        self.upstream_tls_port = env_int("UPSTREAM_TLS_PORT", 18443)
        self.ceil_port = env_int("PORT_CEIL_PROXY", 18002)
        self.record = env_str("BENCH_RECORD", "1") != "0"


# ------------------------------------------------------------ helpers

class BenchError(Exception):
    pass


PROBLEMS = []  # what went wrong but did not stop the bench; in the report


def problem(msg):
    PROBLEMS.append(msg)
    progress(f"problem: {msg}")


def die(msg):
    raise BenchError(msg)


def progress(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def port_busy(port):
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_json(url, timeout=5.0):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return json.loads(r.read())


def descendants(pids):
    kids = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(e))
    out, todo = [], list(pids)
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def proc_kib(pid, field, source="smaps_rollup"):
    """A kB field (Pss, Rss, ...) of /proc/PID/smaps_rollup (or status)."""
    try:
        with open(f"/proc/{pid}/{source}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_mib(pids):
    return sum(proc_kib(p, "Pss") for p in descendants(pids)) / 1024.0


def cpu_snap():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6]
    idle = v[3] + v[4]
    steal = v[7] if len(v) > 7 else 0
    return busy, idle, steal


def cpu_pct(a, b):
    bu, idl, st = (b[i] - a[i] for i in range(3))
    t = bu + idl + st
    return (100.0 * bu / t, 100.0 * st / t) if t > 0 else (0.0, 0.0)


def git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "app",
                                "include", "conf", "deploy"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (+ uncommitted changes in app/include/conf/deploy)"
                      if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt(v, nd=1):
    if v is None or v == "-":
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{nd}f}"


# ------------------------------------------------------------ harness

class SharedHarness:
    """The shared bench (../shared/bench): its ctl.sh starts and stops
    Redis, the fake upstream and the built-in targets, all under
    BENCH_RUN_DIR; run.sh measures."""

    kind = "shared"

    def __init__(self, cfg):
        self.cfg = cfg
        self.env = dict(os.environ, BENCH_RUN_DIR=str(cfg.run_dir))

    def ctl(self, *args, extra=None):
        env = dict(self.env, **(extra or {}))
        r = subprocess.run([str(self.cfg.bench_dir / "ctl.sh"), *map(str, args)],
                           env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            die(f"ctl.sh {' '.join(map(str, args))} failed:\n{r.stdout}")
        return r.stdout

    def start_base(self, delay=0, chunk_gap_ms=None):
        extra = {"CHUNK_GAP_MS": str(chunk_gap_ms)} if chunk_gap_ms else None
        self.ctl("start", "redis")
        self.ctl("start", "upstream", delay, extra=extra)

    def set_delay(self, ms):
        self.ctl("delay", ms)

    def start_ceil_proxy(self):
        self.ctl("start", "ceil-proxy")
        return f"http://127.0.0.1:{self.cfg.ceil_port}"

    def stop_ceil_proxy(self):
        self.ctl("stop", "ceil-proxy")

    def target_url(self, target):
        """The base URL of a built-in target's front (lib.sh's ports)."""
        for prefix, var, port in (("ceil-static", "PORT_CEIL_STATIC", 18001),
                                  ("ceil-proxy", "PORT_CEIL_PROXY", 18002),
                                  ("peer-a-w", "PORT_PEER_A", 18010),
                                  ("peer-b-c", "PORT_PEER_B", 18020)):
            if target.startswith(prefix):
                return f"http://127.0.0.1:{env_int(var, port)}"
        die(f"unknown target {target}")

    def pids(self, name):
        """The pid in BENCH_RUN_DIR/NAME.pid ([] when none): redis,
        fake-upstream, TARGET-app, TARGET-web."""
        try:
            return [int((self.cfg.run_dir / f"{name}.pid").read_text().split()[0])]
        except (OSError, ValueError, IndexError):
            return []

    def install_deps(self, missing):
        progress(f"missing: {', '.join(missing)}: running "
                 f"{self.cfg.bench_dir / 'install-deps.sh'}")
        subprocess.run([str(self.cfg.bench_dir / "install-deps.sh")],
                       check=False, stdout=sys.stderr)

    def stop_all(self):
        if self.cfg.run_dir.is_dir():
            subprocess.run([str(self.cfg.bench_dir / "ctl.sh"), "stop", "all"],
                           env=self.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    def ports(self):
        return [self.cfg.redis_port, self.cfg.upstream_port,
                self.cfg.upstream_tls_port, 18001, self.cfg.ceil_port, 18010,
                18011, 18020]


def redis_flush(cfg):
    """FLUSHALL on the bench's Redis (run.sh does it before each target)."""
    r = subprocess.run(["redis-cli", "-p", str(cfg.redis_port), "flushall"],
                       capture_output=True, text=True)
    if r.returncode != 0 or "OK" not in r.stdout:
        die(f"redis-cli -p {cfg.redis_port} flushall: {r.stdout}{r.stderr}")


def check_ready(cfg, harness):
    """bin/chatfcgi is built and no port of the bench is taken."""
    if not (REPO / "bin" / "chatfcgi").is_file():
        die("bin/chatfcgi is missing: run make")
    busy = [p for p in harness.ports() + [cfg.port] if port_busy(p)]
    if busy:
        die(f"ports already in use on 127.0.0.1: {busy} (another bench, or a "
            f"stack left running? ctl.sh status / ss -ltnp)")


# ------------------------------------------------------------ chatfcgi

class Chatfcgi:
    """One chatfcgi + nginx stack (deploy/local/stack.py) in its own run
    directory under build/bench/run/, on BENCH_PORT."""

    def __init__(self, cfg, name, workers, extra_env=None):
        self.cfg, self.name, self.workers = cfg, name, workers
        self.run_dir = cfg.out / "run" / name
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        env = {
            "CHATFCGI_REDIS_URL": f"redis://127.0.0.1:{cfg.redis_port}/0",
            "CHATFCGI_UPSTREAM_URL": f"http://127.0.0.1:{cfg.upstream_port}/v1",
            "CHATFCGI_API_KEY": "sk-fake",
            "CHATFCGI_MODEL": "fake-1",
            "CHATFCGI_UPSTREAM_SYSTEM_PROMPT": SYSTEM_PROMPT,
            "CHATFCGI_UPSTREAM_TIMEOUT_MS": "30000",
            "CHATFCGI_WORKERS": str(workers),
            # Like the peers and the ceilings, which log nothing per request.
            "CHATFCGI_ACCESS_LOG": "off",
            "CHATFCGI_NGINX_ACCESS_LOG": "off",
            # One nginx worker, as the peers' fronts have: sized for
            # 10,000 streams under this host's open-files limit, the local
            # nginx would take three (held.py asks for that).
            "CHATFCGI_NGINX_STREAMS": "1000",
        }
        env.update(extra_env or {})
        self.env = env
        self.stack = stack_mod.Stack(self.run_dir, cfg.port, env=env,
                                     progress=None)
        self.url = self.stack.url

    def start(self):
        progress(f"starting chatfcgi ({self.workers} workers) on {self.url}, "
                 f"run dir {self.run_dir.relative_to(REPO)}")
        try:
            self.stack.start()
        except stack_mod.StackError as e:
            die(f"chatfcgi stack did not start: {e}")
        return self

    @property
    def pid_file(self):
        return self.run_dir / "chatfcgi.pid"

    @property
    def nginx_pid_file(self):
        return self.run_dir / "nginx" / "nginx.pid"

    def master_pid(self):
        return self.stack.pid("chatfcgi")

    def nginx_pid(self):
        return self.stack.pid("nginx")

    def status(self):
        return http_json(f"{self.url}/api/status")

    def chat_workers(self):
        return [p for p in self.status()["processes"] if p["role"] == "chat"]

    def served(self):
        return sum(p["requests"] for p in self.chat_workers())

    def wait_workers(self, timeout_s):
        """Until every chat worker of the pool is up: /api/healthz answers
        as soon as the first one is, and a burst must not race the forks."""
        deadline = time.monotonic() + timeout_s
        up = 0
        while time.monotonic() < deadline:
            up = sum(1 for p in self.chat_workers()
                     if p["state"] != "starting")
            if up >= self.workers:
                return
            time.sleep(0.5)
        die(f"{self.name}: {up} of {self.workers} workers up after "
            f"{timeout_s:.0f} s")

    def metrics(self):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.url}/api/metrics", timeout=5) as r:
            return r.read().decode()

    def counters(self, name):
        """{labels: value} of one counter of /api/metrics."""
        return {m.group(1): int(m.group(2)) for m in re.finditer(
            rf'^{name}\{{([^}}]*)\}} (\d+)$', self.metrics(), re.M)}

    def health(self):
        """What the pool says about itself (before it stops) and what its
        log says: request counts by status, worker deaths, log warnings and
        errors."""
        h = {"name": self.name, "workers": self.workers}
        try:
            st = self.status()
            for k in ("worker_deaths", "watchdog_kills", "queue_timeouts",
                      "slow_requests", "max_children_reached"):
                h[k] = st.get(k)
            h["by_status"] = {
                k.split('"')[1]: v for k, v in
                self.counters("chatfcgi_requests_total").items() if v}
        except (OSError, ValueError) as e:
            h["status_error"] = str(e)
        return h

    def stop(self):
        h = self.health() if self.stack.pid("chatfcgi") else {"name": self.name}
        self.stack.stop()
        h.update(scan_log(self.run_dir / "chatfcgi.log"))
        return h


LOG_LEVEL = re.compile(r"^\S+ \d+ \S+ (warn|error|crit|fatal)\b(.*)$")


def scan_log(path):
    """Counts of warn/error lines in a chatfcgi log and their first few
    distinct messages (request ids and numbers folded)."""
    counts, samples = {}, []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = LOG_LEVEL.match(line.rstrip("\n"))
                if not m:
                    continue
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
                msg = re.sub(r"req=\w+", "req=…", m.group(2).strip())
                msg = re.sub(r"\d+", "N", msg)
                if msg not in samples and len(samples) < 6:
                    samples.append(f"{m.group(1)}: {msg}")
    except OSError:
        pass
    return {"log_counts": counts, "log_samples": samples}


# ------------------------------------------------------------ report

def health_report(healths, out, note=None):
    out.append("## chatfcgi's own account (per stack, read before it stopped)")
    out.append("")
    for h in healths:
        by = ", ".join(f"{k}: {v}" for k, v in sorted(h.get("by_status", {}).items()))
        logc = ", ".join(f"{k} {v}" for k, v in sorted(h.get("log_counts", {}).items()))
        out.append(f"{h['name']:<12} answers {{{by}}}; worker deaths "
                   f"{h.get('worker_deaths', '-')}, watchdog kills "
                   f"{h.get('watchdog_kills', '-')}, queue timeouts "
                   f"{h.get('queue_timeouts', '-')}; log: {logc or 'no warn/error lines'}")
        if h.get("status_error"):
            out.append(f"    status/metrics unreadable: {h['status_error']}")
        for s in h.get("log_samples", []):
            out.append(f"    {s}")
    if note:
        out.append(note)
    out.append("")


def host_line():
    s0 = cpu_snap()
    time.sleep(1.0)
    busy, _ = cpu_pct(s0, cpu_snap())
    load = os.getloadavg()
    return (f"host: {os.cpu_count()} CPUs, {platform.release()}, load "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, CPU busy before start "
            f"{busy:.0f}% (other work on the host skews every figure)")


def record(started, text):
    """Append a report to results.md (append only: the history stays)."""
    new = not RESULTS.exists()
    with open(RESULTS, "a") as f:
        if new:
            f.write("# make bench results\n\nEach run of `make bench` "
                    "appends its whole report here, newest last "
                    "(tests/bench/README.md explains the columns).\n")
        f.write(f"\n## {started:%Y-%m-%d %H:%M} UTC, {git_rev()}\n\n"
                f"```text\n{text}\n```\n")
    progress(f"appended to {RESULTS.relative_to(REPO)}")


def finish_report(cfg, started, out):
    """The report's Problems section, then print it and (unless
    --no-record) append it to results.md. Returns the exit status: 1 when
    something went wrong on the way."""
    if PROBLEMS:
        out += ["## Problems", ""] + [f"- {p}" for p in PROBLEMS] + [""]
    text = "\n".join(out)
    print(text, flush=True)
    if cfg.record:
        record(started, text)
    return 1 if PROBLEMS else 0
