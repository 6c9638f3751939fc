"""What a chat turn costs: Redis round trips, upstream connections, and a
worker's memory over many turns.

The worker-memory test runs CHATFCGI_RSS_TURNS turns (default 5,000, so
that CI stays fast; the issue's figure is 20,000):

    CHATFCGI_RSS_TURNS=20000 /usr/bin/python3 -m pytest -q -s \\
        -p no:cacheprovider tests/integration/test_efficiency.py -k rss

(-s shows the measured figures; so does a failure.)
"""

import os
import socket
from pathlib import Path

import pytest

from helpers import post_chat
import requests

# One worker: every turn goes through the same process, its Redis
# connection and its curl handle.
STACK_ENV = {"CHATFCGI_WORKERS": "1"}

RSS_TURNS = int(os.environ.get("CHATFCGI_RSS_TURNS", "5000"))
RSS_WARMUP = 1000
RSS_GROWTH_MAX = 0.10


# ---------------------------------------------------------------- helpers

class Monitor:
    """Redis MONITOR on a connection of its own: the commands clients send,
    told apart from those scripts run (shown as "[db lua]")."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"*1\r\n$7\r\nMONITOR\r\n")
        self.file = self.sock.makefile("rb")
        assert self.file.readline() == b"+OK\r\n"

    def client_sequence(self, quiet=0.5):
        """The names of the client commands seen, in order, until Redis
        has been quiet for `quiet` seconds."""
        self.sock.settimeout(quiet)
        seen = []
        try:
            for line in self.file:
                source = line.split(b"[", 1)[1].split(b"]", 1)[0]
                if b"lua" in source:
                    continue
                seen.append(line.split(b'"', 2)[1].decode().upper())
        except (socket.timeout, OSError):
            pass
        self.sock.close()
        return seen

    def client_commands(self, quiet=0.5):
        """{COMMAND: count} of client_sequence()."""
        seen = {}
        for name in self.client_sequence(quiet):
            seen[name] = seen.get(name, 0) + 1
        return seen


def turn(http, st, message, session_id=None):
    r = post_chat(http, st, message, session_id)
    assert r.status_code == 200, r.text
    return r.json()


def the_worker(st):
    """The only chat worker (the control worker is the master's other
    child), from GET /api/status."""
    master = st.pid("chatfcgi")
    assert master, "chatfcgi is not running"
    status = requests.get(f"{st.url}/api/status", timeout=5).json()
    kids = [p["pid"] for p in status["processes"] if p["role"] == "chat"]
    assert len(kids) == 1, f"expected one chat worker under {master}: {kids}"
    return kids[0]


def proc_kib(path, field):
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in {path}")


def rss_kib(pid):
    return proc_kib(f"/proc/{pid}/status", "VmRSS")


def private_dirty_kib(pid):
    return proc_kib(f"/proc/{pid}/smaps_rollup", "Private_Dirty")


# ---------------------------------------------------- Redis round trips

def test_one_round_trip_to_load_and_one_to_store(stack, http, model):
    """Per turn exactly three commands in two round trips: one EVALSHA that
    checks limits and takes the turn lock with the LRANGE of the history
    right behind it, pipelined (app/chatdb.c begin_session), then one
    EVALSHA that stores, trims and unlocks (chatdb_turn_commit). The first
    turn made Redis cache both scripts (EVAL once each), so none of the ten
    sends one again."""
    sid = turn(http, stack, "hello")["session_id"]  # connections are up
    monitor = Monitor(stack.redis_port)
    for i in range(10):
        turn(http, stack, f"I feel fine, number {i}", sid)
    sent = monitor.client_sequence()
    print(f"\nRedis commands sent for 10 turns: {sent}")
    assert sent == ["EVALSHA", "LRANGE", "EVALSHA"] * 10, sent


def test_get_and_delete_are_one_round_trip_each(stack, http, model):
    """GET and DELETE are one EVALSHA each: the rate limit, the session's
    owner, then the load or the delete (app/chatdb.c chatdb_history_load,
    chatdb_history_delete). The first GET made Redis cache the script."""
    sid = turn(http, stack, "hello")["session_id"]
    assert http.get(f"{stack.url}/api/chat/{sid}",
                    timeout=5).status_code == 200
    monitor = Monitor(stack.redis_port)
    assert http.get(f"{stack.url}/api/chat/{sid}",
                    timeout=5).status_code == 200
    assert http.delete(f"{stack.url}/api/chat/{sid}",
                       timeout=5).status_code == 204
    sent = monitor.client_commands()
    assert sent == {"EVALSHA": 2}, sent


# ------------------------------------------------- upstream connections

def test_upstream_connection_is_reused(stack_factory, http):
    """A fresh stack of its own, so that its only worker has never opened
    a connection to the model: 50 turns, one connection."""
    st = stack_factory({"CHATFCGI_WORKERS": "1"})
    http.post(f"{st.model_url}/control/reset", timeout=5).raise_for_status()
    sid = None
    for i in range(50):
        sid = turn(http, st, f"I need rest {i}", sid)["session_id"]
    stats = http.get(f"{st.model_url}/control/stats", timeout=5).json()
    print(f"\nupstream: {stats['requests']} requests over "
          f"{stats['connections']} connection(s)")
    assert stats["requests"] == 50, stats
    assert stats["connections"] == 1, stats


# ------------------------------------------------------- worker memory

NO_ASAN = pytest.mark.skipif(
    "asan" in os.environ.get("CHATFCGI_BIN", ""),
    reason="ASan keeps freed memory in quarantine, so a worker's memory "
    "measures nothing; LSan checks leaks")


@pytest.mark.skipif(RSS_TURNS <= RSS_WARMUP,
                    reason="CHATFCGI_RSS_TURNS must exceed the warm-up")
@NO_ASAN
def test_worker_rss_is_flat_over_many_turns(stack, http, model, capsys):
    """Warm up with 1,000 turns, read the worker's RSS, run the rest, read
    it again: it grew by less than 10%. The sessions rotate and their
    messages vary in size, so histories fill, trim, grow and shrink."""
    worker = the_worker(stack)
    sessions = [f"rss-{i}" for i in range(40)]

    def run(start, end):
        for i in range(start, end):
            size = (i * 37) % 1500
            message = f"I feel turn {i} " + "é" * size
            turn(http, stack, message, sessions[i % len(sessions)])
            if i % 97 == 0:  # some sessions end and start again
                http.delete(f"{stack.url}/api/chat/"
                            f"{sessions[(i // 97) % len(sessions)]}",
                            timeout=5)

    run(0, RSS_WARMUP)
    warm = rss_kib(worker)
    run(RSS_WARMUP, RSS_TURNS)
    end = rss_kib(worker)
    assert the_worker(stack) == worker, "the worker was replaced"
    growth = (end - warm) / warm
    with capsys.disabled():
        print(f"\nworker {worker} RSS: {warm} KiB after {RSS_WARMUP} turns, "
              f"{end} KiB after {RSS_TURNS} ({growth:+.1%})")
    assert growth < RSS_GROWTH_MAX, (warm, end)


@NO_ASAN
def test_memory_of_a_large_answer_is_given_back(stack, http, model, capsys):
    """Two answers of 900 KB (whole and streamed) through /v1, then a
    small one: the worker's private memory is back within 128 KiB of what
    it was after a small answer, not holding the largest answer it ever
    wrote (5 MiB before), times thousands of workers."""
    worker = the_worker(stack)
    ask = {"messages": [{"role": "user", "content": "hi"}]}

    def complete(**fields):
        r = http.post(f"{stack.url}/v1/chat/completions",
                      json={**ask, **fields}, timeout=10)
        assert r.status_code == 200, r.text[:200]

    complete()
    small = private_dirty_kib(worker)
    model.set(reply=("y" * 999 + " ") * 900)
    complete()
    complete(stream=True)
    large = private_dirty_kib(worker)
    model.reset()
    complete()
    after = private_dirty_kib(worker)
    with capsys.disabled():
        print(f"\nworker private dirty: {small} KiB after a small answer, "
              f"{large} KiB after two of 900 KB, {after} KiB after the "
              f"next small one")
    assert large > small + 512  # the large answers were held meanwhile
    assert after - small < 128, (small, large, after)
