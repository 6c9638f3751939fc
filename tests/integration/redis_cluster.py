"""Helpers for tests/integration/test_redis.py, test_redis_cluster.py and
test_fleet.py: a raw RESP client, a load generator of chat turns, a Redis
Sentinel group (a master, one replica, three Sentinels) on free loopback
ports, and a Redis Cluster (masters and a replica each, on loopback or
in network namespaces), each process started and stopped by PID.
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

def redis_command(port, *args, timeout=2.0, host="127.0.0.1"):
    """One command to host:port; its reply (int, bytes, None, list).
    An error reply is raised as RuntimeError."""
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    with socket.create_connection((host, port), timeout=timeout) as s:
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


def try_command(port, *args, timeout=1.0, host="127.0.0.1"):
    """redis_command, or None when the server is not there or refuses."""
    try:
        return redis_command(port, *args, timeout=timeout, host=host)
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
    make the next turn of that session a 409 for request_timeout_s.
    headers(session) gives extra request headers (e.g. X-Forwarded-For, a
    client per session)."""

    def __init__(self, url, threads=4, per_session=5, tag="load",
                 headers=lambda session: None):
        self.url = url
        self.threads = threads
        self.per_session = per_session
        self.headers = headers
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
                          json={"session_id": session, "message": message},
                          headers=self.headers(session))
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


class Servers:
    """Servers a test starts, self.procs (label -> Popen), as a context
    manager: _start() on the way in; on the way out every process is
    stopped by PID, last started first (SIGTERM, then SIGKILL after
    STOP_TIMEOUT), also when the test or _start failed."""

    def __init__(self):
        self.procs = {}

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def _start(self):
        raise NotImplementedError

    def stop(self):
        """Idempotent."""
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(STOP_TIMEOUT)
        self.procs.clear()


def assert_only_503(turns):
    bad = [(t.status, t.code, t.error) for t in turns
           if t.status != 200 and (t.status, t.code) != (503, "unavailable")]
    assert not bad, f"failures other than 503 unavailable: {bad[:5]}"


def assert_acked_stored(turns, read):
    """Every turn answered 200 is in its session's history (read(session):
    its user messages), whole and in order. A turn that failed after its
    store ran (WAIT short of replicas, a connection lost on the way back)
    may follow: the last of its session, since Load moves on after a
    failure."""
    acked = {}
    for t in turns:
        if t.status == 200:
            acked.setdefault(t.session, []).append(t.message)
    for session, messages in acked.items():
        stored = read(session)
        assert stored[:len(messages)] == messages, (session, stored)
        assert len(stored) - len(messages) <= 1, (session, stored)


def worker_pids(master_pid):
    """The chatfcgi master's children, from /proc/<pid>/task/<pid>/children
    (the master is single-threaded)."""
    path = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    return sorted(int(p) for p in path.read_text().split())


# --------------------------------------------------------- Sentinel group

class SentinelGroup(Servers):
    """A master and its replica, and three Sentinels watching them under
    `name` (down-after-milliseconds 1000, failover-timeout 5000, quorum
    2), each process on its own free loopback port and directory under
    base. A context manager (Servers)."""

    def __init__(self, base, ports, name="chatfcgi-test"):
        self.base = Path(base)
        self.name = name
        self.master_port, self.replica_port = ports[0], ports[1]
        self.sentinel_ports = list(ports[2:5])
        super().__init__()

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



# ---------------------------------------------------------- Redis Cluster

CLUSTER_NODE_TIMEOUT_MS = 1000


def key_slot(key):
    """Redis Cluster's slot of a key (CRC16-XMODEM of its hash tag)."""
    open_ = key.find("{")
    if open_ != -1:
        close = key.find("}", open_ + 1)
        if close > open_ + 1:
            key = key[open_ + 1:close]
    crc = 0
    for byte in key.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xffff
    return crc % 16384


