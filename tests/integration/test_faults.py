"""Failures around the chat turn: the upstream model misbehaving (errors in
every provider's shape, garbage, hanging, dropping, refusing or not
accepting connections) and Redis going away, stalling or restarting.

Each failure must give its row of shared/API.md's error table (502
upstream_error, 503 unavailable with Retry-After, 504 upstream_timeout) in
time, and must leave the session's history as it was: "A failed request
changes no chat history in Redis".
"""

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

import deploy_servers as ds
from helpers import assert_json_error, new_session, post_chat
from polling import wait_for

TIMEOUT_MS = 1500
REDIS_TIMEOUT_MS = 500
MAX_RESPONSE = 262144
STACK_ENV = {
    "CHATFCGI_UPSTREAM_TIMEOUT_MS": str(TIMEOUT_MS),
    "CHATFCGI_REDIS_COMMAND_TIMEOUT_MS": str(REDIS_TIMEOUT_MS),
    "CHATFCGI_UPSTREAM_MAX_RESPONSE_BYTES": str(MAX_RESPONSE),
    "CHATFCGI_WORKERS": "2",
}
CONNECT_TIMEOUT_MS = 300


# ---------------------------------------------------------------- helpers

def post_turn(http, st, message, session_id=None, timeout=15):
    """(response, seconds it took) of one turn."""
    start = time.monotonic()
    r = post_chat(http, st, message, session_id, timeout=timeout)
    return r, time.monotonic() - start


def history(http, st, session_id):
    """(status, raw body) of GET /api/chat/{id}."""
    r = http.get(f"{st.url}/api/chat/{session_id}", timeout=5)
    return r.status_code, r.content


_counter = iter(range(1_000_000))


def fresh_id(prefix):
    return f"{prefix}-{os.getpid()}-{next(_counter)}-{time.monotonic_ns()}"


def session_with_history(http, st, model):
    """A session with one good turn; returns (id, its GET before)."""
    model.reset()
    sid = fresh_id("faults")
    r, _ = post_turn(http, st, "I feel fine", sid)
    assert r.status_code == 200, r.text
    before = history(http, st, sid)
    assert before[0] == 200
    return sid, before


def failing_turn(http, st, model, want_status, want_code, **behaviour):
    """Run one turn against a misbehaving model (behaviour: the fields of
    model.set) on a session that has a history, and one on a new session;
    both must fail with want_status/want_code and store nothing. Returns
    (error body, seconds) of the first."""
    sid, before = session_with_history(http, st, model)
    new_sid = fresh_id("faults-new")
    model.set(**behaviour)
    r, elapsed = post_turn(http, st, "this turn fails", sid)
    body = assert_json_error(r, want_status, want_code)
    model.set(**behaviour)
    r2, _ = post_turn(http, st, "this one too", new_sid)
    assert_json_error(r2, want_status, want_code)
    model.reset()
    assert history(http, st, sid) == before
    assert history(http, st, new_sid)[0] == 404
    return body, elapsed


def error_log(st):
    """chatfcgi's error log so far."""
    return st.log_path("chatfcgi").read_text(errors="replace")


def healthz_status(http, st):
    return http.get(f"{st.url}/api/healthz", timeout=5).status_code


# ---------------------------------------------------- upstream HTTP errors

@pytest.mark.parametrize("status,body,expect", [
    (500, None, "local model told to fail"),
    (429, '{"error":{"message":"slow down","code":"rate_limit_exceeded"}}',
     "slow down"),
    (429, '{"error":{"message":"slow down","type":"requests","code":429}}',
     "slow down"),
    (404, '{"error":"model not found"}', "model not found"),
    (422, '{"detail":"no such model: x"}', "no such model: x"),
    (400, '{"message":"bad parameter"}', "bad parameter"),
    (503, '{"error":{"message":"overloaded","code":null}}', "overloaded"),
], ids=["openai-500", "wrapped-429", "integer-code-429", "ollama-404",
        "detail-422", "message-400", "null-code-503"])
