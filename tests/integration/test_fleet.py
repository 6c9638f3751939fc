"""Several app hosts and a Redis Cluster under host loss (issue 18),
simulated in network namespaces (netns.py) on a private segment:

- three app hosts, each its own chatfcgi pool on TCP (4 workers,
  wait_replicas = 1, rpm = 30 per client, the front trusted for
  X-Forwarded-For);
- one front nginx: deploy/nginx/chatfcgi.conf with
  deploy/nginx/chatfcgi-fleet.conf, and the local model beside it;
- a Redis Cluster of three masters and three replicas, one node per
  namespace.

For LOAD_S seconds six threads post turns through the front, each
session its own client (X-Forwarded-For). One app host is killed (every
process in its namespace), then one Redis master (kill -9; once its
replica is promoted it is started again, as a supervisor would, and
rejoins as the new master's replica, so that WAIT has a replica again).
Then a burst of one client's turns across the hosts. Asserted:

- every turn answered 200 is in Redis afterwards, whole and in order,
  and no session holds another session's message;
- every failure is a 503, in flight on the dead host, or on the dead
  master's slots within the failover window (printed, in seconds);
- the client's rpm holds across the fleet: 30 turns, at most one more.

Everything runs as root in namespaces the test makes and removes; every
process is stopped by PID. `make test-fleet` runs this file alone.
"""

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

import deploy_servers as ds
from conftest import sanitizer_report
from helpers import new_session
from netns import Segment, netns_available
from redis_cluster import Load, RedisCluster, assert_acked_stored, \
    assert_only_503, owner_of, wait_until

pytestmark = pytest.mark.skipif(not netns_available(),
                                reason="needs root and ip netns")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CHATFCGI_BIN", REPO / "bin" / "chatfcgi"))
NGINX_SITE = REPO / "deploy" / "nginx" / "chatfcgi.conf"
FLEET_CONF = REPO / "deploy" / "nginx" / "chatfcgi-fleet.conf"
LOCALMODEL = REPO / "app" / "localmodel.py"
HOSTS = ("app1", "app2", "app3")
RECIPE_HOSTS = ("10.0.1.11", "10.0.1.12", "10.0.1.13")
FRONT_PORT, MODEL_PORT, POOL_PORT, STATUS_PORT = 8080, 8081, 9000, 9001
REDIS_PORT = 6379
LOAD_S, APP_KILL_AT, REDIS_KILL_AT = 20, 5, 10
RPM = 30
PER_SESSION = 5


@pytest.fixture
def segment():
    with Segment(f"cf{os.getpid() % 100000}") as seg:
        yield seg


def tcp_open(host, port):
    try:
        with socket.create_connection((host, port), 0.5):
            return True
    except OSError:
        return False


