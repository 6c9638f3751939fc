"""The process manager (app/master.c, app/worker.c, app/listener.c,
app/scoreboard.c, app/metrics.c) through the real stack: a worker killed
in the middle of a request, reloads under load, a graceful stop during
streams, recycling, the request deadline, the slow log, the dynamic pool,
backpressure, status access, the crash-loop backoff, pm single behind
spawn-fcgi, systemd socket activation and the privilege drop; and what
the status page, a local user and a compromised worker can reach.

Measured figures (respawn time, reload failures, stop timings, backoff
delays) are printed as "MEASURED ..." lines: run with -s to see them.

Every wait is bounded; every process started here is stopped by pid in a
finally block (stacks from stack_factory are also stopped by the fixture).
"""

import functools
import json
import mmap
import os
import pwd
import re
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

import fcgi_client
import stack as stack_mod  # deploy/local/stack.py, on sys.path via conftest
from helpers import LocalModel, assert_json_error, new_session, post_chat
from c_layout import compiled_values
from netns import in_chroot
from polling import wait_for
from redis_cluster import redis_command

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf" / "chatfcgi.conf"
WEB_USER = "www-data"
IS_ROOT = os.geteuid() == 0

STACK_ENV = {"CHATFCGI_WORKERS": "4"}


# ---------------------------------------------------------------- helpers

def measured(what, value):
    print(f"\nMEASURED {what}: {value}", flush=True)


def children(pid):
    """Pids of the direct children of a single-threaded process (zombies
    included until they are reaped)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def proc_ids(pid):
    """(real uid, real gid) from /proc/<pid>/status, or None if gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    uid = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text, re.M)
    gid = re.search(r"^Gid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text, re.M)
    return tuple(map(int, uid.groups())), tuple(map(int, gid.groups()))


def status(http, st, timeout=5):
    r = http.get(f"{st.url}/api/status", timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def chat_rows(st_json):
    return [p for p in st_json["processes"] if p["role"] == "chat"]


def rows_in(http, st, state):
    """The status rows of the chat workers in one state."""
    return [p for p in chat_rows(status(http, st)) if p["state"] == state]


def new_children(pid, n, *old):
    """The children of pid when there are n and none is in the old lists,
    else None (for wait_for)."""
    kids = children(pid)
    seen = set().union(*map(set, old)) if old else set()
    return kids if len(kids) == n and not set(kids) & seen else None


def metrics(http, st):
    """{'name{labels}': value} of GET /api/metrics."""
    r = http.get(f"{st.url}/api/metrics", timeout=5)
    assert r.status_code == 200, r.text
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def is_counter(name):
    base = name.split("{")[0]
    return base.endswith(("_total", "_count", "_sum", "_bucket"))


def assert_counters_monotonic(before, after):
    for name, value in before.items():
        if is_counter(name):
            assert name in after, name
            assert after[name] >= value, \
                f"{name} went backwards: {value} -> {after[name]}"


def chat(http, st, message="hello", timeout=10, **fields):
    return post_chat(http, st, message, timeout=timeout, **fields)


def read_stream(st, message, timeout=15):
    """POST a streaming turn; returns (SSE lines, time 'event: done' came,
    the joined delta text)."""
    lines, done_at = [], None
    with new_session() as s:
        r = s.post(f"{st.url}/api/chat", json={"message": message,
                                               "stream": True},
                   stream=True, timeout=timeout)
        assert r.status_code == 200, r.text
        for line in r.iter_lines(decode_unicode=True):
            lines.append(line)
            if line == "event: done":
                done_at = time.monotonic()
    text = "".join(json.loads(x[6:])["content"] for x in lines
                   if x.startswith("data: ") and '"content"' in x)
    return lines, done_at, text


def log_text(st):
    return Path(st.log_path("chatfcgi")).read_text(errors="replace")


@contextmanager
def own_stack(stack_factory, env):
    """A stack of its own, stopped when the test ends (the fixture stops it
    again, harmlessly, and keeps its dir when the module failed)."""
    st = stack_factory(env)
    try:
        yield st
    finally:
        st.stop()


class Parallel:
    """Run fn(i) in n threads; results[i] is (value or exception, start,
    end) in time.monotonic()."""

    def __init__(self, n, fn):
        self.results = [None] * n
        self.threads = [threading.Thread(target=self._run, args=(i, fn),
                                         daemon=True) for i in range(n)]

    def _run(self, i, fn):
        t0 = time.monotonic()
        try:
            value = fn(i)
        except Exception as e:  # noqa: BLE001 (reported by the test)
            value = e
        self.results[i] = (value, t0, time.monotonic())

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout):
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in self.threads if t.is_alive()]
        assert not alive, f"{len(alive)} threads still running"
        return self.results


def stop_pid(proc, sig=signal.SIGTERM, timeout=5.0):
    """Stop a Popen we started: sig, then SIGKILL to its process group
    (it was started in a session of its own)."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers (workers)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def base_env(st, **extra):
    """A clean environment for a chatfcgi started here, against the stack's
    Redis and model; no CHATFCGI_* of the shell."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHATFCGI_") and k != "_CHATFCGI_REEXEC"}
    env.update({
        "CHATFCGI_REDIS_URL": f"redis://127.0.0.1:{st.redis_port}/0",
        "CHATFCGI_UPSTREAM_URL": f"{st.model_url}/v1",
        "CHATFCGI_MODEL": "local-eliza",
    })
    if IS_ROOT:
        env["CHATFCGI_USER"] = WEB_USER
    env.update(extra)
    return env


def chatfcgi_bin():
    return str(stack_mod.resolve_bin(os.environ.get("CHATFCGI_BIN")))


@contextmanager
def temp_dir():
    d = tempfile.mkdtemp(prefix="cfpmt")
    os.chmod(d, 0o755)  # the workers (www-data) may need to reach it
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------ FastCGI, straight to a socket

def fcgi_request(address, method="POST", uri="/api/chat", body=b"",
                 timeout=10.0):
    """One request on a unix socket path, with fcgi_client.py; returns
    (status, {lower-case header: value}, body bytes). A connection cut
    inside the answer raises ConnectionError, no answer in time
    TimeoutError: both OSError, as the callers that measure expect."""
    try:
        r = fcgi_client.fcgi_request(
            address, fcgi_client.chat_params(method, uri,
                                             content_length=len(body)),
            body, timeout=timeout)
    except fcgi_client.FcgiTimeout as e:
        raise TimeoutError(str(e)) from e
    except fcgi_client.FcgiError as e:
        raise ConnectionError(str(e)) from e
    return r.status, r.headers, r.body


def fcgi_chat(address, message="hello", timeout=10.0):
    body = json.dumps({"message": message}).encode()
    return fcgi_request(address, body=body, timeout=timeout)


# ------------------------------------------ 1. kill -9 of a busy worker

