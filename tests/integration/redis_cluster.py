"""Helpers for tests/integration/test_redis.py: a raw RESP client, a load
generator of chat turns, and a Redis Sentinel group (a master, one replica,
three Sentinels) on free loopback ports, started and stopped by PID.
"""

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import requests
from helpers import new_session
from polling import wait_for as wait_until

REDIS_SERVER = "/usr/bin/redis-server"
STOP_TIMEOUT = 5.0


# ------------------------------------------------------------------- RESP

def redis_command(port, *args, timeout=2.0):
    """One command to 127.0.0.1:port; its reply (int, bytes, None, list).
    An error reply is raised as RuntimeError."""
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(out)
        return _reply(s.makefile("rb"))


def _reply(f):
    line = f.readline()
    if not line:
        raise ConnectionError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_reply(f) for _ in range(n)]
    raise RuntimeError(f"unexpected RESP line {line!r}")


def try_command(port, *args, timeout=1.0):
    """redis_command, or None when the server is not there or refuses."""
    try:
        return redis_command(port, *args, timeout=timeout)
    except (OSError, RuntimeError):
        return None


# ------------------------------------------------------------------- load

class Turn:
    """One POST /api/chat: when it started and ended (monotonic seconds),
    its status, error code and message, its session and message."""

    __slots__ = ("start", "end", "status", "code", "error", "session",
                 "message")

    def __init__(self, start, end, status, code, error, session, message):
        self.start, self.end = start, end
        self.status, self.code, self.error = status, code, error
        self.session, self.message = session, message


class Load:
    """threads threads, each posting chat turns in a loop until stop().
    A thread starts a new session every `per_session` turns, so that no
    history is trimmed, and after every failure: a turn whose store failed
    while Redis was gone may leave its session's lock behind, which would
    make the next turn of that session a 409 for request_timeout_s."""

    def __init__(self, url, threads=4, per_session=5, tag="load"):
        self.url = url
        self.threads = threads
        self.per_session = per_session
        self.tag = f"{tag}-{os.getpid()}-{time.monotonic_ns()}"
        self.turns = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = []

    def start(self):
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self, timeout=15):
        self._stop.set()
        for t in self._workers:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._workers), \
            "a load thread did not stop"

    def _run(self, i):
        http = new_session()
        session, n, k = None, 0, 0
        try:
            while not self._stop.is_set():
                if session is None or k == self.per_session:
                    session, k = f"{self.tag}-{i}-{n}", 0
                message = f"turn {self.tag} {i} {n}"
                turn = self._post(http, session, message)
                with self._lock:
                    self.turns.append(turn)
                n += 1
                k += 1
                if turn.status != 200:
                    session = None
                    time.sleep(0.02)  # no busy loop while Redis is gone
        finally:
            http.close()

    def _post(self, http, session, message):
        start = time.monotonic()
        code = error = None
        try:
            r = http.post(f"{self.url}/api/chat", timeout=10,
                          json={"session_id": session, "message": message})
            status = r.status_code
            if status != 200:
                try:
                    body = r.json()["error"]
                    code, error = body["code"], body["message"]
                except (ValueError, KeyError, TypeError):
                    error = r.text[:200]
        except requests.RequestException as e:
            status, error = 0, str(e)
        return Turn(start, time.monotonic(), status, code, error, session,
                    message)

    def snapshot(self):
        with self._lock:
            return sorted(self.turns, key=lambda t: t.start)


class Outage:
    """The failures among turns that ended after `after`: .failed (their
    list), .until_success (seconds from the first of them to the first
    success that started after it and after `back`, the time from which a
    success means Redis is back: a request that Redis served while it was
    shutting down does not end the outage; inf when none did),
    .until_last (seconds from the first to the end of the last of them: a
    worker still in its reconnect backoff fails after others succeed)."""

    def __init__(self, turns, after=0.0, back=0.0):
        self.failed = [t for t in turns if t.status != 200 and t.end >= after]
        self.until_success = self.until_last = 0.0
        if not self.failed:
            return
        first = min(t.start for t in self.failed)
        ok = [t.end for t in turns
              if t.status == 200 and t.start > max(first, back)]
        self.until_success = min(ok) - first if ok else float("inf")
        self.until_last = max(t.end for t in self.failed) - first

    def __str__(self):
        return (f"{len(self.failed)} requests failed; the first failure to "
                f"the first success after it: {self.until_success:.2f} s, "
                f"to the last failure: {self.until_last:.2f} s")


