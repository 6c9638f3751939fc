"""Redis going away under load: a restart, a crash (kill -9) with the
stack's append-only file, and a Sentinel failover, with and without
[redis] wait_replicas.

Each test runs chat turns from 4 threads (tests/integration/redis_cluster.py
Load) while Redis fails, and checks that:
- every failed request is 503 unavailable (the contract's row for "Redis
  unreachable"), and requests succeed again once Redis is back;
- no chatfcgi worker was restarted (the master's children are the same
  pids): the workers reconnect on their own;
- no acknowledged turn is lost where the setup promises it.

The measured figures are printed (run with -s to see them on success).
"""

import json
import os
import signal
import time

import pytest

from redis_cluster import (Load, Outage, SentinelGroup, assert_only_503,
                           redis_command, try_command, wait_until,
                           worker_pids)

STACK_ENV = {"CHATFCGI_WORKERS": "4"}

LOAD_S = 10

# After Redis is back, a worker may still wait out its reconnect backoff
# (at most 1 s, store.c BACKOFF_MAX_MS) before it tries again.
BACKOFF_MAX_S = 1.0


def history_messages(http, st, session):
    """The user messages of a session, through the API. A worker may
    still wait out its backoff after Redis came back: 503s are retried
    for a while."""
    def get():
        r = http.get(f"{st.url}/api/chat/{session}", timeout=5)
        return r if r.status_code != 503 else None
    r = wait_until(get, BACKOFF_MAX_S + 2)
    assert r is not None, "GET still 503 after Redis came back"
    if r.status_code == 404:
        return []
    assert r.status_code == 200, r.text
    return [m["content"] for m in r.json()["messages"] if m["role"] == "user"]


def stored_messages(port, session):
    """The user messages of a session, read from Redis at port."""
    items = redis_command(port, "LRANGE", f"chat:{{{session}}}:history",
                          0, -1)
    return [json.loads(i)["content"] for i in items
            if json.loads(i)["role"] == "user"]


def lost_turns(acked, read):
    """The acknowledged turns missing from their session's history;
    read(session) gives its user messages."""
    by_session = {}
    for t in acked:
        by_session.setdefault(t.session, []).append(t)
    lost = []
    for session, turns in by_session.items():
        present = set(read(session))
        lost += [t for t in turns if t.message not in present]
    return lost


# ---------------------------------------------------------- restart

def test_redis_restart_under_load(stack, model):
    master = stack.pid("chatfcgi")
    workers = worker_pids(master)
    began = time.monotonic()
    load = Load(stack.url, tag="restart").start()
    try:
        time.sleep(2)
        down = time.monotonic()
        stack.stop_service("redis")
        time.sleep(2)
        stack.start_service("redis")
        up = time.monotonic()
        time.sleep(max(0.0, began + LOAD_S - time.monotonic()))
    finally:
        load.stop()
        stack.start_service("redis")
    turns = load.snapshot()
    out = Outage(turns, after=down, back=up)
    failed = [t for t in turns if t.status != 200]
    print(f"\nRedis restart under load: {len(turns)} turns; Redis down "
          f"{up - down:.2f} s (stop to ready again); {out}")
    assert_only_503(turns)
    assert failed, "no request failed: was Redis really down under load?"
    # Failures only while Redis was down (and a worker's backoff after).
    late = [t for t in failed if t.end < down or
            t.start > up + BACKOFF_MAX_S + 0.5]
    assert not late, [(t.start - down, t.error) for t in late[:5]]
    after = [t for t in turns if t.start > up + BACKOFF_MAX_S + 0.5]
    assert after and all(t.status == 200 for t in after), \
        "requests still fail after Redis came back"
    assert worker_pids(master) == workers, "a worker was restarted"
    assert stack.pid("chatfcgi") == master


# ---------------------------------------------------------- kill -9

def test_redis_kill_9_loses_no_turn_acknowledged_a_second_before(
        stack, http, model):
    """appendonly yes, appendfsync everysec (deploy/local/redis.conf.in):
    a crash may lose at most the last second of writes. Every turn
    acknowledged more than 1 s before the kill must be in the history
    after Redis starts again from its append-only file."""
    master = stack.pid("chatfcgi")
    workers = worker_pids(master)
    redis_pid = stack.pid("redis")
    load = Load(stack.url, tag="kill9").start()
    try:
        time.sleep(3)
        killed = time.monotonic()
        os.kill(redis_pid, signal.SIGKILL)
        time.sleep(0.5)
    finally:
        load.stop()
        stack.start_service("redis")
    turns = load.snapshot()
    acked = [t for t in turns if t.status == 200 and t.end < killed]
    assert len(acked) > 20, f"only {len(acked)} turns before the kill"
    assert wait_until(lambda: http.get(f"{stack.url}/api/healthz",
                                       timeout=5).status_code == 200, 5)
    lost = lost_turns(acked, lambda s: history_messages(http, stack, s))
    old = [t for t in lost if t.end < killed - 1]
    print(f"\nRedis kill -9: {len(acked)} turns acknowledged before the "
          f"kill, {len(lost)} lost ({len(old)} acknowledged more than 1 s "
          f"before it)")
    assert_only_503(turns)
    assert not old, [(t.session, t.message, killed - t.end) for t in old]
    assert worker_pids(master) == workers, "a worker was restarted"