def test_kill_busy_worker_fails_only_its_request(stack, http, model):
    master = stack.pid("chatfcgi")
    assert master
    kids0 = wait_for(lambda: new_children(master, 5), 3)
    assert kids0 and len(kids0) == 5, children(master)  # 4 chat + control
    m0 = metrics(http, stack)
    model.set(delay_ms=2000)

    def turn(i):
        with new_session() as s:
            return chat(s, stack, f"I need request {i}", timeout=15)

    par = Parallel(3, turn).start()
    busy = wait_for(lambda: (lambda rows: rows if len(rows) >= 3 else None)(
        rows_in(http, stack, "upstream")), 3, 0.02)
    assert busy, status(http, stack)
    victim = busy[0]
    victim_rid = victim["request"].rpartition("req=")[2]
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    respawned = None
    while time.monotonic() - t0 < 2.0:
        kids = children(master)
        if victim["pid"] not in kids and len(kids) == len(kids0):
            respawned = time.monotonic() - t0
            break
        time.sleep(0.005)
    measured("respawn after kill -9 of a busy worker",
             f"{respawned * 1000:.1f} ms" if respawned else "none in 2 s")
    assert respawned is not None, children(master)
    assert respawned < 0.1

    results = par.join(15)
    for value, _, _ in results:
        assert not isinstance(value, Exception), value
    failed = [v for v, _, _ in results if v.status_code != 200]
    assert len(failed) == 1, [(v.status_code, v.text) for v, _, _ in results]
    bad = failed[0]
    assert bad.status_code in (502, 503), bad.text
    assert bad.headers.get("Content-Type", "").startswith("application/json")
    assert "error" in bad.json()
    assert bad.headers.get("X-Request-Id") == victim_rid, \
        (bad.headers, victim)

    m1 = metrics(http, stack)
    assert_counters_monotonic(m0, m1)
    assert m1['chatfcgi_requests_total{status="200"}'] >= \
        m0['chatfcgi_requests_total{status="200"}'] + 2
    assert m1["chatfcgi_worker_deaths_total"] == \
        m0["chatfcgi_worker_deaths_total"] + 1
    assert "killed by signal 9" in log_text(stack)

    # The dead worker's request is off the count of active workers: four
    # turns at once on the four chat workers make the most ever active 4,
    # not 5.
    par = Parallel(4, turn).start()
    assert all(v.status_code == 200 for v, _, _ in par.join(15))
    assert status(http, stack)["max_active_processes"] == 4


# ------------------------------------------------- 2. reload under load

def test_reload_under_load_drops_nothing(stack, http, model):
    master = stack.pid("chatfcgi")
    expected = 5  # 4 chat workers + the control worker
    kids0 = wait_for(lambda: new_children(master, expected), 3)
    assert kids0, children(master)
    s0 = status(http, stack)
    m0 = metrics(http, stack)
    log_len = len(log_text(stack))
    stop = threading.Event()
    outcomes = [[] for _ in range(8)]

    def load(i):
        with new_session() as s:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = chat(s, stack, f"I feel load {i} {n}", timeout=10)
                    outcomes[i].append(r.status_code)
                except requests.RequestException as e:
                    outcomes[i].append(repr(e))

    t0 = time.monotonic()
    par = Parallel(8, load).start()
    try:
        time.sleep(3)
        os.kill(master, signal.SIGHUP)
        gen1 = wait_for(lambda: new_children(master, expected, kids0), 3,
                        0.01)
        time.sleep(max(0.0, t0 + 6.5 - time.monotonic()))
        os.kill(master, signal.SIGHUP)
        time.sleep(max(0.0, t0 + 10 - time.monotonic()))
    finally:
        stop.set()
        par.join(15)
    assert stack.pid("chatfcgi") == master  # the same process, re-executed
    kids2 = wait_for(lambda: new_children(master, expected, kids0,
                                          gen1 or []), 5)
    all_codes = [c for o in outcomes for c in o]
    failures = [c for c in all_codes if c != 200]
    measured("reload under load", f"{len(all_codes)} requests, "
             f"{len(failures)} failed {failures[:5]}")
    assert gen1, ("after the first reload the workers were not all new",
                  kids0, children(master))
    assert kids2, ("after the second reload the workers were not all new",
                   kids0, gen1, children(master))
    assert len(all_codes) > 100
    assert not failures
    log = log_text(stack)[log_len:]
    assert log.count("reloading: exec") == 2, log[-3000:]
    s1 = status(http, stack)
    m1 = metrics(http, stack)
    assert s1["accepted_conn"] >= s0["accepted_conn"] + len(all_codes)
    assert_counters_monotonic(m0, m1)
    assert m1['chatfcgi_requests_total{status="200"}'] >= \
        m0['chatfcgi_requests_total{status="200"}'] + len(all_codes)
    assert {p["pid"] for p in s1["processes"]} == set(kids2)


def test_reload_lets_old_workers_finish_streams(stack, http, model):
    master = stack.pid("chatfcgi")
    kids0 = wait_for(lambda: new_children(master, 5), 3)
    assert kids0, children(master)
    reply = "alpha beta gamma delta epsilon zeta eta theta"
    model.set(chunk_delay_ms=250, reply=reply)
    par = Parallel(2, lambda i: read_stream(stack, f"reload stream {i}"))
    par.start()
    streaming = wait_for(lambda: len(rows_in(http, stack, "streaming")) == 2,
                         2, 0.02)
    assert streaming, status(http, stack)
    t_hup = time.monotonic()
    os.kill(master, signal.SIGHUP)
    new = wait_for(lambda: len(set(children(master)) - set(kids0)) == 5, 2,
                   0.01)
    assert new, (kids0, children(master))
    results = par.join(10)
    for value, _, _ in results:
        assert not isinstance(value, Exception), value
        lines, done_at, text = value
        assert "event: done" in lines and text == reply, lines
        assert done_at > t_hup + 0.5
    final = wait_for(lambda: new_children(master, 5, kids0), 3)
    assert final, (kids0, children(master))
    assert chat(http, stack, "after the reload").status_code == 200


class DirectMaster:
    """A chatfcgi master started here on a config file of its own (the
    stack's launcher always passes conf/chatfcgi.conf, and a reload re-reads
    the master's unchanged environment, so a changed or broken setting can
    only come from a file), against the stack's Redis and model."""

    def __init__(self, st, d):
        self.st, self.dir = st, d
        self.sock, self.log = d / "c.sock", d / "chatfcgi.log"
        self.conf = d / "c.conf"
        self.proc = None
        self.wrapped = False

    def write_conf(self, **keys):
        """Top-level keys; a value of None leaves the key out."""
        top = {"listen": self.sock, "listen_mode": "0666",
               "status_listen": "off", "workers": 2,
               "user": WEB_USER if IS_ROOT else None,
               "error_log": self.log, "access_log": "off"}
        top.update(keys)
        text = "".join(f"{k} = {v}\n" for k, v in top.items()
                       if v is not None)
        text += (f"[redis]\nurl = redis://127.0.0.1:{self.st.redis_port}/0\n"
                 f"[upstream]\nurl = {self.st.model_url}/v1\n"
                 f"model = local-eliza\n")
        self.conf.write_text(text)

    def spawn(self, wrapper=(), umask=None):
        """Start the master, through a wrapper command (strace, unshare)
        when one is given, which then is self.proc and the master its
        only child; umask: the one chatfcgi starts with."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CHATFCGI_") and k != "_CHATFCGI_REEXEC"}
        self.wrapped = bool(wrapper)
        with open(self.dir / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [*wrapper, chatfcgi_bin(), "-c", str(self.conf)],
                env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                start_new_session=True,
                preexec_fn=None if umask is None else lambda: os.umask(umask))

    def master_pid(self):
        """The master's pid (as this test sees it), or None."""
        if not self.wrapped:
            return self.proc.pid
        kids = children(self.proc.pid)
        return kids[0] if len(kids) == 1 else None

    def workers(self, n):
        """The master's n children once it has that many and its socket
        exists (for wait_for), else None."""
        pid = self.master_pid()
        kids = children(pid) if pid else []
        return kids if len(kids) == n and self.sock.exists() else None

    def start(self, workers, wrapper=()):
        self.spawn(wrapper)
        kids = wait_for(lambda: self.workers(workers), 5)
        assert kids, (self.master_pid(), self.log_text())
        return kids

    def log_text(self):
        return self.log.read_text() if self.log.exists() else ""

    def stop(self):
        if self.proc is not None:
            stop_pid(self.proc)


@contextmanager
def direct_master(st):
    with temp_dir() as d:
        m = DirectMaster(st, d)
        try:
            yield m
        finally:
            m.stop()