def test_upstream_error_is_502_and_the_providers_message_is_logged(
        stack, http, model, status, body, expect):
    """The client learns the provider's status; its words, which can quote
    the server's key or name its account, go to the error log only."""
    behaviour = {"mode": "fail", "status": status}
    if body is not None:
        behaviour["body"] = body
    err, _ = failing_turn(http, stack, model, 502, "upstream_error",
                          **behaviour)
    assert f"(HTTP {status})" in err["error"]["message"], err
    assert expect not in err["error"]["message"], err
    assert expect in error_log(stack)


@pytest.mark.parametrize("status,body", [
    (500, "<html><body>Internal Server Error</body></html>"),
    (500, ""),
    (502, "upstream connect error or disconnect/reset before headers"),
    (422, '{"detail":[{"loc":["body"],"msg":"field required"}]}'),
    (301, ""),
], ids=["html-500", "empty-500", "text-502", "list-detail-422",
        "redirect-301"])
def test_upstream_error_without_a_usable_message_is_502(
        stack, http, model, status, body):
    err, _ = failing_turn(http, stack, model, 502, "upstream_error",
                          mode="fail", status=status, body=body)
    assert str(status) in err["error"]["message"], err


@pytest.mark.parametrize("text", [
    "é" * 300,
    "請" * 200,
    "x" + "請" * 200,
    "xx" + "請" * 200,
], ids=["two-byte", "three-byte", "three-byte-offset-1",
        "three-byte-offset-2"])
def test_long_non_ascii_provider_message_is_kept(stack, http, model, text):
    """A provider message longer than the room kept for it must be cut at a
    character boundary. A cut through a character made the whole message
    invalid UTF-8, and none of the provider's words reached the log.
    (Whatever the room, one of these texts has a character across it.)"""
    failing_turn(http, stack, model, 502, "upstream_error", mode="fail",
                 status=429, body=json.dumps({"error": {"message": text}},
                                             ensure_ascii=False))
    assert text[:30] in error_log(stack)


# ------------------------------------------------ upstream 200s that are bad

@pytest.mark.parametrize("body", [
    None,  # localmodel's default garbage: {"unexpected": true}
    "this is not json",
    "<html>hello</html>",
    "",
    '{"choices":[]}',
    '{"choices":[{"message":{"role":"assistant","content":null}}]}',
    '{"choices":[{"message":{"role":"assistant","content":42}}]}',
    '{"choices":[{"message":{"role":"assistant","content":"ok"}}]',
    '{"choices":[{"message":{"role":"assistant","content":"ok"}}]} junk',
], ids=["unexpected", "text", "html", "empty", "no-choices", "null-content",
        "number-content", "truncated", "trailing-junk"])
def test_upstream_garbage_200_is_502(stack, http, model, body):
    behaviour = {"mode": "garbage"}
    if body is not None:
        behaviour["body"] = body
    failing_turn(http, stack, model, 502, "upstream_error", **behaviour)


def test_upstream_answer_over_max_response_bytes_is_502(stack, http, model):
    failing_turn(http, stack, model, 502, "upstream_error",
                 reply="x" * (MAX_RESPONSE + 1000))


def test_reply_with_a_lone_low_surrogate_escape_stays_valid_utf8(
        stack, http, model):
    """"\\udc00" alone in the upstream's JSON: yajl decodes it to the bytes
    ED B0 80, which are not UTF-8. The answer (and what is stored) must be
    valid UTF-8 either way: a replacement character or a 502."""
    sid = fresh_id("surrogate")
    model.set(mode="garbage", body='{"choices":[{"message":{"role":'
              '"assistant","content":"a\\udc00b"}}]}')
    r, _ = post_turn(http, stack, "hi", sid)
    model.reset()
    r.content.decode("utf-8")  # strict: raises on a UTF-8 surrogate
    if r.status_code == 200:
        status, raw = history(http, stack, sid)
        raw.decode("utf-8")
    else:
        assert_json_error(r, 502, "upstream_error")
        assert history(http, stack, sid)[0] == 404


