"""Hardening through nginx: client keys (401), per-client rate limits (429
with Retry-After), one turn per session at a time (409), Idempotency-Key
replays (the model is called once), and CORS. Each behaviour gets a stack
of its own, since each is a configuration."""

import hashlib
import json
import threading
import time

import pytest

from helpers import LocalModel, assert_json_error, post_chat

KEY = "sk-client-test-key"
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()


def chat(http, st, message="hello", session_id=None, headers=None,
         stream=False, timeout=15):
    fields = {"stream": True} if stream else {}
    return post_chat(http, st, message, session_id, headers=headers,
                     timeout=timeout, **fields)


def model_requests(http, st):
    return LocalModel.of(st, http).stats()["requests"]


def set_model(http, st, **fields):
    LocalModel.of(st, http).set(**fields)


# ------------------------------------------------------------ client keys

@pytest.fixture(scope="module")
def keyed(stack_factory):
    return stack_factory({"CHATFCGI_CLIENT_KEYS":
                          f"{'0' * 64}, {DIGEST}"})


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", "Bearer wrong-key", f"Basic {KEY}",
    f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Bearer {DIGEST}",
])
def test_missing_or_wrong_key_is_401(http, keyed, authorization):
    headers = {} if authorization is None else {
        "Authorization": authorization}
    r = chat(http, keyed, headers=headers)
    assert_json_error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    r = http.get(f"{keyed.url}/api/chat/abc", headers=headers, timeout=5)
    assert_json_error(r, 401, "unauthorized")


def test_right_key_is_served(http, keyed):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = chat(http, keyed, headers=headers)
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    assert http.get(f"{keyed.url}/api/chat/{sid}", headers=headers,
                    timeout=5).status_code == 200
    # The scheme is case-insensitive (RFC 9110).
    assert chat(http, keyed, headers={
        "Authorization": f"bearer {KEY}"}).status_code == 200


def test_healthz_needs_no_key(http, keyed):
    assert http.get(f"{keyed.url}/api/healthz", timeout=5).status_code == 200


# ------------------------------------------------------------ rate limits

@pytest.fixture(scope="module")
def limited(stack_factory):
    return stack_factory({"CHATFCGI_RATE_LIMIT_RPM": "3"})


def test_over_rpm_is_429_with_retry_after(http, limited):
    forwarded = {"X-Forwarded-For": "198.51.100.7"}
    for _ in range(3):
        assert chat(http, limited, headers=forwarded).status_code == 200
    r = chat(http, limited, headers=forwarded)
    assert_json_error(r, 429, "rate_limited")
    retry = int(r.headers["Retry-After"])
    assert 1 <= retry <= 60, retry


def test_forwarded_for_is_not_believed_from_untrusted_clients(http, limited):
    """nginx's REMOTE_ADDR is 127.0.0.1 and no proxy is trusted, so a
    client cannot dodge its limit by inventing X-Forwarded-For (the
    previous test used up this minute's turns of 127.0.0.1)."""
    r = chat(http, limited, headers={"X-Forwarded-For": "203.0.113.99"})
    if r.status_code == 200:  # the previous test's window just ended
        for _ in range(3):
            r = chat(http, limited,
                     headers={"X-Forwarded-For": "203.0.113.99"})
    assert_json_error(r, 429, "rate_limited")


def test_trusted_proxy_forwarded_for_scopes_the_limit(http, stack_factory):
    st = stack_factory({"CHATFCGI_RATE_LIMIT_RPM": "2",
                        "CHATFCGI_TRUSTED_PROXIES": "127.0.0.1"})
    one = {"X-Forwarded-For": "192.0.2.1"}
    two = {"X-Forwarded-For": "192.0.2.2, 127.0.0.1"}
    assert chat(http, st, headers=one).status_code == 200
    assert chat(http, st, headers=one).status_code == 200
    assert_json_error(chat(http, st, headers=one), 429, "rate_limited")
    # Another client behind the same proxies has its own budget.
    assert chat(http, st, headers=two).status_code == 200


def test_over_tpm_is_429(http, stack_factory):
    st = stack_factory({"CHATFCGI_RATE_LIMIT_TPM": "30"})
    set_model(http, st, reply=" ".join(["word"] * 40))
    assert chat(http, st).status_code == 200  # 40+ tokens counted after it
    r = chat(http, st)
    assert_json_error(r, 429, "rate_limited")
    assert int(r.headers["Retry-After"]) >= 1


