"""Configuration keys end to end, each set for a stack of its own and seen
to change what the pool does: first_token_timeout_ms, idle_timeout_ms,
retries (with the backoff and the provider's Retry-After),
idempotency_ttl_s, log_level and sentinel_password."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fcgi_client import chat_params, fcgi_request
from helpers import LocalModel, assert_json_error, new_session, post_chat
from polling import wait_for
from sse_client import stream_chat

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_CLI = "/usr/bin/redis-cli"
SENTINEL_PASSWORD = "sentinel-secret"
MASTER_NAME = "chatfcgi-keys"

TIMEOUT_S = 10  # the upstream's own timeout in these stacks


@pytest.fixture(scope="module")
def make(stack_factory):
    """A stack with these CHATFCGI_* settings (values as strings) and its
    local model, reset."""
    def make_stack(**env):
        settings = {"CHATFCGI_UPSTREAM_TIMEOUT_MS": str(TIMEOUT_S * 1000),
                    "CHATFCGI_WORKERS": "2"}
        settings.update({f"CHATFCGI_{k.upper()}": str(v)
                         for k, v in env.items()})
        st = stack_factory(settings)
        model = LocalModel.of(st, new_session())
        model.reset()
        return st, model
    return make_stack


def assert_logged(st, text):
    """The error log says text (the client gets only the kind of a model
    failure; the detail is for the operator)."""
    log = Path(st.log_path("chatfcgi")).read_text(errors="replace")
    assert text in log, log[-2000:]


def timed(fn, *args, **kw):
    start = time.monotonic()
    result = fn(*args, **kw)
    return result, time.monotonic() - start


def test_first_token_timeout_ms(make, http):
    """No first token within first_token_timeout_ms: 504 at that time,
    not at the upstream's total timeout."""
    st, model = make(upstream_first_token_timeout_ms=300,
                     upstream_retries=0)
    model.set(delay_ms=3000)
    r, took = timed(post_chat, http, st, "hello", timeout=TIMEOUT_S)
    assert_json_error(r, 504, "upstream_timeout")
    assert 0.3 <= took < 2.5, took
    assert_logged(st, "first_token_timeout_ms")


def test_idle_timeout_ms(make):
    """A stream silent for idle_timeout_ms after it began ends with one
    error event; the deltas before it arrived."""
    st, model = make(upstream_idle_timeout_ms=400, upstream_retries=0)
    model.set(reply="one two three", chunk_delay_ms=3000)
    res, took = timed(stream_chat, st.url, "hello", read_timeout=TIMEOUT_S)
    assert res.status == 200, res
    assert res.names[-1] == "error", res.names
    assert res.last("error").data["error"]["code"] == "upstream_timeout"
    assert res.deltas, res.names
    assert took < 2.5, took
    assert_logged(st, "idle_timeout_ms")