def test_reload_with_broken_config_is_refused(stack, http):
    with direct_master(stack) as m:
        m.write_conf(workers=2)
        kids0 = m.start(2)
        pid = m.proc.pid
        code, _, body = fcgi_chat(m.sock)
        assert code == 200, body

        # A changed setting: 3 workers instead of 2.
        m.write_conf(workers=3)
        os.kill(pid, signal.SIGHUP)
        kids1 = wait_for(lambda: new_children(pid, 3, kids0), 5)
        assert kids1, (kids0, children(pid), m.log_text())
        assert m.proc.poll() is None
        code, _, body = fcgi_chat(m.sock)
        assert code == 200, body

        # A file that does not parse: refused, same workers, still serving.
        m.write_conf(workers="banana")
        os.kill(pid, signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in m.log_text(), 3), \
            m.log_text()
        time.sleep(0.3)
        assert m.proc.poll() is None
        assert sorted(children(pid)) == sorted(kids1)
        for i in range(3):
            code, _, body = fcgi_chat(m.sock, f"still there {i}")
            assert code == 200, body


@pytest.mark.parametrize("bad", [
    {"user": "no-such-user-chatfcgi"},
    {"pid_file": "/nonexistent-dir/chatfcgi.pid"},
    {"error_log": "/nonexistent-dir/chatfcgi.log"},
], ids=["unknown-user", "pid-file-in-missing-dir", "error-log-in-missing-dir"])
def test_reload_with_unusable_config_keeps_serving(stack, http, bad):
    """A file that parses but cannot be used (a user that does not exist,
    a pid file or log in a directory that does not exist; `chatfcgi -t`
    accepts all three): a reload must not take the pool down. The running
    master is the only thing that can refuse, since after its exec nothing
    of the old process is left to fall back to."""
    with direct_master(stack) as m:
        m.write_conf()
        m.start(2)
        pid = m.proc.pid
        assert fcgi_chat(m.sock)[0] == 200
        m.write_conf(**bad)
        check = subprocess.run([chatfcgi_bin(), "-t", "-c", str(m.conf)],
                               capture_output=True, timeout=10,
                               env={"PATH": os.environ.get("PATH", "")})
        assert check.returncode == 0, check  # it parses
        os.kill(pid, signal.SIGHUP)
        time.sleep(1.5)  # orphaned workers notice within 1 s
        alive = m.proc.poll() is None
        serving = None
        try:
            serving = fcgi_chat(m.sock, "after the reload", timeout=3)[0]
        except OSError as e:
            serving = repr(e)
        measured(f"reload with {bad}",
                 f"master alive: {alive} (rc {m.proc.returncode}), "
                 f"a turn after 1.5 s: {serving}")
        assert alive, ("the master exited on reload", m.log_text()[-1500:])
        assert serving == 200, m.log_text()[-1500:]


def restart_warnings(log):
    """The reload's lines about socket keys it cannot apply."""
    return [line for line in log.splitlines()
            if " warn " in line and "reload: " in line
            and "takes effect after a restart" in line]


def reload_to(m, pid, kids, n):
    """SIGHUP, then the n workers of the new generation."""
    os.kill(pid, signal.SIGHUP)
    new = wait_for(lambda: new_children(pid, n, kids), 5)
    assert new, (kids, children(pid), m.log_text()[-1500:])
    return new


def test_reload_names_socket_keys_it_cannot_apply(stack, http):
    """listen_backlog and listen_mode shape the socket, which a reload
    keeps: each changed key gets a warning with both values, while the
    pool serves on, on the socket as it was (mode still 0666). A second
    reload warns again, as the socket still differs from the file."""
    with direct_master(stack) as m:
        m.write_conf(listen_backlog=511)
        kids = m.start(2)
        pid = m.proc.pid
        m.write_conf(listen_backlog=64, listen_mode="0600")
        load = Parallel(4, lambda i: [fcgi_chat(m.sock, f"during {i}")[0]
                                      for _ in range(5)]).start()
        kids = reload_to(m, pid, kids, 2)
        codes = [r[0] for r in load.join(30)]
        assert all(c == [200] * 5 for c in codes), codes
        warned = restart_warnings(m.log_text())
        assert any("listen_backlog changed from 511 to 64" in w
                   for w in warned), m.log_text()[-2000:]
        assert any("listen_mode changed from 0666 to 0600" in w
                   for w in warned), warned
        assert len(warned) == 2, warned
        assert stat.S_IMODE(m.sock.stat().st_mode) == 0o666
        assert fcgi_chat(m.sock, "after the reload")[0] == 200

        m.write_conf(listen_backlog=64, listen_mode="0600", workers=3)
        reload_to(m, pid, kids, 3)
        again = restart_warnings(m.log_text())[2:]
        assert any("listen_backlog changed from 511 to 64" in w
                   for w in again), again
        assert fcgi_chat(m.sock, "after the second reload")[0] == 200


def test_reload_of_pool_keys_names_no_socket_key(stack, http):
    """Keys a reload applies (workers) say nothing about sockets, also
    after a socket key went back to the running value: the comparison is
    with what the socket was made from, not with the previous file."""
    with direct_master(stack) as m:
        m.write_conf(listen_backlog=511)
        kids = m.start(2)
        pid = m.proc.pid
        m.write_conf(listen_backlog=128)
        kids = reload_to(m, pid, kids, 2)
        assert len(restart_warnings(m.log_text())) == 1, m.log_text()
        m.write_conf(listen_backlog=511, workers=3)
        reload_to(m, pid, kids, 3)
        assert len(restart_warnings(m.log_text())) == 1, \
            restart_warnings(m.log_text())
        assert fcgi_chat(m.sock, "after the reloads")[0] == 200


def test_check_notes_the_keys_a_running_master_keeps(stack, http):
    """`chatfcgi -t` on the file of a running master (found through its
    pid_file) says which keys need a restart; the file is still valid."""
    def check(m):
        return subprocess.run([chatfcgi_bin(), "-t", "-c", str(m.conf)],
                              capture_output=True, text=True, timeout=10,
                              env={"PATH": os.environ.get("PATH", "")})

    with direct_master(stack) as m:
        m.write_conf(pid_file=m.dir / "c.pid")
        m.start(2)
        m.write_conf(pid_file=m.dir / "c.pid", listen_backlog=64)
        out = check(m)
        assert out.returncode == 0, out
        assert f"a master is running (pid {m.proc.pid})" in out.stdout, out
        assert "listen_backlog" in out.stdout and "restart" in out.stdout
        m.stop()
        out = check(m)
        assert out.returncode == 0 and "note" not in out.stdout, out


# ------------------------------------------ 3. graceful stop and streams

def test_graceful_stop_finishes_streams(stack_factory, http):
    with own_stack(stack_factory, {"CHATFCGI_WORKERS": "6"}) as st:
        model = LocalModel.of(st, http)
        reply = "one two three four five six seven eight nine ten"
        model.set(chunk_delay_ms=300, reply=reply)
        proc = st.procs["chatfcgi"]
        master = proc.pid

        def stream(i):
            return read_stream(st, f"stream {i}")

        par = Parallel(5, stream).start()
        time.sleep(1.0)
        t_term = time.monotonic()
        os.kill(master, signal.SIGTERM)
        time.sleep(0.1)
        t = time.monotonic()
        late = chat(http, st, "too late", timeout=10)
        late_s = time.monotonic() - t
        # Watch the master while the streams go on: it must outlive them.
        t_exit = None
        while time.monotonic() - t_term < 12:
            if proc.poll() is not None:
                t_exit = time.monotonic()
                break
            time.sleep(0.01)
        exited = t_exit is not None
        results = par.join(5)
        ends = []
        for value, _, end in results:
            assert not isinstance(value, Exception), value
            lines, done_at, text = value
            assert "event: done" in lines, lines
            assert "event: error" not in lines, lines
            assert text == reply, lines
            ends.append(done_at)
        assert exited, "the master did not exit within 12 s of SIGTERM"
        measured("graceful stop", f"5/5 streams done, last "
                 f"{max(ends) - t_term:.2f} s after SIGTERM; late request "
                 f"{late.status_code} in {late_s * 1000:.0f} ms; master "
                 f"exited {t_exit - t_term:.2f} s after SIGTERM, "
                 f"{(t_exit - max(ends)) * 1000:.0f} ms after the last "
                 f"stream ended (rc {proc.returncode})")
        assert_json_error(late, 503, "unavailable")
        assert late_s < 1.0
        assert proc.returncode == 0
        assert t_exit >= max(ends) - 0.02, (t_exit, ends)
        assert t_exit - max(ends) < 1.0, (t_exit, ends)
        assert min(ends) > t_term  # they were still streaming at SIGTERM
        assert not children(master)
        assert not st.socket_path.exists()
        assert not st.status_socket_path.exists()