# ---------------------------------------------------- one turn at a time

@pytest.fixture(scope="module")
def slow(stack_factory):
    # No retries: these tests need a model failure to reach the turn.
    return stack_factory({"CHATFCGI_WORKERS": "4",
                          "CHATFCGI_UPSTREAM_RETRIES": "0"})


def test_concurrent_turn_of_one_session_is_409(http, slow):
    set_model(http, slow, delay_ms=1500)
    sid = "concurrent-session-1"
    results = {}

    def first():
        results["first"] = chat(http, slow, "first", sid)

    t = threading.Thread(target=first)
    t.start()
    time.sleep(0.4)
    second = chat(http, slow, "second", sid)
    t.join(10)
    assert_json_error(second, 409, "conflict")
    assert results["first"].status_code == 200, results["first"].text
    # The history holds the first turn only, not interleaved.
    msgs = http.get(f"{slow.url}/api/chat/{sid}", timeout=5).json()["messages"]
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["first"]
    # The lock was released: the next turn goes through at once.
    set_model(http, slow, delay_ms=0)
    assert chat(http, slow, "third", sid).status_code == 200


def test_lock_is_released_after_a_failed_turn(http, slow):
    sid = "failed-then-retried"
    set_model(http, slow, mode="fail", status=500, times=1)
    assert_json_error(chat(http, slow, "x", sid), 502, "upstream_error")
    assert chat(http, slow, "x", sid).status_code == 200


# ---------------------------------------------------------- idempotency

def test_idempotent_retry_calls_the_model_once(http, slow):
    set_model(http, slow, delay_ms=0)
    headers = {"Idempotency-Key": "order-42"}
    sid = "idem-session-1"
    before = model_requests(http, slow)
    first = chat(http, slow, "I feel sad", sid, headers)
    again = chat(http, slow, "I feel sad", sid, headers)
    assert first.status_code == again.status_code == 200, again.text
    assert again.json() == first.json()
    assert model_requests(http, slow) == before + 1
    msgs = http.get(f"{slow.url}/api/chat/{sid}", timeout=5).json()["messages"]
    assert len(msgs) == 2  # stored once


def test_idempotent_retry_while_running_is_409(http, slow):
    set_model(http, slow, delay_ms=1500)
    headers = {"Idempotency-Key": "slow-one"}
    results = {}
    t = threading.Thread(target=lambda: results.update(
        first=chat(http, slow, "hi", "idem-running", headers)))
    t.start()
    time.sleep(0.4)
    r = chat(http, slow, "hi", "idem-running", headers)
    t.join(10)
    assert_json_error(r, 409, "conflict")
    assert "Idempotency-Key" in r.json()["error"]["message"]
    assert results["first"].status_code == 200


def test_failed_original_is_not_kept(http, slow):
    headers = {"Idempotency-Key": "fails-first"}
    set_model(http, slow, mode="fail", status=500, times=1)
    assert_json_error(chat(http, slow, "hi", "idem-failed", headers), 502,
                      "upstream_error")
    before = model_requests(http, slow)
    assert chat(http, slow, "hi", "idem-failed", headers).status_code == 200
    assert model_requests(http, slow) == before + 1


def test_streamed_original_replays_as_one_delta_and_done(http, slow):
    set_model(http, slow, delay_ms=0, reply="one two three")
    headers = {"Idempotency-Key": "streamed"}
    first = chat(http, slow, "hi", "idem-stream", headers, stream=True)
    assert first.status_code == 200
    before = model_requests(http, slow)
    again = chat(http, slow, "hi", "idem-stream", headers, stream=True)
    assert model_requests(http, slow) == before
    events = [block.split("\n") for block in
              again.text.strip().split("\n\n")]
    assert [e[0] for e in events] == ["event: delta", "event: done"]
    assert events[0][1] == 'data: {"content":"one two three"}'
    # And a non-streamed retry of it gets the JSON answer.
    plain = chat(http, slow, "hi", "idem-stream", headers)
    assert plain.json()["reply"] == "one two three"


