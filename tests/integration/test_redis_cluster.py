"""chatfcgi on a Redis Cluster of three masters and a replica each, on
free loopback ports (tests/integration/redis_cluster.py RedisCluster),
with redis_url = redis-cluster://... and the turns going through nginx:

- sessions spread over the masters, each history whole on its session's
  master; GET and DELETE; an Idempotency-Key without a session and rate
  limits, whose keys live in the client's slot;
- a slot migrated under a running pool: ASK while it moves, MOVED after;
- a master killed (kill -9) under load with wait_replicas = 1: no turn
  acknowledged is lost, failures are 503 and stay within the failover
  window (printed; run with -s), no worker is restarted.
"""

import json
import threading
import time

import pytest

from redis_cluster import Load, RedisCluster, assert_acked_stored, \
    assert_only_503, key_slot, owner_of, wait_until, worker_pids

LOAD_S = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, free_ports):
    ports = free_ports(12)
    nodes = [("127.0.0.1", p) for p in ports[:6]]
    with RedisCluster(tmp_path_factory.mktemp("cluster"), nodes,
                      ports[6:]) as c:
        yield c


@pytest.fixture(scope="module")
def st(stack_factory, cluster):
    return stack_factory({"CHATFCGI_WORKERS": "4",
                          "CHATFCGI_REDIS_URL": cluster.url})


def post(http, st, message, session=None, headers=None):
    body = {"message": message}
    if session is not None:
        body["session_id"] = session
    return http.post(f"{st.url}/api/chat", json=body, headers=headers,
                     timeout=10)


def stored_messages(cluster, session):
    """The user messages of a session, read from its slot's master."""
    items = cluster.read(["LRANGE", f"chat:{{{session}}}:history", 0, -1])
    return [json.loads(i)["content"] for i in items
            if json.loads(i)["role"] == "user"]


def test_sessions_spread_over_the_masters(http, st, cluster):
    sessions = [f"spread-{i}" for i in range(24)]
    for s in sessions:
        for n in range(2):
            r = post(http, st, f"{s} turn {n}", s)
            assert r.status_code == 200, r.text
    owners = {cluster.owner(f"chat:{{{s}}}:history") for s in sessions}
    assert len(owners) == 3, f"24 sessions on masters {owners} only"
    for s in sessions:
        assert stored_messages(cluster, s) == [f"{s} turn 0", f"{s} turn 1"]
        got = http.get(f"{st.url}/api/chat/{s}", timeout=5).json()
        assert [m["content"] for m in got["messages"]][::2] == \
            [f"{s} turn 0", f"{s} turn 1"]
    assert http.delete(f"{st.url}/api/chat/{sessions[0]}",
                       timeout=5).status_code in (200, 204)
    assert stored_messages(cluster, sessions[0]) == []


def test_idempotency_key_without_a_session(http, st, cluster):
    """The record lives in the client's slot ({addr:...}), the turn in
    its new session's: two scripts, and the retry still replays."""
    headers = {"Idempotency-Key": "cluster-order-1"}
    first = post(http, st, "no session given", headers=headers)
    again = post(http, st, "no session given", headers=headers)
    assert first.status_code == again.status_code == 200, again.text
    assert again.json() == first.json()
    sid = first.json()["session_id"]
    assert stored_messages(cluster, sid) == ["no session given"]
    other = post(http, st, "another message", headers=headers)
    assert other.status_code == 422, other.text


def test_rate_limits_hold_across_slots(http, stack_factory, cluster):
    """rpm counts every turn of the client, whichever master its session
    lives on (here one session per turn)."""
    limited = stack_factory({"CHATFCGI_WORKERS": "2",
                             "CHATFCGI_REDIS_URL": cluster.url,
                             "CHATFCGI_RATE_LIMIT_RPM": "5"})
    if time.time() % 60 > 45:  # the whole test in one minute's window
        time.sleep(61 - time.time() % 60)
    codes = [post(http, limited, "limited", f"rl-{i}").status_code
             for i in range(8)]
    assert codes == [200] * 5 + [429] * 3, codes
    r = http.get(f"{limited.url}/api/chat/rl-0", timeout=5)
    assert r.status_code == 429


def script_calls(cluster):
    """EVAL and EVALSHA run so far on the masters (a NOSCRIPT refusal
    does not count): one per round trip of chatdb."""
    n = 0
    for i in cluster.masters():
        stats = cluster.command(i, "INFO", "commandstats").decode()
        for line in stats.splitlines():
            if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
                n += int(line.split("calls=")[1].split(",")[0])
    return n