def test_graceful_stop_refuses_queued_requests(stack_factory, http):
    """master.c stop_listening(): "the listening socket is shut down for
    every process that shares it (waiting connections are refused, and the
    web server answers 503)". A request already waiting in the socket's
    queue when SIGTERM comes (every worker busy with a stream) must get its
    503 at once, not when the streams end."""
    with own_stack(stack_factory, {"CHATFCGI_WORKERS": "2"}) as st:
        proc = st.procs["chatfcgi"]
        LocalModel.of(st, http).set(
            chunk_delay_ms=300,
            reply="one two three four five six seven eight nine ten")
        streams = Parallel(2, lambda i: read_stream(st, f"s{i}")).start()
        assert wait_for(lambda: len(rows_in(http, st, "streaming")) == 2,
                        3, 0.02), status(http, st)

        def queued(i):
            with new_session() as sess:
                return chat(sess, st, "waiting in the queue", timeout=15)

        waiting = Parallel(1, queued).start()
        time.sleep(0.5)  # it waits in the backlog: no worker is free
        assert waiting.threads[0].is_alive()
        t_term = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        (value, _, end), = waiting.join(15)
        done = streams.join(15)
        assert not isinstance(value, Exception), value
        ends = [d[2] for d in done]
        measured("request queued at SIGTERM",
                 f"{value.status_code} after {end - t_term:.2f} s; the "
                 f"streams ended {max(ends) - t_term:.2f} s after SIGTERM")
        for v, _, _ in done:
            assert not isinstance(v, Exception) and "event: done" in v[0]
        assert_json_error(value, 503, "unavailable")
        assert end - t_term < 0.5, (end - t_term, max(ends) - t_term)
        assert proc.wait(10) == 0


def test_stop_after_reload_removes_sockets(stack_factory, http):
    """A graceful stop removes the socket files it made (as the test above
    shows); a reload in between must not change that: it is the same
    master, and the sockets are the same sockets."""
    with own_stack(stack_factory, {"CHATFCGI_WORKERS": "2"}) as st:
        proc = st.procs["chatfcgi"]
        kids0 = wait_for(lambda: new_children(proc.pid, 3), 3)
        assert kids0
        os.kill(proc.pid, signal.SIGHUP)
        assert wait_for(lambda: new_children(proc.pid, 3, kids0), 3), \
            children(proc.pid)
        assert chat(http, st, "after the reload").status_code == 200
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(5) == 0
        left = [str(p) for p in (st.socket_path, st.status_socket_path)
                if p.exists()]
        assert not left, f"socket files left after the stop: {left}"


def _one_long_stream(st, http):
    reply = "one two three four five six seven eight nine ten"
    LocalModel.of(st, http).set(chunk_delay_ms=300, reply=reply)
    par = Parallel(1, lambda i: read_stream(st, "a long one")).start()
    assert wait_for(lambda: any(p["state"] == "streaming" for p in
                                chat_rows(status(http, st))), 3, 0.02), \
        status(http, st)
    return par


def _cut_short(value):
    """A stream ended before its done event: an exception from the client
    (nginx closed the chunked answer) or lines without the event."""
    return isinstance(value, Exception) or "event: done" not in value[0]


def _stop_during_stream(st, http, sig):
    """Send sig to the master while one long stream runs: (the master's
    exit code, None if it did not exit within 5 s; seconds it took; the
    stream's outcome, as Parallel gives it)."""
    proc = st.procs["chatfcgi"]
    par = _one_long_stream(st, http)
    t = time.monotonic()
    os.kill(proc.pid, sig)
    try:
        rc = proc.wait(5)
    except subprocess.TimeoutExpired:
        rc = None
    took = time.monotonic() - t
    (value, _, _), = par.join(10)
    return rc, took, value


def test_graceful_timeout_bounds_the_stop(stack_factory, http):
    with own_stack(stack_factory,
                   {"CHATFCGI_GRACEFUL_TIMEOUT_S": "1"}) as st:
        rc, took, value = _stop_during_stream(st, http, signal.SIGTERM)
        measured("graceful_timeout_s=1 with a 3 s stream",
                 f"master exited {took:.2f} s after SIGTERM (rc {rc})")
        assert rc == 0
        assert 0.9 <= took < 2.0, took
        assert _cut_short(value), value
        assert "still busy at the stop deadline" in log_text(st)


def test_fast_stop_on_sigint(stack_factory, http):
    with own_stack(stack_factory, {}) as st:
        rc, took, value = _stop_during_stream(st, http, signal.SIGINT)
        measured("fast stop (SIGINT) during a stream",
                 f"master exited {took * 1000:.0f} ms after SIGINT (rc {rc})")
        assert rc == 0
        assert took < 1.0, took
        assert _cut_short(value), value


def test_workers_exit_when_the_master_dies(stack_factory, http):
    """An orphaned worker is told by the kernel, says "the master is gone;
    exiting" -- and must then exit, not wait once more and serve another
    request with nobody left to replace or stop it."""
    with own_stack(stack_factory, {"CHATFCGI_WORKERS": "2"}) as st:
        proc = st.procs["chatfcgi"]
        kids = wait_for(lambda: new_children(proc.pid, 3), 3)
        assert kids
        # The kernel's signal, sent by someone else: the master lives.
        os.kill(kids[0], signal.SIGUSR2)
        time.sleep(0.3)
        assert stack_mod.pid_alive(kids[0])
        assert "the master is gone" not in log_text(st)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        t = time.monotonic()
        said = wait_for(lambda: log_text(st).count(
            "the master is gone; exiting") == 3, 2, 0.01)
        t_said = time.monotonic() - t
        try:
            after = fcgi_chat(st.socket_path, "anyone there?", timeout=3)[0]
        except OSError as e:
            after = repr(e)
        gone = wait_for(lambda: not any(stack_mod.pid_alive(p)
                                        for p in kids), 3, 0.01)
        t_gone = time.monotonic() - t
        measured("orphaned workers after kill -9 of the master",
                 f"all said 'exiting' after {t_said:.2f} s; a request "
                 f"then got {after}; all gone after {t_gone:.2f} s")
        assert said, log_text(st)[-1500:]
        assert gone, [p for p in kids if stack_mod.pid_alive(p)]
        assert after != 200, \
            "a worker served a request after saying it was exiting"
        assert t_gone - t_said < 0.3, (t_said, t_gone)


# --------------------------------------------------------- 4. max_requests