def test_streamed_replay_of_a_large_answer(http, slow):
    """A stored answer larger than a request body (100 KiB > max_body_bytes,
    64 KiB) replays as a stream too."""
    reply = " ".join(f"word{i:05d}" for i in range(10240))  # 100 KiB
    set_model(http, slow, reply=reply)
    headers = {"Idempotency-Key": "large-answer"}
    first = chat(http, slow, "say a lot", "idem-large", headers)
    assert first.status_code == 200, first.text
    again = chat(http, slow, "say a lot", "idem-large", headers, stream=True)
    assert again.status_code == 200, again.text
    events = [block.split("\n") for block in
              again.text.strip().split("\n\n")]
    assert [e[0] for e in events] == ["event: delta", "event: done"]
    assert json.loads(events[0][1][len("data: "):]) == {"content": reply}


def test_key_without_session_is_scoped_to_the_client(http, slow):
    set_model(http, slow, reply="fresh")
    headers = {"Idempotency-Key": "no-session-key"}
    first = chat(http, slow, "hi", None, headers).json()
    again = chat(http, slow, "hi", None, headers).json()
    assert again["session_id"] == first["session_id"]


def requests_counted(http, st, status):
    """chatfcgi_requests_total of a status in /api/metrics, or None when
    the status is not counted on its own."""
    name = f'chatfcgi_requests_total{{status="{status}"}} '
    for line in http.get(f"{st.url}/api/metrics", timeout=5).text.splitlines():
        if line.startswith(name):
            return int(line[len(name):])
    return None


def test_key_reused_for_another_message_is_422(http, slow):
    """The record is bound to its request (session and message): a reuse
    for another one is refused, neither replayed nor run."""
    set_model(http, slow, delay_ms=0)
    headers = {"Idempotency-Key": "reused-key"}
    sid = "idem-reused"
    first = chat(http, slow, "I feel sad", sid, headers)
    assert first.status_code == 200, first.text
    before = model_requests(http, slow)
    r = chat(http, slow, "I feel happy", sid, headers)
    assert_json_error(r, 422, "idempotency_mismatch")
    assert model_requests(http, slow) == before
    assert (requests_counted(http, slow, 422) or 0) >= 1
    # The same request again still replays.
    assert chat(http, slow, "I feel sad", sid, headers).json() == \
        first.json()
    msgs = http.get(f"{slow.url}/api/chat/{sid}", timeout=5).json()["messages"]
    assert [m["content"] for m in msgs if m["role"] == "user"] == [
        "I feel sad"]


def test_key_without_session_is_bound_to_the_message(http, slow):
    """Two people behind one NAT (one address) pick the same key: the
    second does not get the first one's answer and session."""
    set_model(http, slow, delay_ms=0)
    headers = {"Idempotency-Key": "behind-one-nat"}
    first = chat(http, slow, "I am Alice", None, headers)
    assert first.status_code == 200, first.text
    r = chat(http, slow, "I am Bob", None, headers)
    assert_json_error(r, 422, "idempotency_mismatch")
    assert first.json()["session_id"] not in r.text


@pytest.mark.parametrize("key", ["x" * 129, "tab\there", "é"])
def test_bad_idempotency_key_is_400(http, slow, key):
    r = chat(http, slow, headers={"Idempotency-Key": key.encode("utf-8")})
    assert_json_error(r, 400, "bad_request")


# ------------------------------------------------------------------ CORS

@pytest.fixture(scope="module")
def cors(stack_factory):
    return stack_factory({"CHATFCGI_CORS_ORIGINS":
                          "https://chat.example, https://other.example"})


def test_preflight_is_answered(http, cors):
    r = http.options(f"{cors.url}/api/chat", headers={
        "Origin": "https://chat.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, idempotency-key"},
        timeout=5)
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "Idempotency-Key" in r.headers["Access-Control-Allow-Headers"]
    assert r.headers["Vary"] == "Origin"


def test_allowed_origin_gets_cors_headers(http, cors):
    r = chat(http, cors, headers={"Origin": "https://other.example"})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "https://other.example"
    assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]


def test_other_origin_gets_none(http, cors):
    r = chat(http, cors, headers={"Origin": "https://evil.example"})
    assert r.status_code == 200
    assert "Access-Control-Allow-Origin" not in r.headers
    r = http.options(f"{cors.url}/api/chat", headers={
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST"}, timeout=5)
    assert_json_error(r, 405, "method_not_allowed")


def test_no_cors_when_unset(http, stack):
    r = http.options(f"{stack.url}/api/chat", headers={
        "Origin": "https://chat.example",
        "Access-Control-Request-Method": "POST"}, timeout=5)
    assert_json_error(r, 405, "method_not_allowed")
    r = chat(http, stack, headers={"Origin": "https://chat.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