def test_retries_with_backoff(make, http):
    """A provider failing twice with 503: with retries = 2 the third
    request answers, after two backoffs of at least half of
    retry_base_ms * 2^round each."""
    st, model = make(upstream_retries=2, upstream_retry_base_ms=200)
    model.set(mode="fail", status=503, times=2)
    r, took = timed(post_chat, http, st, "hello", timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert model.stats()["requests"] == 3
    assert took >= 0.5 * 200 / 1000 + 0.5 * 400 / 1000, took


def test_retries_spent(make, http):
    """With retries = 1 a provider failing three times is asked twice,
    then the client gets the failure."""
    st, model = make(upstream_retries=1, upstream_retry_base_ms=50)
    model.set(mode="fail", status=503, times=3)
    r = post_chat(http, st, "hello", timeout=TIMEOUT_S)
    assert_json_error(r, 502, "upstream_error")
    assert model.stats()["requests"] == 2


def test_retry_after_is_honoured(make, http):
    """A 429 with Retry-After: 1 waits that second, not the 10 ms
    backoff."""
    st, model = make(upstream_retries=1, upstream_retry_base_ms=10)
    model.set(mode="fail", status=429, retry_after=1, times=1)
    r, took = timed(post_chat, http, st, "hello", timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert model.stats()["requests"] == 2
    assert 1.0 <= took < 3.0, took


def test_idempotency_ttl_s(make, http):
    """An Idempotency-Key is replayed within idempotency_ttl_s and is a
    new turn after it."""
    st, model = make(idempotency_ttl_s=1)
    key = {"Idempotency-Key": "ttl-test-1"}
    first = post_chat(http, st, "remember me", "ttl-session", headers=key)
    assert first.status_code == 200, first.text
    again = post_chat(http, st, "remember me", "ttl-session", headers=key)
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert model.stats()["requests"] == 1
    time.sleep(2.2)
    later = post_chat(http, st, "remember me", "ttl-session", headers=key)
    assert later.status_code == 200, later.text
    assert model.stats()["requests"] == 2
    history = http.get(f"{st.url}/api/chat/ttl-session", timeout=5).json()
    assert len(history["messages"]) == 4


@pytest.mark.parametrize("level, shown, hidden", [
    ("debug", "404 not_found", None),
    ("error", None, "404 not_found"),
])
def test_log_level(make, http, level, shown, hidden):
    """log_level decides which lines reach the error log: a 4xx is logged
    at debug only."""
    st, _ = make(log_level=level)
    r = http.get(f"{st.url}/api/chat/no-such-session", timeout=5)
    assert_json_error(r, 404, "not_found")
    time.sleep(0.2)
    log = Path(st.log_path("chatfcgi")).read_text(errors="replace")
    if shown:
        assert shown in log, log[-2000:]
    if hidden:
        assert hidden not in log, log[-2000:]
        assert " info " not in log, log[-2000:]


@pytest.fixture
def guarded_sentinel(tmp_path, free_ports):
    """A Redis master and one Sentinel (quorum 1) that asks for
    SENTINEL_PASSWORD; both stopped by PID on the way out. Yields the
    Sentinel's port."""
    master_port, sentinel_port = free_ports(2)
    procs = []
    configs = {
        "master": f"port {master_port}\n",
        "sentinel": (f"port {sentinel_port}\n"
                     f"requirepass {SENTINEL_PASSWORD}\n"
                     f"sentinel monitor {MASTER_NAME} 127.0.0.1 "
                     f"{master_port} 1\n"),
    }
    try:
        for label, config in configs.items():
            d = tmp_path / label
            d.mkdir()
            (d / "redis.conf").write_text(
                config + f'bind 127.0.0.1\ndir "{d}"\nsave ""\n')
            procs.append(subprocess.Popen(
                [REDIS_SERVER, str(d / "redis.conf")] +
                (["--sentinel"] if label == "sentinel" else []),
                cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        asked = [REDIS_CLI, "-p", str(sentinel_port), "--no-auth-warning",
                 "-a", SENTINEL_PASSWORD, "SENTINEL",
                 "get-master-addr-by-name", MASTER_NAME]
        assert wait_for(lambda: str(master_port) in subprocess.run(
            asked, capture_output=True, text=True).stdout, 10), \
            "the Sentinel did not name the master"
        yield sentinel_port
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def sentinel_settings(port, password):
    return {"redis_sentinels": f"127.0.0.1:{port}",
            "redis_master_name": MASTER_NAME,
            "redis_sentinel_password": password}


def test_sentinel_password(make, http, guarded_sentinel):
    """With sentinel_password the pool finds the master through a
    Sentinel that asks for one."""
    st, _ = make(**sentinel_settings(guarded_sentinel, SENTINEL_PASSWORD))
    r = post_chat(http, st, "hello", timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text


def test_wrong_sentinel_password(make, http, guarded_sentinel):
    """When the Sentinel's password no longer matches, the next reconnect
    cannot learn the master: 503, and the log says why."""
    st, _ = make(**sentinel_settings(guarded_sentinel, SENTINEL_PASSWORD))
    assert post_chat(http, st, "hello", timeout=TIMEOUT_S).status_code == 200
    sentinel = [REDIS_CLI, "-p", str(guarded_sentinel), "--no-auth-warning",
                "-a", SENTINEL_PASSWORD]
    subprocess.run(sentinel + ["ACL", "SETUSER", "default", "resetpass",
                               ">changed"], check=True, capture_output=True)
    master = subprocess.run(
        sentinel[:-1] + ["changed", "SENTINEL", "get-master-addr-by-name",
                         MASTER_NAME], capture_output=True, text=True,
        check=True).stdout.split()
    # Close the workers' connections: the next command reconnects.
    subprocess.run([REDIS_CLI, "-p", master[1], "CLIENT", "KILL", "TYPE",
                    "normal"], check=True, capture_output=True)
    r = post_chat(http, st, "hello again", timeout=TIMEOUT_S)
    assert_json_error(r, 503, "unavailable")
    assert_logged(st, "Sentinel AUTH failed")


def provider_conf(tmp_path, stack, dead_port):
    """Two [provider NAME] sections: the first refuses connections, the
    second is the stack's local model."""
    conf = tmp_path / "chatfcgi.conf"
    conf.write_text(f"""listen = {tmp_path}/chat.sock
status_listen = off
workers = 1
access_log = off
[redis]
url = redis://127.0.0.1:{stack.redis_port}/0
[upstream]
retries = 0
timeout_ms = {TIMEOUT_S * 1000}
[provider dead]
url = http://127.0.0.1:{dead_port}/v1
model = dead-model
[provider local]
url = {stack.model_url}/v1
model = section-model
""")
    return conf


def test_provider_sections(stack, tmp_path, free_ports):
    """[provider NAME] sections, tried in order: the unreachable first one
    fails over to the second, which is asked for its own model; an
    environment variable CHATFCGI_PROVIDER_<NAME>_<KEY> overrides a key."""
    model = LocalModel.of(stack, new_session())
    model.reset()
    conf = provider_conf(tmp_path, stack, free_ports(1)[0])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHATFCGI_")}
    env.update(CHATFCGI_USER="www-data", CHATFCGI_GROUP="www-data",
               CHATFCGI_PROVIDER_LOCAL_MODEL="env-model")
    log = open(tmp_path / "chatfcgi.log", "wb")
    proc = subprocess.Popen([str(stack.bin), "-c", str(conf)], env=env,
                            stdout=log, stderr=log)
    try:
        sock = tmp_path / "chat.sock"
        assert wait_for(sock.exists, 10), \
            (tmp_path / "chatfcgi.log").read_text()
        body = json.dumps({"message": "hello"}).encode()
        r = fcgi_request(str(sock), chat_params(
            content_length=str(len(body))), body, timeout=TIMEOUT_S)
        assert r.status == 200, r
        asked = model.stats()["recent"]
        assert [q["body"]["model"] for q in asked] == ["env-model"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        log.close()


def test_unknown_variable_stops_the_start(stack):
    """A mistyped CHATFCGI_ variable is refused, by name, as a mistyped key
    in the file is: `chatfcgi -t` exits 1 and says which."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHATFCGI_")}
    conf = Path(__file__).resolve().parents[2] / "conf" / "chatfcgi.conf"
    r = subprocess.run([str(stack.bin), "-t", "-c", str(conf)],
                       env=dict(env, CHATFCGI_WORKRES="4"),
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "CHATFCGI_WORKRES" in r.stderr, r.stderr
    r = subprocess.run([str(stack.bin), "-t", "-c", str(conf)], env=env,
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, (r.stdout, r.stderr)