def voluntary_switches(pid):
    """How often pid has waited so far (/proc/PID/status), or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", text,
                         re.M).group(1))


def test_a_big_idle_pool_sleeps_and_hears_of_the_master(stack):
    """Idle workers wake for housekeeping about a hundred times a second
    in all (3 s each in a pool of 300; every second each, before: 7% of a
    core for 4,000 idle workers), not to see whether the master lives: the
    kernel tells each of them at once when it dies."""
    n = 300
    with direct_master(stack) as m:
        m.write_conf(workers=n)
        kids = m.start(n)
        time.sleep(0.5)  # every worker in its accept()
        before = {k: voluntary_switches(k) for k in kids}
        time.sleep(2.0)
        woke_twice = [k for k in kids
                      if voluntary_switches(k) - before[k] >= 2]
        os.kill(m.proc.pid, signal.SIGKILL)
        m.proc.wait(5)
        t = time.monotonic()
        said = wait_for(lambda: m.log_text().count(
            "the master is gone; exiting") == n, 5, 0.01)
        t_said = time.monotonic() - t
        gone = wait_for(lambda: not any(stack_mod.pid_alive(p)
                                        for p in kids), 5, 0.01)
        measured("a pool of 300 idle for 2 s, then its master killed",
                 f"{len(woke_twice)} workers woke twice; all said "
                 f"'exiting' after {t_said:.2f} s")
        assert not woke_twice, f"{len(woke_twice)} of {n} woke twice in 2 s"
        # Each would notice within its 3 s wake-up otherwise: all 300
        # within 2 s by chance is (2/3)**300. (An ASan build's exits are
        # slow: each runs a leak check, 1.25 s for all 300 at most seen.)
        assert said and t_said < 2.0, (t_said, m.log_text()[-1000:])
        assert gone


def test_max_requests_recycles_workers(stack_factory, http):
    with own_stack(stack_factory, {"CHATFCGI_MAX_REQUESTS": "5",
                                   "CHATFCGI_WORKERS": "1"}) as st:
        pids, codes = [], []
        for i in range(12):
            r = chat(http, st, f"turn {i}")
            codes.append(r.status_code)
            rows = wait_for(lambda: chat_rows(status(http, st)), 2)
            pids.append(tuple(p["pid"] for p in rows))
        assert codes == [200] * 12, codes
        distinct = []
        for p in pids:
            assert len(p) <= 1, pids
            if p and (not distinct or distinct[-1] != p[0]):
                distinct.append(p[0])
        measured("max_requests=5, 12 turns", f"chat worker pids {distinct}")
        assert len(distinct) >= 3, pids
        recycles = wait_for(lambda: metrics(http, st)[
            "chatfcgi_worker_recycles_total"] >= 2, 2)
        assert recycles, metrics(http, st)
        assert metrics(http, st)["chatfcgi_worker_deaths_total"] == 0


# ---------------------------------------------------- 5. request_timeout

def test_request_timeout_answers_504_in_time(stack_factory, http):
    with own_stack(stack_factory, {"CHATFCGI_REQUEST_TIMEOUT_S": "1"}) as st:
        LocalModel.of(st, http).set(mode="hang")
        sid = "pm-timeout-1"
        t = time.monotonic()
        r = chat(http, st, "hello there", session_id=sid, timeout=10)
        took = time.monotonic() - t
        measured("request_timeout_s=1 with a hanging model",
                 f"{r.status_code} in {took:.2f} s")
        assert_json_error(r, 504, "upstream_timeout")
        assert 0.8 <= took < 2.0, took
        g = http.get(f"{st.url}/api/chat/{sid}", timeout=5)
        assert g.status_code == 404, g.text


def test_request_timeout_cuts_a_stream(stack_factory, http):
    with own_stack(stack_factory, {"CHATFCGI_REQUEST_TIMEOUT_S": "1"}) as st:
        LocalModel.of(st, http).set(
            chunk_delay_ms=300,
            reply="one two three four five six seven eight nine ten")
        sid = "pm-timeout-stream"
        t = time.monotonic()
        lines = []
        with new_session() as s:
            r = s.post(f"{st.url}/api/chat", json={
                "message": "hello", "stream": True, "session_id": sid},
                stream=True, timeout=10)
            assert r.status_code == 200, r.text
            for line in r.iter_lines(decode_unicode=True):
                lines.append(line)
        took = time.monotonic() - t
        measured("request_timeout_s=1 with a 3 s stream",
                 f"ended after {took:.2f} s with {lines[-3:]}")
        assert "event: done" not in lines
        i = lines.index("event: error")
        err = json.loads(lines[i + 1][6:])
        assert err["error"]["code"] == "upstream_timeout", err
        assert 0.8 <= took < 2.0, took
        g = http.get(f"{st.url}/api/chat/{sid}", timeout=5)
        assert g.status_code == 404, g.text


# ------------------------------------------------------------ 6. slowlog

def test_slowlog(stack_factory, http):
    with own_stack(stack_factory, {"CHATFCGI_SLOWLOG_MS": "200"}) as st:
        LocalModel.of(st, http).set(delay_ms=400)
        m0 = metrics(http, st)
        r = chat(http, st, "slow one")
        assert r.status_code == 200, r.text
        line = wait_for(lambda: next((ln for ln in log_text(st).splitlines()
                                      if "slowlog" in ln), None), 2)
        assert line, log_text(st)[-2000:]
        assert re.search(r"redis \d+ ms", line) and \
            re.search(r"upstream (\d+) ms", line), line
        assert int(re.search(r"upstream (\d+) ms", line).group(1)) >= 390
        m1 = metrics(http, st)
        assert m1["chatfcgi_slow_requests_total"] >= \
            m0["chatfcgi_slow_requests_total"] + 1


# ------------------------------------------------------- 7. dynamic pool

def test_dynamic_pool_grows_and_shrinks(stack_factory, http):
    env = {"CHATFCGI_PM": "dynamic", "CHATFCGI_WORKERS": "6",
           "CHATFCGI_START_WORKERS": "2", "CHATFCGI_MIN_SPARE_WORKERS": "1",
           "CHATFCGI_MAX_SPARE_WORKERS": "2",
           "CHATFCGI_QUEUE_TIMEOUT_MS": "0"}
    with own_stack(stack_factory, env) as st:
        s = status(http, st)
        assert s["process_manager"] == "dynamic"
        assert len(chat_rows(s)) == 2, s
        LocalModel.of(st, http).set(delay_ms=3000)
        samples = []  # (t, chat workers, busy)

        def turn(i):
            with new_session() as sess:
                return chat(sess, st, f"dynamic {i}", timeout=30).status_code

        t0 = time.monotonic()
        par = Parallel(9, turn).start()
        while any(t.is_alive() for t in par.threads) and \
                time.monotonic() - t0 < 25:
            rows = chat_rows(status(http, st))
            samples.append((time.monotonic() - t0, len(rows),
                            sum(p["state"] != "idle" for p in rows)))
            time.sleep(0.1)
        codes = [v for v, _, _ in par.join(10)]
        t_end = time.monotonic() - t0
        shrunk = None
        while time.monotonic() - t0 < t_end + 5:
            rows = chat_rows(status(http, st))
            samples.append((time.monotonic() - t0, len(rows),
                            sum(p["state"] != "idle" for p in rows)))
            if len(rows) <= 2:
                shrunk = time.monotonic() - t0 - t_end
                break
            time.sleep(0.1)
        grew = next((t for t, n, _ in samples if n > 2), None)
        peak = max(n for _, n, _ in samples)
        m = metrics(http, st)
        measured("dynamic pool", f"grew past 2 at {grew} s, peak {peak}, "
                 f"load ended at {t_end:.1f} s, back to <= 2 after "
                 f"{shrunk} s, max_children_reached "
                 f"{m['chatfcgi_max_children_reached_total']}")
        assert codes == [200] * 9, codes
        assert grew is not None and grew < 3.0, samples
        assert peak <= 6, samples
        assert peak == 6, samples
        assert shrunk is not None, samples[-10:]
        assert m["chatfcgi_max_children_reached_total"] >= 1
        assert "workers reached" in log_text(st)


# ------------------------------------------------------- 8. backpressure

def test_backpressure_sheds_after_queue_timeout(stack_factory, http):
    env = {"CHATFCGI_WORKERS": "2", "CHATFCGI_QUEUE_TIMEOUT_MS": "500"}
    with own_stack(stack_factory, env) as st:
        LocalModel.of(st, http).set(delay_ms=3000)

        def turn(i):
            with new_session() as s:
                return chat(s, st, f"pressure {i}", timeout=15)

        par = Parallel(5, turn).start()
        busy = wait_for(lambda: all(p["state"] != "idle" for p in
                                    chat_rows(status(http, st))), 2, 0.02)
        assert busy, status(http, st)
        side = []
        for path in ("healthz", "status", "healthz", "status"):
            t = time.monotonic()
            r = http.get(f"{st.url}/api/{path}", timeout=5)
            side.append((path, r.status_code, time.monotonic() - t))
        results = par.join(15)
        ok, shed = [], []
        for value, start, end in results:
            assert not isinstance(value, Exception), value
            (ok if value.status_code == 200 else shed).append(
                (value, end - start))
        measured("backpressure", f"{len(ok)} ok, shed after "
                 f"{[round(t, 2) for _, t in shed]} s; side requests "
                 f"{[(p, c, round(t * 1000)) for p, c, t in side]} ms")
        assert len(ok) == 2, [(v.status_code, v.text) for v, _ in ok + shed]
        assert len(shed) == 3
        for r, took in shed:
            assert_json_error(r, 503, "unavailable")
            assert r.headers.get("Retry-After"), r.headers
            assert 0.5 <= took <= 1.5, took
        for path, code, took in side:
            assert code == 200, path
            assert took < 0.2, (path, took)
        assert metrics(http, st)["chatfcgi_queue_timeouts_total"] >= 1


# ---------------------------------------------------- 9. status access

def test_status_and_metrics_allowed_on_loopback(stack, http):
    for path in ("status", "metrics", "healthz"):
        r = http.get(f"{stack.url}/api/{path}", timeout=5)
        assert r.status_code == 200, (path, r.text)


def test_status_allow_restricts(stack_factory, http):
    with own_stack(stack_factory,
                   {"CHATFCGI_STATUS_ALLOW": "10.9.9.9"}) as st:
        for path in ("status", "metrics"):
            r = http.get(f"{st.url}/api/{path}", timeout=5)
            assert_json_error(r, 403, "forbidden")
        r = http.get(f"{st.url}/api/healthz", timeout=5)
        assert r.status_code == 200, r.text


# ------------------------------------------------ 10. crash-loop backoff

def test_crash_loop_backoff(stack_factory, http):
    with own_stack(stack_factory, {"CHATFCGI_WORKERS": "2"}) as st:
        master = st.pid("chatfcgi")
        control = [p["pid"] for p in status(http, st)["processes"]
                   if p["role"] == "control"]
        assert len(control) == 1
        kids0 = wait_for(lambda: new_children(master, 3), 3)
        assert kids0
        delays = []
        t_first = time.monotonic()
        for _ in range(6):
            victim = next(p for p in children(master) if p not in control)
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            back = None
            while time.monotonic() - t0 < 3.5:
                kids = children(master)
                if victim not in kids and len(kids) == 3:
                    back = time.monotonic() - t0
                    break
                time.sleep(0.005)
            delays.append(back)
            if back is None:
                break
        measured("crash loop: respawn delay after each kill -9",
                 [None if d is None else round(d, 3) for d in delays])
        assert all(d is not None for d in delays), delays
        fast, slow = delays[:4], delays[4:]
        assert all(d < 0.1 for d in fast), delays
        assert slow[0] >= 0.9, delays  # the 5th failure within 10 s
        assert slow[1] >= 1.8, delays  # the backoff doubles
        assert time.monotonic() - t_first < 10
        log = log_text(st)
        assert "crash loop" in log, log[-2000:]
        # The pool still serves.
        assert chat(http, st, "after the storm").status_code == 200


# ------------------------------- 11. pm single on fd 0, socket activation

@pytest.mark.skipif(shutil.which("spawn-fcgi") is None,
                    reason="spawn-fcgi is not installed (apt-get install "
                           "spawn-fcgi)")
def test_pm_single_under_spawn_fcgi(stack):
    with temp_dir() as d:
        sock, log = d / "s.sock", d / "chatfcgi.log"
        env = base_env(stack)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["spawn-fcgi", "-n", "-s", str(sock), "-M", "0666", "--",
                 chatfcgi_bin(), "-S", "-c", str(CONF)],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        try:
            assert wait_for(lambda: sock.exists() and
                            "pm single" in log.read_text(), 5), \
                log.read_text()
            os.kill(proc.pid, signal.SIGUSR2)  # no master here to lose
            time.sleep(0.2)
            code, _, body = fcgi_chat(sock, "hello over fd 0")
            assert code == 200, body
            assert json.loads(body)["reply"]
            text = log.read_text()
            assert "fd 0" in text, text
            assert "the master is gone" not in text, text
            assert children(proc.pid) == []  # no fork in pm single
            if IS_ROOT:
                ids = proc_ids(proc.pid)
                uid = pwd.getpwnam(WEB_USER).pw_uid
                assert ids and ids[0][0] == uid and ids[0][1] == uid, ids
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(5) == 0, log.read_text()
        finally:
            stop_pid(proc)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_systemd_socket_activation(stack):
    with temp_dir() as d:
        sock, log = d / "a.sock", d / "chatfcgi.log"
        status_sock = d / "st.sock"
        env = base_env(stack,
                       CHATFCGI_STATUS_LISTEN=str(d / "unused-status.sock"),
                       CHATFCGI_LISTEN=str(d / "unused.sock"),
                       CHATFCGI_WORKERS="2")
        # It passes on only what -E names (and PATH, HOME, ...).
        setenv = []
        for k, v in env.items():
            if k.startswith("CHATFCGI_"):
                setenv += ["-E", f"{k}={v}"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["systemd-socket-activate", "-l", str(sock), "-l",
                 str(status_sock), "--fdname=chat:status", *setenv,
                 chatfcgi_bin(), "-c", str(CONF)],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        try:
            assert wait_for(lambda: sock.exists(), 5), log.read_text()
            # It execs chatfcgi on the first connection, which then waits
            # in the socket's queue for a worker.
            code, _, body = fcgi_chat(sock, "hello, activated", timeout=10)
            assert code == 200, (code, body, log.read_text())
            text = log.read_text()
            assert "systemd socket activation" in text, text
            assert not (d / "unused.sock").exists()
            assert not (d / "unused-status.sock").exists()
            # The socket named "status" went to the control worker.
            assert wait_for(lambda: len(children(proc.pid)) == 3, 2), text
            code, _, body = fcgi_request(status_sock, method="GET",
                                         uri="/api/status")
            assert code == 200, body
            rows = json.loads(body)["processes"]
            assert sorted(p["role"] for p in rows) == \
                ["chat", "chat", "control"], rows
            # A reload hands both inherited sockets over to the new image.
            kids = children(proc.pid)
            os.kill(proc.pid, signal.SIGHUP)
            assert wait_for(lambda: new_children(proc.pid, 3, kids), 3), \
                (kids, children(proc.pid), log.read_text())
            code, _, body = fcgi_chat(sock, "after the reload")
            assert code == 200, body
            code, _, body = fcgi_request(status_sock, method="GET",
                                         uri="/api/healthz")
            assert code == 200, body
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(5) == 0, log.read_text()
        finally:
            stop_pid(proc)


# -------------------------------------------------- 12. privilege drop

@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_workers_drop_privileges(stack):
    master = stack.pid("chatfcgi")
    pw = pwd.getpwnam(WEB_USER)
    ids = proc_ids(master)
    assert ids[0] == (0, 0, 0, 0), ids
    kids = children(master)
    assert len(kids) == 5, kids
    for pid in kids:
        ids = proc_ids(pid)
        assert ids is not None, pid
        uids, gids = ids
        assert uids == (pw.pw_uid,) * 4, (pid, uids)
        assert gids == (pw.pw_gid,) * 4, (pid, gids)
        text = Path(f"/proc/{pid}/status").read_text()
        groups = re.search(r"^Groups:(.*)$", text, re.M).group(1).split()
        # Exactly the user's own groups (resolved by the master before the
        # fork): none of root's is left, none of the user's is missing.
        assert {int(g) for g in groups} == set(
            os.getgrouplist(WEB_USER, pw.pw_gid)), (pid, groups)
        cap = re.search(r"^CapEff:\s+([0-9a-f]+)", text, re.M).group(1)
        assert int(cap, 16) == 0, (pid, cap)


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
@pytest.mark.parametrize("args", [[], ["-S"]], ids=["master", "single"])
def test_refuses_to_serve_as_root(stack, args):
    with temp_dir() as d:
        env = base_env(stack, CHATFCGI_USER="",
                       CHATFCGI_LISTEN=str(d / "root.sock"),
                       CHATFCGI_STATUS_LISTEN="off")
        r = subprocess.run([chatfcgi_bin(), *args, "-c", str(CONF)], env=env,
                           stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=10, start_new_session=True)
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert b"refusing to serve requests as root" in r.stderr, r.stderr
        assert not (d / "root.sock").exists()


# ----------------------------- 13. what others can reach (issue 17)
#
# The status page is for operators, not for the holders of sessions. The
# master runs as root: what it does to a path it must do to the file it
# made, not to whatever a local user puts there.

def test_status_shows_routes_not_session_ids(stack, http, model):
    """A turn streaming and a GET /api/chat/{id} held in Redis (CLIENT
    PAUSE), both of one known session: /api/status names their routes and
    shows no part of the id."""
    sid = uuid.uuid4().hex
    model.set(chunk_delay_ms=300,
              reply="one two three four five six seven eight nine ten")

    def stream(i):
        with new_session() as s:
            r = post_chat(s, stack, "hello", sid, stream=True, timeout=15)
            return r.status_code, r.text

    def get(i):
        with new_session() as s:
            return s.get(f"{stack.url}/api/chat/{sid}", timeout=15)

    def with_get_held():
        shown = status(http, stack)
        return shown if [p for p in chat_rows(shown)
                         if p["request"].startswith("GET ")] else None

    streaming = Parallel(1, stream).start()
    assert wait_for(lambda: rows_in(http, stack, "streaming"), 3, 0.02), \
        status(http, stack)
    # Ends by itself (within the workers' command_timeout_ms): a paused
    # Redis takes no UNPAUSE from a new connection either.
    redis_command(stack.redis_port, "CLIENT", "PAUSE", "1500", "ALL")
    reading = Parallel(1, get).start()
    shown = wait_for(with_get_held, 1.4, 0.02)
    (got, _, _), = reading.join(15)
    (streamed, _, _), = streaming.join(15)
    assert shown, status(http, stack)
    text = json.dumps(shown)
    assert sid[:8] not in text, text
    requests_shown = sorted(p["request"].rpartition(" req=")[0]
                            for p in chat_rows(shown) if p["request"])
    assert requests_shown == ["GET /api/chat/{id}", "POST /api/chat"], text
    # 404 while the streaming turn is not stored yet: either is an answer.
    assert not isinstance(got, Exception) and got.status_code in (200, 404)
    assert not isinstance(streamed, Exception) and streamed[0] == 200, \
        streamed


STRACE = shutil.which("strace")


def strace_holding_bind(trace, hold_s=1.5):
    """A wrapper that runs chatfcgi under strace, each bind() held for
    hold_s after it returns: the socket file then exists and nothing else
    has been done to it yet. The calls that change a file's mode or owner
    go to the file trace."""
    return [STRACE, "-qq", "-o", str(trace), "-e",
            "trace=bind,chmod,fchmod,fchmodat,chown,fchown,lchown,fchownat",
            "-e", f"inject=bind:delay_exit={int(hold_s * 1e6)}"]


def lstat_or_none(path):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


@pytest.mark.skipif(not IS_ROOT or STRACE is None,
                    reason="needs root (the owner changes) and strace")
def test_unix_socket_has_its_mode_from_the_bind(stack):
    """The socket file never shows a looser mode than listen_mode (a umask
    around bind(), not a chmod() after it), and nothing changes it by
    path: chmod() and chown() follow a symlink put in its place."""
    with direct_master(stack) as m:
        m.write_conf(listen_mode="0660")
        trace = m.dir / "trace"
        m.spawn(strace_holding_bind(trace), umask=0o022)
        first = wait_for(lambda: lstat_or_none(m.sock), 5, 0.005)
        assert first, m.log_text()
        assert oct(stat.S_IMODE(first.st_mode)) == oct(0o660)
        assert wait_for(lambda: m.workers(2), 10), m.log_text()
        final = os.lstat(m.sock)
        pw = pwd.getpwnam(WEB_USER)
        assert oct(stat.S_IMODE(final.st_mode)) == oct(0o660)
        assert (final.st_uid, final.st_gid) == (pw.pw_uid, pw.pw_gid)
        by_path = [ln for ln in trace.read_text().splitlines()
                   if str(m.sock) in ln and not ln.startswith("bind(")]
        assert not by_path, by_path
        assert fcgi_chat(m.sock)[0] == 200


@pytest.mark.skipif(not IS_ROOT or STRACE is None,
                    reason="needs root (the owner changes) and strace")
def test_unix_socket_swapped_for_a_symlink(stack):
    """A symlink put in the socket's place right after the bind: the file
    it points to keeps its mode and owner, and the master refuses to
    listen there."""
    with direct_master(stack) as m:
        m.write_conf(listen_mode="0666")
        victim = m.dir / "victim"
        victim.write_text("root's own\n")
        victim.chmod(0o600)
        m.spawn(strace_holding_bind(m.dir / "trace"))
        assert wait_for(lambda: lstat_or_none(m.sock), 5, 0.005), \
            m.log_text()
        link = m.dir / "link"
        link.symlink_to(victim)
        link.replace(m.sock)
        exited = wait_for(lambda: m.proc.poll() is not None, 5)
        after = os.stat(victim)
        assert (oct(stat.S_IMODE(after.st_mode)), after.st_uid) == \
            (oct(0o600), 0)
        assert exited and m.proc.returncode != 0, m.log_text()
        assert "replaced right after the bind" in m.log_text()


# -------------------------- 14. what a compromised worker can reach
#
# A worker holds only the descriptors it serves on. It can still write the
# whole scoreboard through its mapping: the master (root) must act on
# its own records of what it forked, never on a pid or a count read back
# from there (issue 17). The tests write where a worker would, through a
# worker's own mapping. Where the old master's reading could reach kill(-1)
# or memory past the mapping, the pool runs in a PID namespace of its own,
# so that a regression cannot signal anything outside it.

PIDNS = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
# Root reads a worker's mapping; --mount-proc needs / to be a mount point,
# which it is not in a chroot (fresh-debian.sh's).
needs_pidns = pytest.mark.skipif(
    not IS_ROOT or in_chroot(), reason="needs root, outside a chroot, for "
    "a PID namespace and a worker's mapping")
OLD_REQUEST_MS = 3600 * 1000  # far past any watchdog limit


@functools.lru_cache(maxsize=None)
def scoreboard_layout():
    """Offsets of struct scoreboard as the compiler lays out
    include/scoreboard.h for chatfcgi (the layout is not an interface:
    asking the compiler keeps the test honest when fields change)."""
    program = r"""