class RedisCluster(Servers):
    """A Redis Cluster of len(nodes) // 2 masters with one replica each
    (cluster-node-timeout 1000 ms, cluster-require-full-coverage no), one
    process per (host, port) of nodes with its cluster bus on the port of
    the same rank in bus_ports (by default port + 10000, which a free
    port above 55535 would not have), each in its own directory under
    base. prefix(i) gives what goes before node i's command line (e.g.
    ip netns exec NS). A context manager (Servers)."""

    def __init__(self, base, nodes, bus_ports=None, prefix=lambda i: []):
        self.base = Path(base)
        self.nodes = list(nodes)
        self.bus_ports = list(bus_ports or [p + 10000 for _, p in nodes])
        self.prefix = prefix
        super().__init__()

    @property
    def url(self):
        """The value for [redis] url."""
        return "redis-cluster://" + ",".join(f"{h}:{p}" for h, p in self.nodes)

    def log(self, i, lines=30):
        try:
            return "\n".join((self.base / f"node{i}" / "log").read_text(
                errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def command(self, i, *args, timeout=2.0):
        host, port = self.nodes[i]
        return redis_command(port, *args, timeout=timeout, host=host)

    def try_command(self, i, *args):
        host, port = self.nodes[i]
        return try_command(port, *args, host=host)

    # -- processes

    def _spawn(self, i):
        host, port = self.nodes[i]
        d = self.base / f"node{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "redis.conf").write_text(
            f"port {port}\nbind {host}\nprotected-mode no\ndaemonize no\n"
            f'dir "{d}"\nsave ""\nappendonly no\n'
            "cluster-enabled yes\ncluster-config-file nodes.conf\n"
            f"cluster-port {self.bus_ports[i]}\n"
            f"cluster-node-timeout {CLUSTER_NODE_TIMEOUT_MS}\n"
            # The other masters' slots keep serving while one fails over.
            "cluster-require-full-coverage no\n"
            "repl-diskless-sync-delay 0\n"
            f'logfile "{d}/log"\n')
        self.procs[i] = subprocess.Popen(
            self.prefix(i) + [REDIS_SERVER, str(d / "redis.conf")], cwd=d,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)

    def _start(self):
        for i in range(len(self.nodes)):
            self._spawn(i)
        for i in range(len(self.nodes)):
            if not wait_until(lambda i=i: self.try_command(i, "PING"), 10):
                raise RuntimeError(f"node {i} did not start:\n{self.log(i)}")
        create = subprocess.run(
            ["redis-cli", "--cluster", "create"] +
            [f"{h}:{p}" for h, p in self.nodes] +
            ["--cluster-replicas", "1", "--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60)
        if create.returncode != 0:
            raise RuntimeError("redis-cli --cluster create failed:\n" +
                               create.stdout[-2000:] + create.stderr[-2000:])
        if not wait_until(self._ready, 30, 0.2):
            raise RuntimeError("the cluster did not become ready:\n" +
                               self.log(0))

    def _ready(self):
        for i in range(len(self.nodes)):
            info = self.try_command(i, "CLUSTER", "INFO")
            if info is None or b"cluster_state:ok" not in info:
                return False
            repl = self.try_command(i, "INFO", "replication")
            if repl is None or (b"role:slave" in repl and
                                b"master_link_status:up" not in repl):
                return False
        masters = self.roles()
        return sorted(masters.values()).count("master") == \
            len(self.nodes) // 2

    def roles(self):
        """{node index: 'master' or 'slave'} of the live nodes, as ROLE
        says."""
        out = {}
        for i, proc in self.procs.items():
            if proc.poll() is not None:
                continue
            role = self.try_command(i, "ROLE")
            if role:
                out[i] = role[0].decode()
        return out

    def masters(self):
        return sorted(i for i, r in self.roles().items() if r == "master")

    def owner(self, key):
        """The index of the node CLUSTER SLOTS names for key's slot, asked
        of a live node; None when none answers or names one."""
        slot = key_slot(key)
        by_addr = {(h, p): i for i, (h, p) in enumerate(self.nodes)}
        for i in self.roles():
            reply = self.try_command(i, "CLUSTER", "SLOTS")
            for entry in reply or []:
                if entry[0] <= slot <= entry[1]:
                    host = entry[2][0].decode() or self.nodes[i][0]
                    return by_addr.get((host, entry[2][1]))
        return None

    def read(self, key_args):
        """A command on the master of key_args[1]'s slot."""
        return self.command(self.owner(key_args[1]), *key_args)

    def slot_owners(self):
        """{(first slot, last slot): node index}, from a live master."""
        i = self.masters()[0]
        by_addr = {tuple(n): j for j, n in enumerate(self.nodes)}
        return {(e[0], e[1]): by_addr[(e[2][0].decode() or self.nodes[i][0],
                                       e[2][1])]
                for e in self.command(i, "CLUSTER", "SLOTS")}


    def kill(self, i):
        """SIGKILL node i; returns the monotonic time just before."""
        proc = self.procs[i]
        at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)
        return at

    def restart(self, i):
        """Start node i again (it rejoins from its nodes.conf)."""
        self._spawn(i)

    def all_slots_served(self, dead):
        """Whether a live node's CLUSTER SLOTS covers every slot without
        naming the dead node."""
        for i in self.roles():
            reply = self.try_command(i, "CLUSTER", "SLOTS")
            if not reply:
                continue
            names = {(e[2][0].decode() or self.nodes[i][0], e[2][1])
                     for e in reply}
            covered = sum(e[1] - e[0] + 1 for e in reply)
            return covered == 16384 and tuple(self.nodes[dead]) not in names
        return False



def owner_of(owners, key):
    """The node of owners (RedisCluster.slot_owners) serving key."""
    slot = key_slot(key)
    return next(n for (a, b), n in owners.items() if a <= slot <= b)
