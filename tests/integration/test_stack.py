"""The local-stack launcher (deploy/local/stack.py) and its nginx config,
through the real stack: health through nginx, Redis going away and coming
back, the pool going away, nginx's own errors in JSON, and the command line
leaving no process behind."""

import json
import os
import resource
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

import stack as stack_mod  # deploy/local/stack.py, on sys.path via conftest
from helpers import assert_json_error
from polling import wait_for

STACK_PY = Path(stack_mod.__file__)

STACK_ENV = {"CHATFCGI_WORKERS": "2"}


def healthz(http, st):
    r = http.get(f"{st.url}/api/healthz", timeout=5)
    return r.status_code, r


def test_healthz_ok_through_nginx(stack, http):
    r = http.get(f"{stack.url}/api/healthz", timeout=5)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json() == {"status": "ok", "redis": "ok"}
    assert r.headers.get("X-Request-Id")


def test_unknown_path_is_json_404(stack, http):
    r = http.get(f"{stack.url}/nope", timeout=5)
    assert_json_error(r, 404, "not_found")
    assert r.headers.get("X-Request-Id")


def test_body_over_nginx_limit_is_json_413(stack, http):
    body = b'{"message":"' + b"a" * (2 * 1024 * 1024) + b'"}'
    r = http.post(f"{stack.url}/api/chat", data=body, timeout=10,
                  headers={"Content-Type": "application/json"})
    assert_json_error(r, 413, "too_large")


def raw_request(st, data):
    """Send bytes as they are; return (status, headers text, body)."""
    with socket.create_connection(("127.0.0.1", st.port), timeout=5) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1"), body


@pytest.mark.parametrize("request_bytes,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /api/" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /api/healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10000
     + b"\r\n\r\n", 431),
    (b"GET /api/healthz HTTP/9.9\r\n\r\n", 505),
    (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
     501),
], ids=["bad-request-line", "uri-too-long", "headers-too-large",
        "http-version", "transfer-encoding"])
def test_nginx_protocol_errors_are_json(stack, request_bytes, status):
    got, head, body = raw_request(stack, request_bytes)
    assert got == status, head
    assert "Content-Type: application/json" in head, head
    assert json.loads(body)["error"]["code"] == "bad_request"


def test_redis_down_then_back_without_restarting_chatfcgi(stack, http):
    chatfcgi_pid = stack.pid("chatfcgi")
    stack.stop_service("redis")
    try:
        wait_for(lambda: healthz(http, stack)[0] == 503, 5)
        status, r = healthz(http, stack)
        assert status == 503, r.text
        assert r.json() == {"status": "unavailable", "redis": "down"}
    finally:
        stack.start_service("redis")
    ok = wait_for(lambda: healthz(http, stack)[0] == 200, 5)
    assert ok, healthz(http, stack)[1].text
    assert healthz(http, stack)[1].json() == {"status": "ok", "redis": "ok"}
    assert stack.pid("chatfcgi") == chatfcgi_pid