#include <stddef.h>
#include <stdio.h>
#include "scoreboard.h"
int main(void)
{
    printf("%zu %zu %zu %zu %zu %zu\n", offsetof(struct scoreboard, magic),
           offsetof(struct scoreboard, nslots),
           offsetof(struct scoreboard, slots),
           sizeof(struct scoreboard_slot),
           offsetof(struct scoreboard_slot, pid),
           offsetof(struct scoreboard_slot, request_at_ms));
    return 0;
}
"""
    return compiled_values(program, ("magic", "nslots", "slots",
                                     "slot_size", "pid", "request_at_ms"))


class Scoreboard:
    """A worker's mapping of the scoreboard, written as that worker could
    (root reaches it through /proc/<pid>/map_files)."""

    def __init__(self, mem):
        self.mem, self.at = mem, scoreboard_layout()

    def nslots(self):
        return struct.unpack_from("<I", self.mem, self.at["nslots"])[0]

    def set_nslots(self, n):
        struct.pack_into("<I", self.mem, self.at["nslots"], n)

    def set_magic(self, n):
        struct.pack_into("<Q", self.mem, self.at["magic"], n)

    def _slot(self, i, field):
        return self.at["slots"] + i * self.at["slot_size"] + self.at[field]

    def pid(self, i):
        return struct.unpack_from("<i", self.mem, self._slot(i, "pid"))[0]

    def slot_of(self, pid):
        return next(i for i in range(self.nslots()) if self.pid(i) == pid)

    def write_slot(self, i, pid, request_at_ms=0):
        struct.pack_into("<i", self.mem, self._slot(i, "pid"), pid)
        struct.pack_into("<q", self.mem, self._slot(i, "request_at_ms"),
                         request_at_ms)


@contextmanager
def worker_scoreboard(pid):
    span = next(line.split()[0] for line in
                Path(f"/proc/{pid}/maps").read_text().splitlines()
                if "/memfd:chatfcgi-scoreboard" in line)
    fd = os.open(f"/proc/{pid}/map_files/{span}", os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as mem:  # the whole memfd
            yield Scoreboard(mem)
    finally:
        os.close(fd)


@contextmanager
def sleeper():
    """A process of the test's own, which chatfcgi must never signal."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield proc
    finally:
        stop_pid(proc)


