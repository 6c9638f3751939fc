"""The deployment recipes of deploy/, started for real.

Each web server is the Debian package's binary (nginx, apache2 with
mod_proxy_fcgi or mod_fcgid, lighttpd), run with a configuration GENERATED
from the shipped recipe by replacing a few production values (ports, socket
and log directories, the binary and configuration paths: the list is in
deploy/README.md, "What the tests change"), under a temp dir, on a free
loopback port, never the system's services. chatfcgi uses the module
stack's Redis and local model. Through each server: one chat turn (200
JSON), one stream whose first delta arrives at least 500 ms before its last
(the model waits 200 ms between pieces), and the history GET; a client key
is configured everywhere, so that each server is also seen to pass the
Authorization header on.

systemd: `systemd-analyze verify` on the units; socket activation with the
sockets the units declare (systemd-socket-activate), as a non-root user like
DynamicUser=, sd_notify READY/RELOADING/STOPPING, ExecReload; and, under
strace, the system calls chatfcgi makes against the unit's SystemCallFilter=
and RestrictAddressFamilies=. logrotate: the snippet parses, and a real
rotation makes chatfcgi write to the new file (SIGUSR1).

Every process is stopped by its pid in a finally; every wait has a deadline.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import deploy_servers as ds
from fcgi_client import chat_params, fcgi_request
from helpers import assert_json_error
from notify import Notify
from sse_client import stream_chat

STACK_ENV = {"CHATFCGI_WORKERS": "2"}

MODEL = "local-eliza"
CLIENT_KEY = "deploy-test-key-0123"
KEY_DIGEST = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
STREAM_REPLY = "a b c d e"
CHUNK_DELAY_MS = 200
MIN_SPREAD_S = 0.5  # first delta before the last, at least

DEPLOY = ds.DEPLOY
NGINX_SITE = DEPLOY / "nginx" / "chatfcgi.conf"
APACHE_PROXY = DEPLOY / "apache" / "chatfcgi-proxy-fcgi.conf"
APACHE_FCGID = DEPLOY / "apache" / "chatfcgi-fcgid.conf"
LIGHTTPD = DEPLOY / "lighttpd" / "chatfcgi.conf"
SPAWN_SH = DEPLOY / "spawn-fcgi" / "chatfcgi.sh"
SYSTEMD = DEPLOY / "systemd"
SERVICE = SYSTEMD / "chatfcgi.service"
SOCKET_UNITS = (SYSTEMD / "chatfcgi.socket",
                SYSTEMD / "chatfcgi-status.socket")
LOGROTATE = DEPLOY / "logrotate" / "chatfcgi"
DEFAULT_CONF = ds.REPO / "conf" / "chatfcgi.conf"

# The production values the recipes hold, which the tests replace.
RUN_DIR = "/run/chatfcgi/"
BIN_PATH = "/usr/sbin/chatfcgi"
CONF_PATH = "/etc/chatfcgi/chatfcgi.conf"
WWW_DIR = "/usr/share/chatfcgi/www"


def need(*programs):
    missing = [p for p in programs if not Path(p).exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: install the Debian "
                    f"packages listed in deploy/README.md (make deps)",
                    pytrace=False)


@pytest.fixture
def work(request):
    """A temp dir www-data can enter, and the Procs started in it; every
    process is stopped at the end, pass or fail. The dir (configs, logs) is
    kept, and named, when the test failed."""
    d = Path(tempfile.mkdtemp(prefix="cd"))
    d.chmod(0o755)
    procs = ds.Procs()
    failed_before = request.session.testsfailed
    try:
        yield d, procs
    finally:
        procs.stop_all()
        leftovers = ds.pids_running(str(d))
        ds.kill_pids(leftovers)
        if request.session.testsfailed > failed_before:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
        assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture
def streaming_model(model):
    model.set(chunk_delay_ms=CHUNK_DELAY_MS, reply=STREAM_REPLY)
    return model


def pool_env(stack, **settings):
    """chatfcgi's environment: the caller's without any CHATFCGI_*, plus the
    stack's Redis and model, the client key, and settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHATFCGI_")}
    env.update({
        "CHATFCGI_REDIS_URL": f"redis://127.0.0.1:{stack.redis_port}/0",
        "CHATFCGI_UPSTREAM_URL": f"{stack.model_url}/v1",
        "CHATFCGI_MODEL": MODEL,
        "CHATFCGI_CLIENT_KEYS": KEY_DIGEST,
        "CHATFCGI_WORKERS": "2",
        "CHATFCGI_USER": ds.WEB_USER,
        "CHATFCGI_GROUP": ds.WEB_USER,
    })
    env.update({k: str(v) for k, v in settings.items()})
    return env