@pytest.mark.parametrize("name", [
    "é" * 100,
    "m\\udc00",
], ids=["long-two-byte", "lone-low-surrogate"])
def test_model_name_that_cannot_be_encoded_stores_nothing(
        stack, http, model, name):
    """The upstream reports a model name that cannot go into the answer as
    it is: longer than the room kept for it, in two-byte characters (cut
    through a character), or with a lone surrogate escape. Either the
    answer carries a valid name, or the turn fails; and a failed turn must
    not have been stored."""
    sid = fresh_id("model-name")
    model.set(mode="garbage", body='{"model":"%s","choices":[{"message":'
              '{"role":"assistant","content":"ok"}}]}' % name)
    r, _ = post_turn(http, stack, "hi", sid)
    model.reset()
    r.content.decode("utf-8")  # strict: raises on a UTF-8 surrogate
    if r.status_code == 200:
        assert r.json()["model"], r.text
        assert history(http, stack, sid)[0] == 200
    else:
        assert_json_error(r, 502, "upstream_error")
        assert history(http, stack, sid)[0] == 404, \
            "the failed turn was stored"


# ----------------------------------------------------- upstream transport

def test_upstream_hang_is_504_after_the_timeout(stack, http, model):
    _, elapsed = failing_turn(http, stack, model, 504, "upstream_timeout",
                              mode="hang")
    assert TIMEOUT_MS / 1000 - 0.1 <= elapsed <= TIMEOUT_MS / 1000 + 1, \
        elapsed