def stuck_request_start():
    return int(time.time() * 1000) - OLD_REQUEST_MS


def fd_targets(pid):
    """What each open fd of pid is (readlink of /proc/<pid>/fd/*)."""
    d = f"/proc/{pid}/fd"
    out = []
    for fd in os.listdir(d):
        try:
            out.append(os.readlink(f"{d}/{fd}"))
        except FileNotFoundError:
            pass  # closed meanwhile
    return out


def unix_socket_inodes(path):
    """The inodes of the unix sockets bound to path (the listening one and
    the connections it accepted), from /proc/net/unix."""
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[7] == str(path):
            inodes.add(fields[6])
    return inodes


def test_workers_hold_only_what_they_use(stack, http):
    """After the fork a chat worker keeps the chat socket only, the
    control worker the chat and status sockets, and none of them the
    scoreboard's memfd: a worker writes through its mapping, and whoever
    holds the fd could shrink the memory under the master."""
    rows = status(http, stack)["processes"]
    chat_sock = unix_socket_inodes(stack.socket_path)
    status_sock = unix_socket_inodes(stack.status_socket_path)
    assert chat_sock and status_sock
    for row in rows:
        held = fd_targets(row["pid"])
        sockets = {t[len("socket:["):-1] for t in held
                   if t.startswith("socket:[")}
        assert not [t for t in held if t.startswith("/memfd:")], (row, held)
        assert sockets & chat_sock, (row, held)
        if row["role"] == "control":
            assert sockets & status_sock, (row, held)
        else:
            assert not sockets & status_sock, (row, held)