def start_pool(stack, procs, d, status=True):
    """chatfcgi -c conf/chatfcgi.conf on d/run/chatfcgi.sock (and
    status.sock), as the systemd unit or an administrator would run it."""
    run = ds.make_dir(d / "run")
    env = pool_env(stack, CHATFCGI_LISTEN=run / "chatfcgi.sock",
                   CHATFCGI_STATUS_LISTEN=(run / "status.sock" if status
                                           else "off"))
    log = d / "chatfcgi.log"
    proc = procs.start("chatfcgi", [stack.bin, "-c", DEFAULT_CONF], log,
                       env=env)
    ds.wait_until(lambda: ds.is_socket(run / "chatfcgi.sock") and
                  (not status or ds.is_socket(run / "status.sock")),
                  ds.START_TIMEOUT, "chatfcgi sockets", proc=proc, log=log)
    return proc


def spawned_conf(stack, d):
    """A chatfcgi.conf for processes a web server starts itself (they get
    no environment from the test). `user` is set on purpose: the recipes
    must override it, as those processes start as www-data."""
    path = d / "chatfcgi.conf"
    path.write_text(f"""client_keys = {KEY_DIGEST}
user = {ds.WEB_USER}
[redis]
url = redis://127.0.0.1:{stack.redis_port}/0
[upstream]
url = {stack.model_url}/v1
model = {MODEL}
""")
    path.chmod(0o644)
    return path


