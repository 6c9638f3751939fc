"""The pool under bursts, through the real stack: the listen backlog sized
to the pool (ss -lx shows it), capped by net.core.somaxconn with a
warning, an explicit one honoured; ready only when whole (right after
stack.start() returns every worker is up and idle; READY=1 on a
NOTIFY_SOCKET comes once the pool is whole, again after a reload); and a
dynamic pool that meets a burst of held requests within seconds.

The cap itself is unit-tested (tests/unit/test_listener.c): somaxconn
cannot be lowered here without changing the host for everyone.
"""

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import fcgi_client
from notify import Notify
from polling import wait_for
from test_pm import (chat_rows, children, direct_master, fcgi_chat,
                     fcgi_request, log_text, own_stack, restart_warnings,
                     status)

SS = "/usr/bin/ss"


def somaxconn():
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def listen_backlog(path):
    """The backlog of the unix socket listening on path, as ss -lx shows
    it (Send-Q of a listening socket), or None."""
    out = subprocess.run([SS, "-lxn"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    for line in out.splitlines():
        fields = line.split()
        if str(path) in fields and fields[1] == "LISTEN":
            return int(fields[3])
    return None


def need_ss():
    if not os.access(SS, os.X_OK):
        pytest.skip("ss (iproute2) is not installed")


# ------------------------------------------------------ the listen backlog

def test_backlog_is_sized_to_the_pool(stack_factory):
    need_ss()
    workers = 600  # above 511, the floor
    with own_stack(stack_factory, {"CHATFCGI_WORKERS": str(workers)}) as st:
        assert listen_backlog(st.socket_path) == min(workers, somaxconn())
        assert "listen backlog" not in log_text(st)


def test_small_pool_keeps_the_floor_and_explicit_is_honoured(stack_factory):
    need_ss()
    with own_stack(stack_factory, {"CHATFCGI_WORKERS": "2"}) as st:
        assert listen_backlog(st.socket_path) == min(511, somaxconn())
    with own_stack(stack_factory, {"CHATFCGI_WORKERS": "600",
                                   "CHATFCGI_LISTEN_BACKLOG": "100"}) as st:
        assert listen_backlog(st.socket_path) == 100


def test_backlog_over_somaxconn_is_capped_with_a_warning(stack_factory,
                                                         stack):
    """An explicit value above the kernel's cap: the socket gets the cap,
    and the log and chatfcgi -t name the sysctl to raise."""
    need_ss()
    cap = somaxconn()
    if cap >= 65535:
        pytest.skip(f"net.core.somaxconn is {cap}: nothing to cap")
    env = {"CHATFCGI_WORKERS": "2", "CHATFCGI_LISTEN_BACKLOG": str(cap + 1)}
    with own_stack(stack_factory, env) as st:
        assert listen_backlog(st.socket_path) == cap
        text = log_text(st)
        assert f"sysctl -w net.core.somaxconn={cap + 1}" in text, text
        assert re.search(r" warn listener: the listen backlog should be "
                         rf"{cap + 1} \(listen_backlog = {cap + 1}\)", text)
    with direct_master(stack) as m:
        m.write_conf(workers=cap + 1)  # sized to the pool: over the cap
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CHATFCGI_")}
        out = subprocess.run([st.bin, "-t", "-c", str(m.conf)], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "is valid" in out.stdout
        assert f"sysctl -w net.core.somaxconn={cap + 1}" in out.stderr
        assert "sized to the pool" in out.stderr


def test_reload_names_a_backlog_the_pool_outgrew(stack):
    """listen_backlog = 0 sizes the socket to the pool when it is made; a
    reload that grows the pool keeps the socket, so it says the backlog
    asked for changed and takes a restart, while a reload whose pool still
    fits the same backlog says nothing."""
    with direct_master(stack) as m:
        m.write_conf(workers=600)
        m.start(600)
        pid = m.proc.pid
        m.write_conf(workers=500)  # 511 asked for, not 600: a change too
        os.kill(pid, signal.SIGHUP)
        assert wait_for(lambda: len(restart_warnings(m.log_text())) == 1, 15)
        m.write_conf(workers=700)
        os.kill(pid, signal.SIGHUP)
        assert wait_for(lambda: len(restart_warnings(m.log_text())) == 2, 15)
        warned = restart_warnings(m.log_text())
        assert "listen_backlog (0: sized to the pool, workers = 500) " \
               "changed from 600 to 511" in warned[0], warned
        assert "listen_backlog (0: sized to the pool, workers = 700) " \
               "changed from 600 to 700" in warned[1], warned
        m.write_conf(workers=600, listen_backlog=600)  # the same number
        os.kill(pid, signal.SIGHUP)
        assert wait_for(lambda: m.log_text().count("reloading: exec") == 3,
                        15)
        # Reloads in quick succession, each before the last was whole: the
        # earlier generations make room, and the pool ends as configured.
        assert wait_for(lambda: len(children(pid)) == 600, 20), \
            (len(children(pid)), m.log_text()[-3000:])
        assert len(restart_warnings(m.log_text())) == 2
        assert fcgi_chat(m.sock, "after the reloads")[0] == 200


# ---------------------------------------------------- ready when whole

def test_start_returns_with_every_worker_up(stack_factory, http):
    """stack.start() (make start) returns only once the whole pool
    accepts: /api/status right after shows every worker, all idle."""
    workers = 300
    with own_stack(stack_factory, {"CHATFCGI_WORKERS": str(workers)}) as st:
        s = status(http, st)
        rows = chat_rows(s)
        assert len(rows) == workers, len(rows)
        assert s["idle_processes"] == workers, s["idle_processes"]
        assert {p["state"] for p in rows} == {"idle"}
        assert st.chatfcgi_status == \
            f"{workers} of {workers} chat workers accept connections"
        assert re.search(rf"the pool is whole: {workers} chat workers and "
                         r"the control worker accept connections",
                         log_text(st))


def status_via_socket(path):
    status, _, body = fcgi_request(path, method="GET", uri="/api/status")
    assert status == 200, body
    return json.loads(body)


def test_ready_only_when_whole_also_after_a_reload(stack):
    """READY=1 on a NOTIFY_SOCKET, as systemd gets it, comes once every
    worker accepts; after SIGHUP, RELOADING=1 and READY=1 again once the
    new generation does, the previous one serving meanwhile."""
    workers = 200
    with direct_master(stack) as m:
        notify = Notify(m.dir / "notify.sock")
        try:
            m.write_conf(workers=workers, status_listen=m.dir / "s.sock",
                         status_allow="*")
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith("CHATFCGI_")}
            env["NOTIFY_SOCKET"] = notify.path
            with open(m.dir / "stderr", "wb") as err:
                m.proc = subprocess.Popen(
                    [str(stack.bin), "-c", str(m.conf)], env=env,
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                    start_new_session=True)
            ready = notify.wait_for("READY=1", timeout=30)
            s = status_via_socket(m.dir / "s.sock")
            rows = chat_rows(s)
            assert len(rows) == workers and \
                {p["state"] for p in rows} == {"idle"}, s["idle_processes"]
            assert ready == (f"READY=1\nSTATUS={workers} of {workers} chat "
                             f"workers accept connections"), ready
            first = {p["pid"] for p in rows}

            os.kill(m.proc.pid, signal.SIGHUP)
            notify.wait_for("RELOADING=1", timeout=10)
            notify.wait_for("READY=1", timeout=30)
            rows = chat_rows(status_via_socket(m.dir / "s.sock"))
            new = [p for p in rows if p["pid"] not in first]
            assert len(new) == workers, len(new)
            assert {p["state"] for p in new} == {"idle"}
            assert len(re.findall("the pool is whole", m.log_text())) == 2
            # The previous generation leaves once the new one is ready.
            assert wait_for(lambda: len(chat_rows(status_via_socket(
                m.dir / "s.sock"))) == workers, 15)
        finally:
            notify.close()


# ----------------------------------------------------- dynamic growth

def test_dynamic_pool_meets_a_burst(stack_factory, http):
    """From its floor of 2, a dynamic pool takes a burst of 150 held
    requests within seconds (it used to add one worker a second), none
    refused, and never forks past `workers`."""
    burst, most = 150, 200
    env = {"CHATFCGI_PM": "dynamic", "CHATFCGI_WORKERS": str(most),
           "CHATFCGI_START_WORKERS": "2", "CHATFCGI_MIN_SPARE_WORKERS": "1",
           "CHATFCGI_MAX_SPARE_WORKERS": "3",
           "CHATFCGI_QUEUE_TIMEOUT_MS": "0"}
    with own_stack(stack_factory, env) as st:
        assert len(chat_rows(status(http, st))) == 2
        payload, socks = fcgi_client.partial_request(), []
        try:
            t0 = time.monotonic()
            for _ in range(burst):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect(str(st.socket_path))  # BlockingIOError: refused
                s.send(payload)
                socks.append(s)

            def busy():
                rows = chat_rows(status(http, st))
                return sum(p["state"] == "reading" for p in rows) >= burst
            assert wait_for(busy, 15, interval=0.05)
            took = time.monotonic() - t0
            rows = chat_rows(status(http, st))
            print(f"\nMEASURED dynamic pool 2 -> {len(rows)} workers for "
                  f"{burst} held requests in {took:.2f} s")
            assert len(rows) <= most
            assert took < 5, took
        finally:
            for s in socks:
                s.close()
        # Back to its spares once the burst is over.
        assert wait_for(lambda: len(chat_rows(status(http, st))) <= 3 + 2,
                        15)