@pytest.mark.skipif(not IS_ROOT, reason="reads a worker's mapping as root")
def test_watchdog_kills_only_the_worker_it_forked(stack):
    """A worker puts another process's pid in its slot, with a request
    begun an hour ago: the watchdog ends that worker, the one the master
    forked for the slot, and leaves the other process alone."""
    with direct_master(stack) as m, sleeper() as other:
        m.write_conf(workers=2)
        kids = m.start(2)
        worker = kids[0]
        with worker_scoreboard(worker) as sb:
            sb.write_slot(sb.slot_of(worker), other.pid,
                          stuck_request_start())
        wait_for(lambda: other.poll() is not None or
                 worker not in children(m.proc.pid), 4)
        assert other.poll() is None, \
            "the watchdog killed a process the master did not fork"
        assert worker not in children(m.proc.pid), m.log_text()
        assert "has been in one request" in m.log_text()
        assert wait_for(lambda: m.workers(2), 3), m.log_text()


@needs_pidns
def test_watchdog_never_signals_minus_one(stack):
    """pid -1 with an old request start in a free slot: kill(-1, SIGKILL)
    from root would end every process there is. Nothing is signalled."""
    with direct_master(stack) as m:
        m.write_conf(workers=2)
        kids = m.start(2, wrapper=PIDNS)
        with worker_scoreboard(kids[0]) as sb:
            free = sb.slot_of(0)
            sb.write_slot(free, -1, stuck_request_start())
        changed = wait_for(lambda: sorted(children(m.master_pid())) !=
                           sorted(kids), 2.5)
        assert not changed, (kids, children(m.master_pid()), m.log_text())
        assert fcgi_chat(m.sock)[0] == 200


@needs_pidns
def test_huge_slot_count_is_not_trusted(stack):
    """nslots = 2^32 - 1: neither the master nor a worker reads past the
    memory mapped; the pool serves, and serves after a reload (whose new
    master adopts the old workers from this very scoreboard)."""
    with direct_master(stack) as m:
        m.write_conf(workers=2)
        kids = m.start(2, wrapper=PIDNS)
        with worker_scoreboard(kids[0]) as sb:
            sb.set_nslots(0xFFFFFFFF)
        time.sleep(2.5)  # two of the master's ticks
        assert m.proc.poll() is None and m.master_pid(), m.log_text()
        for i in range(3):
            assert fcgi_chat(m.sock, f"still there {i}")[0] == 200
        os.kill(m.master_pid(), signal.SIGHUP)
        assert wait_for(lambda: new_children(m.master_pid(), 2, kids), 5), \
            (kids, children(m.master_pid()), m.log_text())
        assert fcgi_chat(m.sock, "after the reload")[0] == 200


@pytest.mark.skipif(not IS_ROOT, reason="reads a worker's mapping as root")
def test_foreign_pid_does_not_hold_up_a_stop(stack):
    """A pid in a free slot is no worker of the master's: a graceful stop
    waits for its own workers only, and signals nothing else."""
    with direct_master(stack) as m, sleeper() as other:
        m.write_conf(workers=2)
        kids = m.start(2)
        with worker_scoreboard(kids[0]) as sb:
            sb.write_slot(sb.slot_of(0), other.pid)
        os.kill(m.proc.pid, signal.SIGTERM)
        try:
            rc = m.proc.wait(5)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0, ("the stop did not finish", m.log_text()[-1500:])
        assert other.poll() is None


@pytest.mark.skipif(not IS_ROOT, reason="reads a worker's mapping as root")
def test_reload_adopts_only_its_own_children(stack):
    """After a reload's exec the new master takes the old workers over from
    the scoreboard: a pid there that is not its child is not adopted, so
    it is neither told to stop nor waited for."""
    with direct_master(stack) as m, sleeper() as other:
        m.write_conf(workers=2)
        kids = m.start(2)
        with worker_scoreboard(kids[0]) as sb:
            sb.write_slot(sb.slot_of(0), other.pid)
        os.kill(m.proc.pid, signal.SIGHUP)
        assert wait_for(lambda: new_children(m.proc.pid, 2, kids), 5), \
            (kids, children(m.proc.pid), m.log_text())
        assert other.poll() is None, "the reload signalled a stranger"
        assert fcgi_chat(m.sock, "after the reload")[0] == 200
        os.kill(m.proc.pid, signal.SIGTERM)
        assert m.proc.wait(5) == 0, m.log_text()[-1500:]


@pytest.mark.skipif(not IS_ROOT, reason="reads a worker's mapping as root")
def test_reload_over_a_broken_scoreboard_keeps_serving(stack):
    """A worker overwrote the scoreboard's magic: the master a reload execs
    cannot take the old workers over from it, but it starts a scoreboard of
    its own and new workers, rather than exit and take the pool down."""
    with direct_master(stack) as m:
        m.write_conf(workers=2)
        kids = m.start(2)
        with worker_scoreboard(kids[0]) as sb:
            sb.set_magic(0)
        os.kill(m.proc.pid, signal.SIGHUP)
        started = wait_for(lambda: len(set(children(m.proc.pid)) -
                                       set(kids)) == 2, 5)
        assert started and m.proc.poll() is None, m.log_text()[-1500:]
        assert "scoreboard handed over is unusable" in m.log_text()
        for i in range(3):
            assert fcgi_chat(m.sock, f"after the reload {i}")[0] == 200