def exercise(http, base, health=True):
    """The three checks every server must pass, plus health: one turn, one
    stream that arrives piece by piece, the history."""
    sid = "dep-" + uuid.uuid4().hex
    r = http.post(f"{base}/api/chat", json={"session_id": sid,
                                            "message": "Hello there"},
                  headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["session_id"] == sid and body["reply"] == STREAM_REPLY
    assert body["model"] == MODEL
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers.get("X-Request-Id", ""))

    res = stream_chat(base, "Tell me more", session_id=sid, headers=AUTH,
                      read_timeout=5, total_timeout=20)
    assert res.status == 200, (res.status, res.body)
    assert res.is_sse, res.headers
    assert res.names == ["delta"] * 5 + ["done"], res.events
    assert res.text == STREAM_REPLY
    spread = res.deltas[-1].t - res.deltas[0].t
    assert spread >= MIN_SPREAD_S, (
        f"the deltas arrived together ({spread * 1000:.0f} ms from first to "
        f"last): something buffers the stream")

    r = http.get(f"{base}/api/chat/{sid}", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    messages = r.json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert [m["content"] for m in messages] == [
        "Hello there", STREAM_REPLY, "Tell me more", STREAM_REPLY]

    if health:
        r = http.get(f"{base}/api/healthz", timeout=10)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ok", "redis": "ok"}
    return spread


def pool_down_is_503(http, base, procs, pool, request_id=True):
    """With the pool stopped, the web server itself answers: 503 JSON
    (request_id: with an X-Request-Id, as nginx's error pages have)."""
    assert procs.stop(pool), "chatfcgi did not stop on SIGTERM in time"
    r = http.post(f"{base}/api/chat", json={"message": "anyone?"},
                  headers=AUTH, timeout=10)
    assert_json_error(r, 503, "unavailable", request_id=request_id)
    assert r.headers.get("Retry-After") == "1"


# ------------------------------------------------------------- nginx

def nginx_site(d, port, sockets_dir):
    return ds.render(NGINX_SITE, [
        ("listen 80;", f"listen 127.0.0.1:{port};"),
        ("listen [::]:80;", ""),
        (RUN_DIR, f"{sockets_dir}/"),
        ("/var/log/nginx/", f"{d}/nginx/"),
        (WWW_DIR, str(ds.REPO / "app" / "www")),
    ])


def test_nginx_site(stack, streaming_model, http, work, free_ports):
    need(ds.NGINX)
    d, procs = work
    port, = free_ports(1)
    pool = start_pool(stack, procs, d)
    ds.start_nginx(procs, d / "nginx", port, nginx_site(d, port, d / "run"))
    base = f"http://127.0.0.1:{port}"
    spread = exercise(http, base)
    print(f"nginx: first to last delta {spread * 1000:.0f} ms")
    # Status and metrics come from the status socket, for loopback.
    r = http.get(f"{base}/api/metrics", timeout=10)
    assert r.status_code == 200 and "chatfcgi" in r.text, r.text[:300]
    # The chat page, with its Content-Security-Policy.
    r = http.get(f"{base}/", timeout=10)
    assert r.status_code == 200, r.text[:300]
    assert r.headers["Content-Type"].startswith("text/html"), r.headers
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.text == (ds.REPO / "app" / "www" / "index.html").read_text()
    # nginx's own errors are the API's JSON.
    assert_json_error(http.get(f"{base}/nothing/here", timeout=10), 404,
                      "not_found")
    r = http.post(f"{base}/api/chat", data=b"x" * (2 << 20),
                  headers={"Content-Type": "application/json"}, timeout=10)
    assert_json_error(r, 413, "too_large")
    pool_down_is_503(http, base, procs, pool)


# ------------------------------------------------------------- Apache

def test_apache_proxy_fcgi(stack, streaming_model, http, work, free_ports):
    need(ds.APACHE, ds.APACHE_MODULES / "mod_proxy_fcgi.so")
    d, procs = work
    port, = free_ports(1)
    pool = start_pool(stack, procs, d)
    site = ds.render(APACHE_PROXY, [("*:80", f"*:{port}"),
                                    (RUN_DIR, f"{d}/run/")])
    ds.start_apache(procs, d / "apache", port, site, ("proxy", "proxy_fcgi"))
    base = f"http://127.0.0.1:{port}"
    spread = exercise(http, base)
    print(f"apache proxy_fcgi: first to last delta {spread * 1000:.0f} ms")
    r = http.get(f"{base}/api/metrics", timeout=10)  # the status socket
    assert r.status_code == 200 and "chatfcgi" in r.text, r.text[:300]
    # Apache's own error pages (ErrorDocument) carry no X-Request-Id.
    assert_json_error(http.get(f"{base}/nothing/here", timeout=10), 404,
                      "not_found", request_id=False)
    pool_down_is_503(http, base, procs, pool, request_id=False)


def test_apache_fcgid(stack, streaming_model, http, work, free_ports):
    need(ds.APACHE, ds.APACHE_MODULES / "mod_fcgid.so")
    d, procs = work
    port, = free_ports(1)
    conf = spawned_conf(stack, d)
    site = ds.render(APACHE_FCGID, [("*:80", f"*:{port}"),
                                    (BIN_PATH, str(stack.bin)),
                                    (CONF_PATH, str(conf))])
    fcgid = d / "apache" / "fcgid"
    apache = ds.start_apache(
        procs, d / "apache", port, site, ("fcgid",),
        extra=f"FcgidIPCDir {fcgid}\nFcgidProcessTableFile {fcgid}/shm")
    base = f"http://127.0.0.1:{port}"
    spread = exercise(http, base)
    print(f"apache fcgid: first to last delta {spread * 1000:.0f} ms")
    # The processes are `chatfcgi -S`, started by Apache, as www-data.
    pids = ds.pids_running(str(conf))
    assert pids, "no chatfcgi process under mod_fcgid"
    for pid in pids:
        assert " -S " in ds.cmdline(pid)
        assert Path(f"/proc/{pid}").stat().st_uid == ds.web_ids()[0]
    # Apache stops them with itself.
    assert procs.stop(apache), "apache2 did not stop in time"
    ds.wait_until(lambda: not ds.pids_running(str(conf)), 10,
                  "chatfcgi processes gone with Apache")


# ------------------------------------------------------------- lighttpd

def test_lighttpd_external_pool(stack, streaming_model, http, work,
                                free_ports):
    need(ds.LIGHTTPD)
    d, procs = work
    port, = free_ports(1)
    start_pool(stack, procs, d)
    recipe = ds.render(LIGHTTPD, [(RUN_DIR, f"{d}/run/")])
    ds.start_lighttpd(procs, d / "lighttpd", port, recipe)
    spread = exercise(http, f"http://127.0.0.1:{port}")
    print(f"lighttpd, external pool: first to last delta "
          f"{spread * 1000:.0f} ms")


def test_lighttpd_spawned(stack, streaming_model, http, work, free_ports):
    need(ds.LIGHTTPD)
    d, procs = work
    port, = free_ports(1)
    conf = spawned_conf(stack, d)
    sockets = ds.make_dir(d / "lighttpd-run", owner=ds.web_ids())
    text = ds.switch_variant(LIGHTTPD.read_text(), "A", "B")
    for old, new in (("/run/lighttpd/", f"{sockets}/"),
                     (BIN_PATH, str(stack.bin)), (CONF_PATH, str(conf))):
        assert old in text, old
        text = text.replace(old, new)
    lighttpd = ds.start_lighttpd(procs, d / "lighttpd", port, text)
    spread = exercise(http, f"http://127.0.0.1:{port}")
    print(f"lighttpd, bin-path: first to last delta {spread * 1000:.0f} ms")
    pids = ds.pids_running(str(conf))
    assert len(pids) == 4, pids  # max-procs
    assert all(" -S " in ds.cmdline(p) for p in pids)
    assert procs.stop(lighttpd), "lighttpd did not stop in time"
    ds.wait_until(lambda: not ds.pids_running(str(conf)), 10,
                  "chatfcgi processes gone with lighttpd")


# ------------------------------------------------------------- spawn-fcgi

def test_spawn_fcgi(stack, streaming_model, http, work, free_ports):
    need(ds.SPAWN_FCGI, ds.NGINX)
    d, procs = work
    port, = free_ports(1)
    run = ds.make_dir(d / "run")
    env = pool_env(stack, SPAWN_BIN=stack.bin, SPAWN_CONF=DEFAULT_CONF,
                   SPAWN_SOCKET=run / "chatfcgi.sock",
                   CHATFCGI_STATUS_LISTEN="off")
    log = d / "spawn.log"
    pool = procs.start("spawn-fcgi", ["/bin/sh", SPAWN_SH], log, env=env)
    sock = run / "chatfcgi.sock"
    ds.wait_until(lambda: ds.is_socket(sock) and "listening" in
                  Path(log).read_text(), ds.START_TIMEOUT,
                  "spawn-fcgi socket", proc=pool, log=log)
    st = sock.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (
        0o660, 0, ds.web_ids()[1])
    # The script execs spawn-fcgi, which execs chatfcgi: one pid.
    assert ds.cmdline(pool.pid).startswith(f"{stack.bin} -c")
    # chatfcgi opens no status socket when handed its socket on fd 0 (see
    # test_spawn_fcgi_status_socket): health goes to the chat socket, as
    # deploy/README.md says for this recipe.
    site = nginx_site(d, port, run).replace(f"{run}/status.sock",
                                            f"{run}/chatfcgi.sock")
    ds.start_nginx(procs, d / "nginx", port, site)
    base = f"http://127.0.0.1:{port}"
    exercise(http, base)
    # SIGHUP reloads on the same socket.
    os.kill(pool.pid, signal.SIGHUP)
    ds.wait_until(lambda: "previous master" in Path(log).read_text(), 10,
                  "reload", log=log)
    r = http.post(f"{base}/api/chat", json={"message": "still there?"},
                  headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text


def test_spawn_fcgi_status_socket(stack, work):
    need(ds.SPAWN_FCGI)
    d, procs = work
    run = ds.make_dir(d / "run")
    env = pool_env(stack, SPAWN_BIN=stack.bin, SPAWN_CONF=DEFAULT_CONF,
                   SPAWN_SOCKET=run / "chatfcgi.sock",
                   CHATFCGI_STATUS_LISTEN=run / "status.sock")
    log = d / "spawn.log"
    pool = procs.start("spawn-fcgi", ["/bin/sh", SPAWN_SH], log, env=env)
    ds.wait_until(lambda: "listening" in Path(log).read_text(),
                  ds.START_TIMEOUT, "chatfcgi started", proc=pool, log=log)
    time.sleep(0.3)
    assert ds.is_socket(run / "status.sock"), ds.tail(log)


def test_non_root_with_own_user(stack, work):
    d, procs = work
    run = ds.make_dir(d / "run", owner=ds.web_ids())
    env = pool_env(stack, CHATFCGI_LISTEN=run / "chatfcgi.sock",
                   CHATFCGI_STATUS_LISTEN="off")
    log = d / "chatfcgi.log"
    uid = f"--reuid={ds.WEB_USER}"
    proc = procs.start("chatfcgi", [ds.SETPRIV, uid,
                                    f"--regid={ds.WEB_USER}",
                                    "--clear-groups", "--", stack.bin, "-S",
                                    "-c", DEFAULT_CONF], log, env=env)
    ds.wait_until(lambda: ds.is_socket(run / "chatfcgi.sock"),
                  ds.START_TIMEOUT, "socket", proc=proc, log=log)
    time.sleep(1.0)
    assert proc.poll() is None, ds.tail(log)
    body = json.dumps({"message": "hi"}).encode()
    r = fcgi_request(run / "chatfcgi.sock",
                     chat_params(content_length=len(body),
                                 HTTP_AUTHORIZATION=AUTH["Authorization"]),
                     body, timeout=5)
    assert r.status == 200


# ------------------------------------------------------------- systemd

def stubbed_units(d, stack):
    """The three units, with the binary's path pointed at the real one (it
    must exist for systemd-analyze verify)."""
    out = ds.make_dir(d / "units")
    for unit in (SERVICE,) + SOCKET_UNITS:
        text = unit.read_text()
        if unit == SERVICE:
            assert BIN_PATH in text
            text = text.replace(BIN_PATH, str(stack.bin))
        (out / unit.name).write_text(text)
    return out


def test_systemd_units_verify(stack, work):
    need(ds.SYSTEMD_ANALYZE)
    d, _ = work
    units = stubbed_units(d, stack)
    files = [str(units / u.name) for u in (SERVICE,) + SOCKET_UNITS]
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="notice")
    # The man page of Documentation= is installed with the units, not here.
    r = subprocess.run([ds.SYSTEMD_ANALYZE, "verify", "--man=no", *files],
                       env=env,
                       capture_output=True, text=True, timeout=60)
    output = (r.stdout + r.stderr).strip()
    if r.returncode != 0 and "chatfcgi" not in output:
        pytest.skip(f"systemd-analyze verify cannot run here "
                    f"(exit {r.returncode}): {output[:500]}")
    assert r.returncode == 0 and output == "", output

    r = subprocess.run([ds.SYSTEMD_ANALYZE, "security", "--offline=yes",
                        files[0]], capture_output=True, text=True,
                       timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout

    # What the service promises, key by key.
    val = lambda k: ds.unit_value(SERVICE, "Service", k)  # noqa: E731
    assert val("Type") == "notify"
    assert val("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert val("KillSignal") == "SIGTERM"
    assert val("KillMode") == "mixed"
    assert val("EnvironmentFile") == "-/etc/chatfcgi/env"
    # The socket units own /run/chatfcgi (see the unit's comment).
    assert ds.unit_values(SERVICE, "Service", "RuntimeDirectory") == []
    assert val("DynamicUser") == "yes"
    assert val("CapabilityBoundingSet") == ""
    conf_c = (ds.REPO / "app" / "conf.c").read_text()
    graceful = int(re.search(r'"graceful_timeout_s", \d+, \d+, "(\d+)"',
                             conf_c).group(1))
    stop_s = int(val("TimeoutStopSec").rstrip("s"))
    # The master's graceful budget, then its 5 s fast stop.
    assert stop_s > graceful + 5, (stop_s, graceful)
    names = {ds.unit_value(u, "Socket", "FileDescriptorName")
             for u in SOCKET_UNITS}
    assert names == {"chat", "status"}
    for u in SOCKET_UNITS:
        assert ds.unit_value(u, "Socket", "SocketMode") == "0660"
        assert ds.unit_value(u, "Socket", "SocketGroup") == ds.WEB_USER
        assert ds.unit_value(u, "Socket", "ListenStream").startswith(RUN_DIR)


def activation_command(d, stack, extra_env):
    """setpriv (a non-root user, as DynamicUser=) + systemd-socket-activate
    with the sockets of the .socket units, then the unit's ExecStart with
    its Environment=. Returns (argv, {fd name: socket path})."""
    sockets = {}
    for u in SOCKET_UNITS:
        path = ds.unit_value(u, "Socket", "ListenStream")
        sockets[ds.unit_value(u, "Socket", "FileDescriptorName")] = \
            path.replace(RUN_DIR, f"{d}/run/")
    argv = [ds.SETPRIV, f"--reuid={ds.WEB_USER}", f"--regid={ds.WEB_USER}",
            "--clear-groups", "--", ds.SOCKET_ACTIVATE]
    for path in sockets.values():
        argv += ["-l", path]
    argv.append("--fdname=" + ":".join(sockets))
    env = {}
    for line in ds.unit_values(SERVICE, "Service", "Environment"):
        for item in line.split():
            key, _, value = item.partition("=")
            env[key] = value
    env.update(extra_env)
    for key, value in env.items():
        argv += ["-E", f"{key}={value}"]
    exec_start = ds.unit_value(SERVICE, "Service", "ExecStart").split()
    assert exec_start[0] == BIN_PATH
    argv += [str(stack.bin)] + [a.replace(CONF_PATH, str(DEFAULT_CONF))
                                for a in exec_start[1:]]
    return argv, sockets


def apply_socket_modes(sockets):
    """What systemd does with SocketUser/SocketGroup/SocketMode."""
    uid, gid = 0, ds.web_ids()[1]
    for u in SOCKET_UNITS:
        assert ds.unit_value(u, "Socket", "SocketUser") == "root"
    for path in sockets.values():
        os.chown(path, uid, gid)
        os.chmod(path, int(ds.unit_value(SOCKET_UNITS[0], "Socket",
                                         "SocketMode"), 8))


def activation_env(stack):
    env = {"CHATFCGI_REDIS_URL": f"redis://127.0.0.1:{stack.redis_port}/0",
           "CHATFCGI_UPSTREAM_URL": f"{stack.model_url}/v1",
           "CHATFCGI_MODEL": MODEL, "CHATFCGI_CLIENT_KEYS": KEY_DIGEST,
           "CHATFCGI_WORKERS": "2"}
    for key in ("ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def test_systemd_socket_activation(stack, streaming_model, http, work,
                                   free_ports):
    need(ds.SOCKET_ACTIVATE, ds.SETPRIV, ds.NGINX)
    d, procs = work
    port, = free_ports(1)
    # /run/chatfcgi: the RuntimeDirectory= of the service's own user.
    ds.make_dir(d / "run", owner=ds.web_ids())
    notify = Notify(d / "notify.sock")
    try:
        argv, sockets = activation_command(
            d, stack, dict(activation_env(stack),
                           NOTIFY_SOCKET=notify.path))
        log = d / "chatfcgi.log"
        proc = procs.start("chatfcgi", argv, log)
        ds.wait_until(lambda: all(ds.is_socket(p) for p in sockets.values()),
                      ds.START_TIMEOUT, "activation sockets", proc=proc,
                      log=log)
        apply_socket_modes(sockets)
        # chatfcgi starts with the first connection, as under systemd.
        assert not ds.cmdline(proc.pid).startswith(str(stack.bin))
        ds.start_nginx(procs, d / "nginx", port,
                       nginx_site(d, port, d / "run"))
        base = f"http://127.0.0.1:{port}"
        exercise(http, base)
        notify.wait_for("READY=1")
        # The same pid (exec), so LISTEN_PID matched.
        assert ds.cmdline(proc.pid).startswith(str(stack.bin))
        text = Path(log).read_text()
        assert "systemd socket activation and a status socket" in text, text
        # The workers, like the master, run as the service's own user.
        for pid in ds.children(proc.pid):
            assert Path(f"/proc/{pid}").stat().st_uid == ds.web_ids()[0]

        # ExecReload, as systemd runs it.
        reload = ds.unit_value(SERVICE, "Service", "ExecReload")
        subprocess.run(reload.replace("$MAINPID", str(proc.pid)).split(),
                       check=True, timeout=10)
        notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1")
        r = http.post(f"{base}/api/chat", json={"message": "after reload"},
                      headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text

        # KillSignal: a graceful stop, well within TimeoutStopSec.
        kill = getattr(signal, ds.unit_value(SERVICE, "Service",
                                             "KillSignal"))
        os.kill(proc.pid, kill)
        notify.wait_for("STOPPING=1")
        ds.wait_until(lambda: proc.poll() is not None, 10,
                      "chatfcgi stopped", log=log)
        assert proc.returncode == 0, ds.tail(log)
    finally:
        notify.close()


def test_systemd_sandbox_syscalls(stack, work):
    """chatfcgi as the unit runs it (non-root, its sockets from systemd),
    through a turn, health, a reload, a log reopen and a stop, under
    strace: every system call it makes must pass the unit's
    SystemCallFilter=, every socket its RestrictAddressFamilies=, and no
    memory may be writable and executable (MemoryDenyWriteExecute=)."""
    need(ds.SOCKET_ACTIVATE, ds.SETPRIV, ds.STRACE, ds.SYSTEMD_ANALYZE)
    d, procs = work
    ds.make_dir(d / "run", owner=ds.web_ids())
    traces = ds.make_dir(d / "trace")
    # A host name, so that the resolver runs too.
    env = dict(activation_env(stack),
               CHATFCGI_UPSTREAM_URL=f"http://localhost:{stack.model_port}"
                                     f"/v1")
    argv, sockets = activation_command(d, stack, env)
    log = d / "chatfcgi.log"
    tracer = procs.start("strace", [ds.STRACE, "-ff", "-qq", "-o",
                                    traces / "t", *argv], log)
    ds.wait_until(lambda: all(ds.is_socket(p) for p in sockets.values()),
                  ds.START_TIMEOUT, "activation sockets", proc=tracer,
                  log=log)
    body = json.dumps({"message": "hi"}).encode()

    def turn():
        r = fcgi_request(sockets["chat"], chat_params(
            content_length=len(body),
            HTTP_AUTHORIZATION=AUTH["Authorization"]), body, timeout=10)
        assert r.status == 200, r
    turn()
    main = ds.wait_until(lambda: ds.children(tracer.pid), 5, "traced pid")[0]
    r = fcgi_request(sockets["status"], chat_params(
        method="GET", uri="/api/healthz", content_type=None), timeout=10)
    assert r.status == 200, r
    os.kill(main, signal.SIGHUP)
    ds.wait_until(lambda: "previous master" in Path(log).read_text(), 10,
                  "reload", log=log)
    turn()
    os.kill(main, signal.SIGUSR1)
    os.kill(main, signal.SIGTERM)
    ds.wait_until(lambda: tracer.poll() is not None, 15, "strace ended",
                  log=log)
    assert "master: stopped" in Path(log).read_text(), ds.tail(log)

    names, socket_calls, maps = ds.traced(sorted(traces.iterdir()),
                                          str(stack.bin))
    assert {"execve", "accept", "connect", "rt_sigtimedwait"} <= names
    groups = ds.syscall_groups()
    allowed, denied = set(), set()
    for spec in ds.unit_values(SERVICE, "Service", "SystemCallFilter"):
        if spec.startswith("~"):
            denied |= ds.expand_syscalls(spec[1:], groups)
        else:
            allowed |= ds.expand_syscalls(spec, groups)
    refused = sorted(names - (allowed - denied))
    assert not refused, f"SystemCallFilter= would refuse {refused}"
    families = set(ds.unit_value(SERVICE, "Service",
                                 "RestrictAddressFamilies").split())
    used = {m.group(1) for m in (re.search(r"socket\((AF_\w+)", s)
                                 for s in socket_calls) if m}
    assert used and used <= families, (used, families)
    wx = [m for m in maps if "PROT_WRITE" in m and "PROT_EXEC" in m]
    assert not wx, wx


def test_systemd_socket_survives_stop(stack, work):
    """systemd keeps the listening socket across a stop of the service, so
    that connections wait for the next start: chatfcgi must leave it
    usable."""
    d, procs = work
    path = str(d / "chatfcgi.sock")
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        held.bind(path)
        held.listen(16)
        os.chmod(path, 0o666)
        env = pool_env(stack, LISTEN_FDS="1", LISTEN_FDNAMES="chat",
                       CHATFCGI_STATUS_LISTEN="off")
        fd = held.fileno()
        log = d / "chatfcgi.log"
        # As systemd passes it: fd 3, LISTEN_PID the exec'd pid. dup2 makes
        # fd 3 inheritable; Python's own descriptors are close-on-exec, so
        # close_fds=False leaks nothing else (and does not close fd 3).
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" -c "$1"',
                 str(stack.bin), str(DEFAULT_CONF)], env=env,
                close_fds=False, preexec_fn=lambda: os.dup2(fd, 3),
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        procs.started.append(("chatfcgi", proc, signal.SIGTERM, log))
        ds.wait_until(lambda: "systemd socket activation" in
                      Path(log).read_text(), ds.START_TIMEOUT, "chatfcgi",
                      proc=proc, log=log)
        # It serves on the socket it was given...
        body = json.dumps({"message": "hi"}).encode()
        r = fcgi_request(path, chat_params(
            content_length=len(body),
            HTTP_AUTHORIZATION=AUTH["Authorization"]), body, timeout=10)
        assert r.status == 200, r
        assert procs.stop(proc), ds.tail(log)
        # ... and leaves it listening when it stops.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2)
        try:
            probe.connect(path)  # refused once the socket was shut down
        finally:
            probe.close()
    finally:
        held.close()


# ------------------------------------------------------------- logrotate

def test_logrotate(stack, work):
    need(ds.LOGROTATE)
    d, procs = work
    logs = ds.make_dir(d / "log")
    run = ds.make_dir(d / "run")
    conf = d / "logrotate.conf"
    ds.render(LOGROTATE, [("/var/log/chatfcgi/", f"{logs}/"),
                          (RUN_DIR, f"{run}/"),
                          # never the host's own chatfcgi.service
                          ("/run/systemd/system", f"{d}/no-systemd")], conf)
    state = d / "logrotate.state"
    r = subprocess.run([ds.LOGROTATE, "--debug", "--state", state, conf],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "error" not in r.stderr.lower(), r.stderr

    # A real rotation: chatfcgi (root master, www-data workers, as under
    # spawn-fcgi) writes its logs there; after logrotate it writes to the
    # new files (postrotate: SIGUSR1 through the pid file).
    env = pool_env(stack, CHATFCGI_LISTEN=run / "chatfcgi.sock",
                   CHATFCGI_STATUS_LISTEN="off",
                   CHATFCGI_PID_FILE=run / "chatfcgi.pid",
                   CHATFCGI_ERROR_LOG=logs / "error.log",
                   CHATFCGI_ACCESS_LOG=logs / "access.log")
    proc = procs.start("chatfcgi", [stack.bin, "-c", DEFAULT_CONF],
                       d / "stdout.log", env=env)
    ds.wait_until(lambda: (run / "chatfcgi.pid").exists() and
                  ds.is_socket(run / "chatfcgi.sock"), ds.START_TIMEOUT,
                  "chatfcgi", proc=proc, log=logs / "error.log")

    def health(tag):
        r = fcgi_request(run / "chatfcgi.sock", chat_params(
            method="GET", uri="/api/healthz", content_type=None,
            REQUEST_ID=tag), timeout=10)
        assert r.status == 200, r

    health("before-rotation")
    ds.wait_until(lambda: "before-rotation" in
                  (logs / "access.log").read_text(), 5, "access line")
    r = subprocess.run([ds.LOGROTATE, "--force", "--state", state, conf],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "before-rotation" in (logs / "access.log.1").read_text()
    # Said in the old file, just before the reopen.
    ds.wait_until(lambda: "reopening log files" in
                  (logs / "error.log.1").read_text(), 5,
                  "the master got SIGUSR1", log=logs / "error.log.1")
    # The workers reopen between requests: the second line may need one
    # request to wake them.
    deadline = time.monotonic() + 5
    while "after-rotation" not in (logs / "access.log").read_text():
        assert time.monotonic() < deadline, ds.tail(logs / "access.log.1")
        health("after-rotation")
        time.sleep(0.1)
    assert "after-rotation" not in (logs / "access.log.1").read_text()
    st = (logs / "access.log").stat()
    assert st.st_uid == ds.web_ids()[0], "the new file lost its owner"