# ---------------------------------------------------------- Sentinel

@pytest.fixture
def sentinel_group(tmp_path, free_ports):
    with SentinelGroup(tmp_path, free_ports(5)) as group:
        yield group


def sentinel_stack(stack_factory, group, wait_replicas):
    return stack_factory({
        "CHATFCGI_WORKERS": "4",
        "CHATFCGI_REDIS_SENTINELS": group.sentinels,
        "CHATFCGI_REDIS_MASTER_NAME": group.name,
        "CHATFCGI_REDIS_WAIT_REPLICAS": str(wait_replicas),
    })


def failover_done(group):
    return group.master_addr() == ("127.0.0.1", group.replica_port)


def test_sentinel_failover_under_load(stack_factory, sentinel_group):
    group = sentinel_group
    st = sentinel_stack(stack_factory, group, 0)
    master = st.pid("chatfcgi")
    workers = worker_pids(master)
    load = Load(st.url, tag="failover").start()
    try:
        time.sleep(2)
        killed = group.kill_master()
        recovered = wait_until(
            lambda: [t.end for t in load.snapshot()
                     if t.status == 200 and t.start > killed], 30, 0.1)
        time.sleep(BACKOFF_MAX_S + 2)
    finally:
        load.stop()
    turns = load.snapshot()
    out = Outage(turns, after=killed, back=killed)
    acked = [t for t in turns if t.status == 200 and t.end < killed]
    lost = lost_turns(acked,
                      lambda s: stored_messages(group.replica_port, s))
    print(f"\nSentinel failover under load: {len(turns)} turns; after the "
          f"kill -9 of the master {out}; {len(lost)} of {len(acked)} turns "
          f"acknowledged before the kill missing on the new master "
          f"(wait_replicas = 0: replication is asynchronous)")
    assert recovered, "no turn succeeded within 30 s of the kill"
    assert failover_done(group)
    assert_only_503(turns)
    after = [t for t in turns
             if t.start > min(recovered) + BACKOFF_MAX_S + 0.5]
    assert after and all(t.status == 200 for t in after), \
        "requests still fail after the failover"
    assert worker_pids(master) == workers, "a worker was restarted"
    log = st.log_path("chatfcgi").read_text(errors="replace")
    assert f"following Redis master 127.0.0.1:{group.replica_port}" in log


def test_sentinel_failover_with_wait_replicas_loses_no_turn(
        stack_factory, sentinel_group, http):
    """wait_replicas = 1: a turn is acknowledged only once the replica has
    it, so the replica promoted after the master's death has every turn
    acknowledged before. With no replica left after the failover, every
    turn then fails WAIT: 503, though it stays on the new master."""
    group = sentinel_group
    st = sentinel_stack(stack_factory, group, 1)
    master = st.pid("chatfcgi")
    workers = worker_pids(master)
    load = Load(st.url, tag="wait").start()
    try:
        time.sleep(2)
        killed = group.kill_master()
        assert wait_until(lambda: failover_done(group), 30, 0.1), \
            "no failover within 30 s:\n" + group.log("sentinel0")
        failed_over = time.monotonic()
    finally:
        load.stop()
    turns = load.snapshot()
    acked = [t for t in turns if t.status == 200 and t.end < killed]
    assert len(acked) > 20, f"only {len(acked)} turns before the kill"
    lost = lost_turns(acked,
                      lambda s: stored_messages(group.replica_port, s))
    print(f"\nSentinel failover, wait_replicas = 1: {len(acked)} turns "
          f"acknowledged before the kill, {len(lost)} missing on the new "
          f"master; failover {failed_over - killed:.2f} s after the kill")
    assert not lost, [(t.session, t.message) for t in lost[:5]]
    assert_only_503(turns)

    def refused_for_want_of_replicas():
        r = http.post(f"{st.url}/api/chat", json={"message": "alone"},
                      timeout=10)
        return r.status_code == 503 and "replicas" in r.text
    assert wait_until(refused_for_want_of_replicas, 10, 0.2), \
        "the new master has no replica, yet turns were not refused"
    assert try_command(group.replica_port, "ROLE")[0] == b"master"
    assert worker_pids(master) == workers, "a worker was restarted"