def test_slow_upstream_within_the_timeout_is_fine(stack, http, model):
    model.set(delay_ms=TIMEOUT_MS // 3)
    r, elapsed = post_turn(http, stack, "hello")
    assert r.status_code == 200, r.text
    assert elapsed >= TIMEOUT_MS / 3000


def test_upstream_drop_is_502(stack, http, model):
    _, elapsed = failing_turn(http, stack, model, 502, "upstream_error",
                              mode="drop")
    assert elapsed < 1


def test_upstream_connection_refused_is_502(stack_factory, http,
                                            free_ports):
    port = free_ports(1)[0]  # nothing listens there
    st = stack_factory({"CHATFCGI_UPSTREAM_URL":
                        f"http://127.0.0.1:{port}/v1"})
    sid = fresh_id("refused")
    r, elapsed = post_turn(http, st, "hello", sid)
    assert_json_error(r, 502, "upstream_error")
    assert elapsed < 1
    assert history(http, st, sid)[0] == 404


@pytest.fixture(scope="module")
def unaccepting_listener():
    """A loopback port whose accept queue is full: the kernel drops further
    SYNs, so a connect() there neither succeeds nor fails until it times
    out. (A "non-routable" address is no good here: this sandbox routes
    everything to a proxy that answers at once.)"""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    time.sleep(0.1)
    yield port
    for c in fillers:
        c.close()
    listener.close()


def test_upstream_connect_timeout_is_504(stack_factory, http,
                                         unaccepting_listener):
    st = stack_factory({
        "CHATFCGI_UPSTREAM_URL":
            f"http://127.0.0.1:{unaccepting_listener}/v1",
        "CHATFCGI_UPSTREAM_CONNECT_TIMEOUT_MS": str(CONNECT_TIMEOUT_MS),
        "CHATFCGI_UPSTREAM_COOLDOWN_FAILURES": "1"})
    sid = fresh_id("connect-timeout")
    r, elapsed = post_turn(http, st, "hello", sid)
    # conf/chatfcgi.conf: "Past either timeout the turn fails with 504",
    # after one more try (retries = 1): the connection sent nothing.
    assert_json_error(r, 504, "upstream_timeout")
    assert 2 * CONNECT_TIMEOUT_MS / 1000 - 0.05 <= elapsed \
        <= 2 * CONNECT_TIMEOUT_MS / 1000 + 1, elapsed
    assert history(http, st, sid)[0] == 404
    # Not the provider's own failure: a host short of CPU times out so.
    metrics = http.get(f"{st.url}/api/metrics", timeout=5).text
    assert 'chatfcgi_provider_cooling_down{provider="upstream1"} 0' \
        in metrics


# ------------------------------------------------------------------ Redis

def test_redis_down_is_503_then_back_without_a_restart(stack, http, model):
    sid, before = session_with_history(http, stack, model)
    chatfcgi_pid = stack.pid("chatfcgi")
    model.reset()
    stack.stop_service("redis")
    try:
        r, elapsed = post_turn(http, stack, "while Redis is down", sid)
        assert_json_error(r, 503, "unavailable")
        retry_after = r.headers.get("Retry-After", "")
        assert re.fullmatch(r"[1-9][0-9]*", retry_after), r.headers
        assert elapsed < 2
        r = http.get(f"{stack.url}/api/healthz", timeout=5)
        assert r.status_code == 503, r.text
        assert r.json() == {"status": "unavailable", "redis": "down"}
        # The history could not be loaded: the model was never asked.
        assert model.stats()["requests"] == 0
    finally:
        stack.start_service("redis")

    def turn_ok():
        r, _ = post_turn(http, stack, "Redis is back", sid)
        return r if r.status_code == 200 else None
    r = wait_for(turn_ok, 5, 0.2)
    assert r, "no successful turn within 5 s of Redis coming back"
    assert stack.pid("chatfcgi") == chatfcgi_pid
    # The turn refused while Redis was down was not stored.
    messages = json.loads(history(http, stack, sid)[1])["messages"]
    assert messages[:2] == json.loads(before[1])["messages"]
    assert [m["content"] for m in messages[2::2]] == ["Redis is back"]


def test_redis_restarted_while_idle_gives_no_spurious_errors(
        stack, http, model):
    """Redis restarts (or closes idle clients, its `timeout` setting) while
    no request runs: once it answers again, so must the application. A
    worker that finds its old connection dead reconnects, it does not
    answer 503 while Redis is up."""
    for _ in range(6):  # give every worker a live connection
        assert healthz_status(http, stack) == 200
        r, _ = post_turn(http, stack, "hello")
        assert r.status_code == 200, r.text
    stack.stop_service("redis")
    stack.start_service("redis")
    statuses = []
    for _ in range(6):
        statuses.append(healthz_status(http, stack))
        r, _ = post_turn(http, stack, "hello")
        statuses.append(r.status_code)
    assert statuses == [200] * len(statuses), statuses


class RedisAdmin:
    """One connection to the stack's Redis sending inline commands: the
    client that keeps the only place when maxclients is 1."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.replies = self.sock.makefile("rb")

    def send(self, command):
        self.sock.sendall(command.encode() + b"\r\n")
        reply = self.replies.readline()
        assert reply[:1] in (b"+", b":"), reply
        return reply

    def close(self):
        self.replies.close()
        self.sock.close()


def test_redis_past_maxclients_is_503_and_the_log_says_why(
        stack, http, model):
    """The pool starts while Redis has no room for it (maxclients, taken
    here by one other client): Redis takes each worker's connection only
    to send an error and close it. The turn is 503, the log names the
    setting to raise, and once there is room the workers connect again."""
    admin = RedisAdmin(stack.redis_port)
    try:
        admin.send("CONFIG SET maxclients 1")
        stack.stop_service("chatfcgi")
        stack.start_service("chatfcgi")
        r, _ = post_turn(http, stack, "one too many")
        assert_json_error(r, 503, "unavailable")
    finally:
        admin.send("CONFIG SET maxclients 10000")
        admin.close()
    log = stack.log_path("chatfcgi").read_text()
    assert "max number of clients reached" in log and "maxclients" in log
    for _ in range(4):
        r, _ = post_turn(http, stack, "room again")
        assert r.status_code == 200, r.text


def stop_redis(stack):
    pid = stack.pid("redis")
    assert pid
    os.kill(pid, signal.SIGSTOP)
    return pid


@pytest.mark.parametrize("new_connection", [False, True])
def test_redis_stalled_before_the_turn_is_503_in_time(stack, http, model,
                                                      new_connection):
    """new_connection: Redis closed the workers' connections first, so the
    turn is the first on a new one, which has no clock of Redis's yet to
    date its begin's deadline from."""
    sid, before = session_with_history(http, stack, model)
    model.reset()
    if new_connection:
        admin = RedisAdmin(stack.redis_port)
        admin.send("CLIENT KILL TYPE normal SKIPME yes")
        admin.close()
    pid = stop_redis(stack)
    try:
        r, elapsed = post_turn(http, stack, "Redis is stalled", sid)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert_json_error(r, 503, "unavailable")
    assert elapsed < REDIS_TIMEOUT_MS / 1000 + 1, elapsed
    assert model.stats()["requests"] == 0
    wait_for(lambda: healthz_status(http, stack) == 200, 5)
    assert history(http, stack, sid) == before
    # Redis ran the queued begin once it went on, past its deadline: it
    # took no lock, so the session is not busy for lock_ms.
    r, _ = post_turn(http, stack, "and now?", sid)
    assert r.status_code == 200, r.text


def turn_while_redis_stalled(http, st, session_id, stall_s):
    """A turn sent while Redis is stopped, which goes on stall_s later.
    Returns the turn's response once both are done."""
    result = {}
    client = new_session()

    def turn():
        result["r"], _ = post_turn(client, st, "while stalled", session_id)

    pid = stop_redis(st)
    t = threading.Thread(target=turn)
    try:
        t.start()
        time.sleep(stall_s)
    finally:
        os.kill(pid, signal.SIGCONT)
    t.join(15)
    return result["r"]


def test_a_begin_run_after_the_worker_gave_up_takes_no_lock(stack_factory,
                                                            http):
    """One worker. A first stall that Redis ends well within the command
    timeout (0.5 s; the begin's deadline leaves its last fifth to the
    reply): the begin's reply comes 0.25 s after it went out, so Redis's
    clock, reckoned from when the command was sent, runs 0.25 s ahead.
    A second stall of 0.65 s: the worker gives up at 0.5 s (503), then
    Redis runs the queued begin. Its deadline must not be late by that
    0.25 s: the lock it would take would refuse the session's next turns
    (409) for lock_ms."""
    st = stack_factory({**STACK_ENV, "CHATFCGI_WORKERS": "1"})
    sid = fresh_id("ahead")
    assert post_turn(http, st, "hello", sid)[0].status_code == 200
    r = turn_while_redis_stalled(http, st, fresh_id("skew"), 0.25)
    assert r.status_code == 200, r.text
    r = turn_while_redis_stalled(http, st, sid, 0.65)
    assert_json_error(r, 503, "unavailable")
    wait_for(lambda: healthz_status(http, st) == 200, 5)
    r, _ = post_turn(http, st, "and now?", sid)
    assert r.status_code == 200, r.text


class LateReplies:
    """A TCP proxy in front of a Redis that can hold back the replies on
    the connections open when told, and on those made after when told so
    too: Redis runs the commands at once, and their answers come late. Or
    it can cut the connection of the next reply, dropping the reply."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = []  # each connection's {"delay": s, "socks": [...]}
        self.new_delay = 0
        self.cut_next = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, seconds, new_connections=False):
        self.new_delay = seconds if new_connections else 0
        for conn in self.open:
            conn["delay"] = seconds

    def cut(self):
        self.cut_next = True

    def close(self):
        self.listener.close()
        for conn in self.open:
            for sock in conn["socks"]:
                sock.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            conn = {"delay": self.new_delay, "socks": [client, server]}
            self.open.append(conn)
            for src, dst, state in ((client, server, None),
                                    (server, client, conn)):
                threading.Thread(target=self._pump, args=(src, dst, state),
                                 daemon=True).start()

    def _pump(self, src, dst, state):
        try:
            while data := src.recv(65536):
                if state and self.cut_next:
                    self.cut_next = False
                    break
                if state and state["delay"]:
                    time.sleep(state["delay"])
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def late_replies(free_ports, tmp_path):
    """A Redis of its own behind a LateReplies proxy."""
    port = free_ports(1)[0]
    redis = subprocess.Popen(
        ["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = None
    try:
        assert wait_for(lambda: ds.tcp_open(port), 5), "Redis did not start"
        proxy = LateReplies(port)
        yield proxy
    finally:
        if proxy:
            proxy.close()
        redis.terminate()
        redis.wait(timeout=10)


def session_behind(stack_factory, http, late_replies, name):
    """A stack on the Redis behind late_replies, and a session of one turn
    on it."""
    st = stack_factory({**STACK_ENV, "CHATFCGI_REDIS_URL":
                        f"redis://127.0.0.1:{late_replies.port}/0"})
    sid = fresh_id(name)
    assert post_turn(http, st, "hello", sid)[0].status_code == 200
    return st, sid


def test_a_begin_whose_reply_came_too_late_leaves_no_lock(stack_factory,
                                                          http, late_replies):
    """Redis runs a turn's begin at once, but its reply comes after the
    command timeout: the worker answers 503 not knowing whether the lock
    was taken. It was; the worker releases it (its token) before it
    answers, so the session's next turn runs instead of getting 409 for
    lock_ms."""
    st, sid = session_behind(stack_factory, http, late_replies, "late-reply")
    late_replies.hold(REDIS_TIMEOUT_MS / 1000 + 0.3)
    r, _ = post_turn(http, st, "answered late", sid)
    assert_json_error(r, 503, "unavailable")
    late_replies.hold(0)
    r, _ = post_turn(http, st, "and now?", sid)
    assert r.status_code == 200, r.text


def test_a_begin_whose_connection_was_cut_leaves_no_lock(stack_factory,
                                                         http, late_replies):
    """Redis runs a turn's begin, and its connection is cut before the
    reply: the release cannot go on that connection (it would be lost), so
    the worker makes a new one for it, and the session's next turn runs."""
    st, sid = session_behind(stack_factory, http, late_replies, "cut-reply")
    late_replies.cut()
    r, _ = post_turn(http, st, "never answered", sid)
    assert_json_error(r, 503, "unavailable")
    r, _ = post_turn(http, st, "and now?", sid)
    assert r.status_code == 200, r.text


def test_a_begin_answered_late_by_a_slow_redis_leaves_no_lock(
        stack_factory, http, late_replies):
    """As above, with Redis slow to answer every connection, new ones too,
    as an overloaded Redis is: a release that waits for its own reply times
    out as well and leaves the lock (it did: "cannot release the turn
    lock", then 409). The worker sends the release right behind the begin,
    on the begin's connection and without waiting: Redis runs it next."""
    st, sid = session_behind(stack_factory, http, late_replies, "slow-redis")
    late_replies.hold(REDIS_TIMEOUT_MS / 1000 + 0.3, new_connections=True)
    r, _ = post_turn(http, st, "answered late", sid)
    assert_json_error(r, 503, "unavailable")
    late_replies.hold(0)
    r, _ = post_turn(http, st, "and now?", sid)
    assert r.status_code == 200, r.text
    assert "cannot release the turn lock" not in error_log(st)


def test_redis_stalled_while_storing_stores_nothing(stack, http, model):
    """Redis stops answering while the model thinks: the store step times
    out and the client gets 503. When Redis resumes it must not apply that
    turn after all (it still has the MULTI..EXEC in its socket buffer)."""
    sid, before = session_with_history(http, stack, model)
    model.set(delay_ms=800)
    result = {}

    def turn():
        result["r"], result["t"] = post_turn(http_thread, stack,
                                             "stored after all?", sid)

    http_thread = new_session()
    t = threading.Thread(target=turn)
    t.start()
    pid = None
    try:
        assert wait_for(lambda: model.stats()["requests"] >= 1, 5), \
            "the turn never reached the model"
        pid = stop_redis(stack)
        t.join(10)
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        t.join(10)
        http_thread.close()
    assert_json_error(result["r"], 503, "unavailable")
    assert wait_for(lambda: healthz_status(http, stack) == 200, 5)
    time.sleep(0.3)  # Redis has read its buffered commands by now
    assert history(http, stack, sid) == before, \
        "the turn answered 503 was stored when Redis resumed"