class Fleet:
    """The hosts' addresses and processes; its methods run in a thread
    inside the front's namespace (Segment.run_inside), so that what they
    start there, and the sockets they open, are the front's."""

    def __init__(self, seg, d):
        self.seg, self.d = seg, d
        self.procs = ds.Procs()
        self.front = seg.add("front", 2)
        self.apps = [seg.add(h, 11 + i) for i, h in enumerate(HOSTS)]
        nodes = [(seg.add(f"r{j + 1}", 21 + j), REDIS_PORT)
                 for j in range(6)]
        self.cluster = RedisCluster(
            d / "redis", nodes, prefix=lambda i: seg.prefix_of(f"r{i + 1}"))
        self.url = f"http://{self.front}:{FRONT_PORT}"

    def stop(self):
        self.procs.stop_all()
        self.cluster.stop()

    def start(self):
        self.cluster.__enter__()
        self.procs.start("model", ["/usr/bin/python3", LOCALMODEL, "--host",
                                   self.front, "--port", MODEL_PORT],
                         self.d / "model.log")
        for host, address in zip(HOSTS, self.apps):
            self._start_app(host, address)
        self._start_front()
        http = new_session()
        assert wait_until(lambda: http.get(f"{self.url}/api/healthz",
                                           timeout=2).ok, 20), \
            "the fleet did not answer healthz"

    def _start_app(self, host, address):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CHATFCGI_")}
        env.update({
            "CHATFCGI_LISTEN": f"{address}:{POOL_PORT}",
            "CHATFCGI_STATUS_LISTEN": f"{address}:{STATUS_PORT}",
            "CHATFCGI_STATUS_ALLOW": self.front,
            "CHATFCGI_WORKERS": "4",
            "CHATFCGI_USER": ds.WEB_USER, "CHATFCGI_GROUP": ds.WEB_USER,
            "CHATFCGI_REDIS_URL": self.cluster.url,
            "CHATFCGI_REDIS_WAIT_REPLICAS": "1",
            "CHATFCGI_RATE_LIMIT_RPM": str(RPM),
            "CHATFCGI_TRUSTED_PROXIES": self.front,
            "CHATFCGI_UPSTREAM_URL": f"http://{self.front}:{MODEL_PORT}/v1",
            "CHATFCGI_MODEL": "local-eliza",
        })
        self.procs.start(host, self.seg.prefix_of(host) +
                         [BIN, "-c", REPO / "conf" / "chatfcgi.conf"],
                         self.d / f"{host}.log", env=env)
        assert wait_until(lambda: tcp_open(address, POOL_PORT), 15), \
            ds.tail(self.d / f"{host}.log")

    def _start_front(self):
        d = ds.make_dir(self.d / "nginx")
        site = ds.render(FLEET_CONF, list(zip(RECIPE_HOSTS, self.apps)))
        site += ds.render(NGINX_SITE, [
            ("listen 80;", f"listen {self.front}:{FRONT_PORT};"),
            ("listen [::]:80;", ""),
            ("fastcgi_pass unix:/run/chatfcgi/chatfcgi.sock;",
             "fastcgi_pass chatfcgi_pool;"),
            ("fastcgi_pass unix:/run/chatfcgi/status.sock;",
             "fastcgi_pass chatfcgi_status;"),
            ("fastcgi_connect_timeout 5s;", "fastcgi_connect_timeout 1s;"),
            ("/var/log/nginx/", f"{d}/"),
            ("/usr/share/chatfcgi/www", str(REPO / "app" / "www")),
        ])
        (d / "site.conf").write_text(site)
        (d / "nginx.conf").write_text(ds.nginx_main(d, FRONT_PORT,
                                                    d / "site.conf"))
        self.procs.start("nginx", [ds.NGINX, "-p", f"{d}/", "-c",
                                   d / "nginx.conf", "-e", d / "error.log"],
                         d / "stdout.log")
        assert wait_until(lambda: tcp_open(self.front, FRONT_PORT), 10), \
            ds.tail(d / "error.log")


def client_of(session):
    """One client (X-Forwarded-For) per session of the load."""
    _, i, n = session.rsplit("-", 2)
    return {"X-Forwarded-For": f"10.{i}.{int(n) // 250}.{int(n) % 250 + 1}"}


def client_slot_key(session):
    """A key in the slot of the session's client's rate counters
    (guard.c names a client by address "addr:<address>")."""
    return "{addr:%s}" % client_of(session)["X-Forwarded-For"]


def burst(url, n=40, threads=8):
    """n turns of one client from threads threads, through the front (so
    over the live hosts): their statuses."""
    if time.time() % 60 > 50:  # all in one minute's window
        time.sleep(61 - time.time() % 60)
    codes, lock = [], threading.Lock()

    def run(k):
        http = new_session()
        for j in range(k, n, threads):
            r = http.post(f"{url}/api/chat", timeout=10,
                          json={"session_id": f"burst-{j}",
                                "message": "burst"},
                          headers={"X-Forwarded-For": "192.0.2.99"})
            with lock:
                codes.append(r.status_code)
    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return codes


def stored(cluster, owners, session):
    items = cluster.command(owner_of(owners, session), "LRANGE",
                            f"chat:{{{session}}}:history", 0, -1)
    return [json.loads(i)["content"] for i in items
            if json.loads(i)["role"] == "user"]