def refused_socket(path):
    """A unix socket file nobody listens on: connect() gets ECONNREFUSED."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    os.chmod(path, 0o666)  # so that nginx's worker (www-data) gets refused,
    return s               # not "permission denied"


@pytest.mark.parametrize("how", ["socket-missing", "socket-refused"])
def test_pool_down_is_json_503_from_nginx(stack, http, how):
    stack.stop_service("chatfcgi")
    listener = None
    try:
        stack.socket_path.unlink(missing_ok=True)
        if how == "socket-refused":
            listener = refused_socket(stack.socket_path)
        for method, path in [("GET", "/api/healthz"), ("POST", "/api/chat"),
                             ("GET", "/v1/models")]:
            r = http.request(method, f"{stack.url}{path}", timeout=5,
                             json={"message": "hi"} if method == "POST"
                             else None)
            assert_json_error(r, 503, "unavailable")
            assert r.headers.get("Retry-After") == "1", r.headers
            assert "<html" not in r.text
    finally:
        if listener:
            listener.close()
        stack.start_service("chatfcgi")
    assert wait_for(lambda: healthz(http, stack)[0] == 200, 10)


# --------------------------------------------------------------- the CLI

def cli_env(run_dir, ports, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHATFCGI_") or k == "CHATFCGI_BIN"}
    env.update(CHATFCGI_RUN_DIR=str(run_dir), CHATFCGI_PORT=str(ports[0]),
               CHATFCGI_MODEL_PORT=str(ports[1]),
               CHATFCGI_REDIS_PORT=str(ports[2]), **extra)
    return env


def cli(command, env, timeout=120):
    return subprocess.run(["/usr/bin/python3", str(STACK_PY), command],
                          env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def cli_run_dir():
    d = Path(tempfile.mkdtemp(prefix="cf"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_cli_start_status_stop_leaves_no_process(cli_run_dir, free_ports,
                                                 http):
    env = cli_env(cli_run_dir, free_ports(3))
    try:
        r = cli("start", env)
        assert r.returncode == 0, r.stdout + r.stderr
        port = env["CHATFCGI_PORT"]
        assert f"chatfcgi is up: http://127.0.0.1:{port}/ " in r.stdout
        assert f"http://127.0.0.1:{port}/api/chat" in r.stdout
        pids = {n: stack_mod.read_pid_file(cli_run_dir / f"{n}.pid")
                for n in stack_mod.SERVICES}
        for name, pid in pids.items():
            assert pid and stack_mod.is_service_pid(name, pid), (name, pid)
        # every process of the stack, workers included
        everything = {p for pid in pids.values()
                      for p in stack_mod._group_members(pid)}
        assert len(everything) > len(pids)  # chatfcgi and nginx workers

        r = http.get(f"http://127.0.0.1:{port}/api/healthz", timeout=5)
        assert r.status_code == 200, r.text

        r = cli("status", env)
        assert r.returncode == 0, r.stdout + r.stderr

        r = cli("start", env)
        assert r.returncode == 1
        assert "make stop" in r.stdout + r.stderr
        assert "Traceback" not in r.stderr

        r = cli("stop", env)
        assert r.returncode == 0, r.stdout + r.stderr
        left = [p for p in everything if stack_mod.pid_alive(p)]
        assert not left, left
        assert not list(cli_run_dir.glob("*.pid"))

        r = cli("stop", env)
        assert r.returncode == 0, r.stdout + r.stderr
        r = cli("status", env)
        assert r.returncode == 3, r.stdout + r.stderr
    finally:
        cli("stop", env)


def test_cli_missing_binary_is_one_clear_line(cli_run_dir, free_ports):
    env = cli_env(cli_run_dir, free_ports(3),
                  CHATFCGI_BIN=str(cli_run_dir / "bin" / "chatfcgi"))
    r = cli("start", env)
    assert r.returncode == 1
    assert "is missing: run make" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list(cli_run_dir.glob("*.pid"))


def test_cli_port_in_use_is_one_clear_line(cli_run_dir, free_ports):
    ports = free_ports(3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[0]))
        busy.listen()
        r = cli("start", cli_env(cli_run_dir, ports))
    assert r.returncode == 1
    assert f"port {ports[0]}" in r.stderr and "in use" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list(cli_run_dir.glob("*.pid"))


def test_chatfcgi_environment(tmp_path, monkeypatch):
    """Launcher-only variables never reach chatfcgi; the caller's other
    CHATFCGI_* do; the launcher's own settings win."""
    monkeypatch.setenv("CHATFCGI_PORT", "9999")
    monkeypatch.setenv("CHATFCGI_MODEL", "m1")
    st = stack_mod.Stack(tmp_path, 18000, env={
        "CHATFCGI_UPSTREAM_TIMEOUT_MS": "500",
        "CHATFCGI_LISTEN": "/elsewhere.sock",
        "CHATFCGI_BIN": "/x/chatfcgi", "CHATFCGI_RUN_DIR": "/x",
        "CHATFCGI_MODEL_PORT": "1", "CHATFCGI_REDIS_PORT": "2"})
    env = st._chatfcgi_env()
    for name in stack_mod.LAUNCHER_ONLY:
        assert name not in env
    assert env["CHATFCGI_UPSTREAM_TIMEOUT_MS"] == "500"
    assert env["CHATFCGI_MODEL"] == "m1"
    assert env["CHATFCGI_LISTEN"] == str(tmp_path / "chatfcgi.sock")
    assert env["CHATFCGI_REDIS_URL"] == "redis://127.0.0.1:18002/0"
    assert env["CHATFCGI_UPSTREAM_URL"] == "http://127.0.0.1:18001/v1"
    assert env["CHATFCGI_PID_FILE"] == str(tmp_path / "chatfcgi.pid")
    assert ("CHATFCGI_USER" in env) == (os.geteuid() == 0)
    assert str(st.bin) == "/x/chatfcgi"

    st = stack_mod.Stack(tmp_path, 18000, env={
        "CHATFCGI_UPSTREAM_URL": "https://api.example/v1",
        "CHATFCGI_REDIS_URL": "redis://127.0.0.1:7000/3"})
    assert st.services == ["chatfcgi", "nginx"]
    assert st.model_url is None and st.redis_port == 7000
    env = st._chatfcgi_env()
    assert env["CHATFCGI_UPSTREAM_URL"] == "https://api.example/v1"
    assert env["CHATFCGI_REDIS_URL"] == "redis://127.0.0.1:7000/3"


def test_nginx_sized_for_held_streams(tmp_path):
    """The local nginx holds 10,000 streams (two connections each), as far
    as the hard limit on open files allows, and queues a burst of clients
    instead of refusing them."""
    conf = stack_mod.Stack(tmp_path, 18000)._nginx_conf()
    processes, connections, files = stack_mod.nginx_sizing()
    assert f"worker_processes {processes};" in conf
    assert f"worker_connections {connections};" in conf
    assert f"worker_rlimit_nofile {files};" in conf
    reuseport = " reuseport" if processes > 1 else ""
    assert f"listen 127.0.0.1:18000 backlog=4096{reuseport};" in conf
    if processes < stack_mod.NGINX_PROCESSES_MAX:
        assert processes * connections >= 20480
    assert connections * 2 <= files
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= 2 * 20480:
        assert (processes, connections) == (1, 20480)


def test_nginx_sized_for_fewer_streams_on_request(tmp_path):
    """CHATFCGI_NGINX_STREAMS: 1,000 streams fit one worker under any hard
    limit this suite runs with (the benchmark's fronts have one)."""
    conf = stack_mod.Stack(tmp_path, 18000,
                           env={"CHATFCGI_NGINX_STREAMS": "1000"})._nginx_conf()
    assert "worker_processes 1;" in conf
    assert "worker_connections 2480;" in conf
    assert "listen 127.0.0.1:18000 backlog=4096;" in conf