def worker_pids(master_pid):
    """The chatfcgi master's children, from /proc/<pid>/task/<pid>/children
    (the master is single-threaded)."""
    path = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    return sorted(int(p) for p in path.read_text().split())


# --------------------------------------------------------- Sentinel group

class SentinelGroup:
    """A master and its replica, and three Sentinels watching them under
    `name` (down-after-milliseconds 1000, failover-timeout 5000, quorum
    2), each process on its own free loopback port and directory under
    base. A context manager: every process it started is stopped by PID
    on the way out, also when the test failed."""

    def __init__(self, base, ports, name="chatfcgi-test"):
        self.base = Path(base)
        self.name = name
        self.master_port, self.replica_port = ports[0], ports[1]
        self.sentinel_ports = list(ports[2:5])
        self.procs = {}  # label -> Popen

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def sentinels(self):
        """The value for [redis] sentinels."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def log(self, label, lines=30):
        path = self.base / label / "log"
        try:
            return "\n".join(path.read_text(errors="replace")
                             .splitlines()[-lines:])
        except OSError:
            return ""

    # -- processes

    def _spawn(self, label, config, sentinel=False):
        d = self.base / label
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "redis.conf"
        conf.write_text(config.format(dir=d) + f'logfile "{d}/log"\n')
        argv = [REDIS_SERVER, str(conf)] + (["--sentinel"] if sentinel
                                            else [])
        self.procs[label] = subprocess.Popen(
            argv, cwd=d, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def _start(self):
        node = ("port {port}\nbind 127.0.0.1\ndaemonize no\n"
                'dir "{{dir}}"\nsave ""\nappendonly no\n'
                "repl-diskless-sync-delay 0\n")
        self._spawn("master", node.format(port=self.master_port))
        self._spawn("replica", node.format(port=self.replica_port) +
                    f"replicaof 127.0.0.1 {self.master_port}\n")
        for i, port in enumerate(self.sentinel_ports):
            self._spawn(f"sentinel{i}", (
                f"port {port}\nbind 127.0.0.1\ndaemonize no\n"
                'dir "{dir}"\n'
                f"sentinel monitor {self.name} 127.0.0.1 "
                f"{self.master_port} 2\n"
                f"sentinel down-after-milliseconds {self.name} 1000\n"
                f"sentinel failover-timeout {self.name} 5000\n"
                f"sentinel parallel-syncs {self.name} 1\n"
                # Known from the start: found through the master's INFO,
                # it would take up to 10 s.
                f"sentinel known-replica {self.name} 127.0.0.1 "
                f"{self.replica_port}\n"), sentinel=True)
        for label, port in self._ports().items():
            if not wait_until(lambda p=port: try_command(p, "PING"), 10):
                raise RuntimeError(f"{label} on {port} did not start:\n"
                                   f"{self.log(label)}")
        if not wait_until(self._replica_synced, 15):
            raise RuntimeError("the replica did not sync:\n"
                               + self.log("replica"))
        if not wait_until(self._sentinels_ready, 20, 0.2):
            raise RuntimeError("the Sentinels did not find each other and "
                               "the replica:\n" + self.log("sentinel0"))

    def _ports(self):
        ports = {"master": self.master_port, "replica": self.replica_port}
        ports.update({f"sentinel{i}": p
                      for i, p in enumerate(self.sentinel_ports)})
        return ports

    def _replica_synced(self):
        info = try_command(self.replica_port, "INFO", "replication")
        return info is not None and b"master_link_status:up" in info

    def _sentinels_ready(self):
        for port in self.sentinel_ports:
            reply = try_command(port, "SENTINEL", "MASTER", self.name)
            if not reply:
                return False
            fields = dict(zip(reply[::2], reply[1::2]))
            if (int(fields.get(b"num-slaves", 0)) < 1 or
                    int(fields.get(b"num-other-sentinels", 0)) < 2):
                return False
        return True

    def master_addr(self):
        """(host, port) the first Sentinel that answers names, or None."""
        for port in self.sentinel_ports:
            reply = try_command(port, "SENTINEL", "get-master-addr-by-name",
                                self.name)
            if reply:
                return reply[0].decode(), int(reply[1])
        return None

    def kill_master(self):
        """SIGKILL the master; returns the monotonic time just before."""
        proc = self.procs["master"]
        at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)
        return at

    def stop(self):
        """Stop every process started here, by PID: SIGTERM, then SIGKILL
        after STOP_TIMEOUT. Idempotent."""
        for label, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(STOP_TIMEOUT)
        self.procs.clear()