@pytest.mark.parametrize("limits, per_turn", [
    ({}, 2),
    ({"CHATFCGI_RATE_LIMIT_RPM": "1000"}, 3),
    ({"CHATFCGI_RATE_LIMIT_RPM": "1000",
      "CHATFCGI_RATE_LIMIT_TPM": "1000000"}, 4),
])
def test_round_trips_per_turn(http, stack_factory, cluster, limits,
                              per_turn):
    """Two scripts a turn, as on one server; the client's rate counters
    add one at begin (rpm, tpm) and one at commit (tpm)."""
    limited = stack_factory({"CHATFCGI_WORKERS": "2",
                             "CHATFCGI_REDIS_URL": cluster.url, **limits})
    tag = "-".join(sorted(limits)) or "none"
    for i in range(6):  # every master has the scripts
        assert post(http, limited, "warm", f"warm-{tag}-{i}").ok
    before = script_calls(cluster)
    for i in range(20):
        assert post(http, limited, "counted", f"rt-{tag}-{i}").ok
    assert script_calls(cluster) - before == 20 * per_turn


def node_id(cluster, i):
    return cluster.command(i, "CLUSTER", "MYID").decode()


def test_slot_migration_ask_then_moved(http, st, cluster):
    """Move a session's slot to another master under the running pool.
    While its keys are on the target but the slot is still the source's,
    the source answers ASK, and the target (ASKING) TRYAGAIN to a script
    whose keys are not all there yet: the turn is retried, within
    command_timeout_ms, until the slot is the target's (then MOVED)."""
    session = "migrating-session"
    assert post(http, st, "before", session).status_code == 200
    slot = key_slot(session)
    source = cluster.owner(session)
    target = next(i for i in cluster.masters() if i != source)
    src_id, dst_id = node_id(cluster, source), node_id(cluster, target)
    host, port = cluster.nodes[target]
    cluster.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    cluster.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    keys = cluster.command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100)
    assert keys, "the session has no key in its slot"
    cluster.command(source, "MIGRATE", host, port, "", 0, 5000, "KEYS",
                    *keys)
    result = {}
    moving = threading.Thread(target=lambda: result.update(
        r=post(http, st, "while moving", session)))
    moving.start()
    time.sleep(0.4)
    for i in cluster.masters():
        cluster.command(i, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    moving.join(10)
    assert result["r"].status_code == 200, result["r"].text
    for n in range(4):  # every worker: the others still name the source
        r = post(http, st, f"after {n}", session)
        assert r.status_code == 200, r.text
    assert cluster.owner(session) == target
    assert stored_messages(cluster, session) == \
        ["before", "while moving"] + [f"after {n}" for n in range(4)]


def on_node(owners, node, session):
    return owner_of(owners, session) == node


def test_master_killed_under_load_loses_no_acknowledged_turn(
        http, stack_factory, cluster):
    """wait_replicas = 1: a turn is answered 200 only once its master's
    replica has it, so the replica promoted after the kill has every one.
    Turns of the dead master's slots fail (503) from the kill until the
    promotion, and then until the old master, started again, is the new
    one's replica (WAIT has none before); the other slots go on."""
    st = stack_factory({"CHATFCGI_WORKERS": "4",
                        "CHATFCGI_REDIS_URL": cluster.url,
                        "CHATFCGI_REDIS_WAIT_REPLICAS": "1"})
    master = st.pid("chatfcgi")
    workers = worker_pids(master)
    owners = cluster.slot_owners()
    victim = cluster.masters()[0]
    load = Load(st.url, threads=4, tag="cluster-kill").start()
    try:
        time.sleep(2.5)
        killed = cluster.kill(victim)
        assert wait_until(lambda: cluster.all_slots_served(victim), 20,
                          0.05), "no failover within 20 s"
        promoted = time.monotonic()
        cluster.restart(victim)
        assert wait_until(lambda: cluster.roles().get(victim) == "slave",
                          20, 0.1)
        rejoined = time.monotonic()
        time.sleep(max(2.0, killed + LOAD_S - time.monotonic()))
    finally:
        load.stop()
    turns = load.snapshot()
    failed = [t for t in turns if t.status != 200]
    hit = [t for t in turns if t.start > killed and
           on_node(owners, victim, t.session)]
    first_ok = min((t.end for t in hit if t.status == 200 and
                    t.start > promoted), default=float("inf"))
    print(f"\nRedis Cluster master killed under load: {len(turns)} turns, "
          f"{len(failed)} failed; failover (kill to promotion) "
          f"{promoted - killed:.2f} s; old master back as a replica after "
          f"{rejoined - killed:.2f} s; first success on its slots "
          f"{first_ok - killed:.2f} s after the kill")
    assert_only_503(turns)
    # Only in flight at the kill, or on the dead master's slots until its
    # slots had a master with a replica again.
    stray = [t for t in failed if t.end < killed or
             t.start > rejoined + 1.5 or
             not on_node(owners, victim, t.session)]
    assert not stray, [(t.start - killed, t.session, t.error)
                       for t in stray[:5]]
    assert_acked_stored(turns, lambda s: stored_messages(cluster, s))
    after = [t for t in turns if t.start > rejoined + 1.5]
    assert after and all(t.status == 200 for t in after)
    assert worker_pids(master) == workers, "a worker was restarted"
    log = st.log_path("chatfcgi").read_text(errors="replace")
    assert "Redis Cluster master" in log