def scenario(fleet):
    """Runs in the front's namespace: start, load, kill, burst, read."""
    fleet.start()
    cluster = fleet.cluster
    owners = cluster.slot_owners()
    victim = cluster.masters()[0]
    t = {}
    load = Load(fleet.url, threads=6, per_session=PER_SESSION, tag="fleet",
                headers=client_of).start()
    try:
        t["start"] = time.monotonic()
        time.sleep(APP_KILL_AT)
        t["app_killed"] = fleet.seg.kill_all("app2")
        t["app_dead"] = time.monotonic()
        time.sleep(max(0.0, t["start"] + REDIS_KILL_AT - time.monotonic()))
        t["redis_killed"] = cluster.kill(victim)
        assert wait_until(lambda: cluster.all_slots_served(victim), 20,
                          0.05), "no failover within 20 s"
        t["promoted"] = time.monotonic()
        cluster.restart(victim)
        assert wait_until(lambda: cluster.roles().get(victim) == "slave",
                          20, 0.1), "the old master did not rejoin"
        t["rejoined"] = time.monotonic()
        time.sleep(max(0.0, t["start"] + LOAD_S - time.monotonic()))
    finally:
        load.stop()
    t["end"] = time.monotonic()
    turns = load.snapshot()
    codes = burst(fleet.url)
    after = cluster.slot_owners()
    sessions = {x.session for x in turns if x.status == 200}
    history = {s: stored(cluster, after, s) for s in sessions}
    # A turn needs its session's master and, with rpm on, its client's
    # ({client} of the rate counters).
    on_victim = {s for s in {x.session for x in turns}
                 if victim in (owner_of(owners, s),
                               owner_of(owners, client_slot_key(s)))}
    return t, turns, codes, history, on_victim


def excused(x, t, on_victim):
    """A failure the issue allows: in flight on the dead host, or on the
    dead master's slots within the failover window."""
    in_flight = x.start <= t["app_dead"] and x.end >= t["app_killed"]
    window = (x.session in on_victim and x.end >= t["redis_killed"] and
              x.start <= t["rejoined"] + 1.5)
    return in_flight or window


def test_fleet_loses_no_acknowledged_turn(segment, tmp_path):
    began = time.monotonic()
    fleet = Fleet(segment, tmp_path)
    try:
        t, turns, codes, history, on_victim = segment.run_inside(
            "front", lambda: scenario(fleet))
    finally:
        fleet.stop()
    for host in HOSTS:
        log = (tmp_path / f"{host}.log").read_text(errors="replace")
        assert "POST /api/chat 200" in log, f"{host} served no turn"
        # With CHATFCGI_BIN=bin/chatfcgi-asan:
        report = sanitizer_report(tmp_path / f"{host}.log")
        assert not report, f"{host}:\n{report}"
    failed = [x for x in turns if x.status != 200]
    hit = [x for x in turns if x.session in on_victim and
           x.start > t["redis_killed"]]
    first_ok = min((x.end for x in hit if x.status == 200),
                   default=float("inf")) - t["redis_killed"]
    last_bad = max((x.end for x in failed if x.session in on_victim and
                    x.end >= t["redis_killed"]),
                   default=t["redis_killed"]) - t["redis_killed"]
    in_flight = [x for x in failed
                 if x.start <= t["app_dead"] and x.end >= t["app_killed"]]
    print(f"\nfleet: {len(turns)} turns in {t['end'] - t['start']:.1f} s, "
          f"{len(failed)} failed ({len(in_flight)} in flight on the killed "
          f"app host); Redis master kill -9 to "
          f"promotion {t['promoted'] - t['redis_killed']:.2f} s, to its "
          f"slots' first success {first_ok:.2f} s, to their last failure "
          f"{last_bad:.2f} s; rate burst {codes.count(200)} of {len(codes)} "
          f"allowed (rpm {RPM}); test {time.monotonic() - began:.0f} s")
    assert_only_503(turns)
    stray = [(x.start - t["start"], x.session, x.error) for x in failed
             if not excused(x, t, on_victim)]
    assert not stray, stray[:5]
    assert_acked_stored(turns, history.__getitem__)
    for session, got in history.items():
        # Load's messages are "turn <tag> <thread> <n>"; a session holds
        # those of its own thread and turns n0 .. n0 + PER_SESSION - 1.
        _, i, n0 = session.rsplit("-", 2)
        for m in got:
            _, _, mi, mn = m.split(" ")
            assert mi == i and 0 <= int(mn) - int(n0) < PER_SESSION, \
                (session, got)
    assert set(codes) <= {200, 429}, codes
    assert RPM <= codes.count(200) <= RPM + 1, codes
