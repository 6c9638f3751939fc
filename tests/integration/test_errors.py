"""Every row of shared/API.md's error table that exists today: 400, 404, 405
(with Allow), 413, 415, 502, 503 and 504, each as JSON
{"error":{"code","message"}} with its status. (401, 409 and 429 come with
client keys, turn locks and rate limits: a later issue.)

Most requests go through nginx. nginx reads the whole body and sets
CONTENT_LENGTH itself, so the cases where the body and its announced length
disagree, or where no length is announced, go straight to chatfcgi's
FastCGI socket through fcgi_client.py; they end with a check that the pool
is healthy and that no worker died on the way.
"""

import json
import re
import time

import pytest

from fcgi_client import chat_params, fcgi_request
from helpers import assert_json_error

TIMEOUT_MS = 1000
STACK_ENV = {"CHATFCGI_UPSTREAM_TIMEOUT_MS": str(TIMEOUT_MS)}

MAX_MESSAGE = 32768   # chat.max_message_bytes, default
MAX_BODY = 65536      # chat.max_body_bytes, default
JSON_CT = {"Content-Type": "application/json"}


def post_raw(http, st, data, headers=JSON_CT):
    return http.post(f"{st.url}/api/chat", data=data, headers=headers,
                     timeout=10)


def nested(depth):
    """A request whose ignored field nests arrays so that the document has
    `depth` levels of containers (the top object included)."""
    return ('{"x":' + "[" * (depth - 1) + "]" * (depth - 1)
            + ',"message":"hi"}').encode()


# ------------------------------------------------------------------- 400

BAD_BODIES = [
    # malformed JSON
    ("truncated", b'{"message":'),
    ("unquoted-key", b'{message:"hi"}'),
    ("single-quotes", b"{'message':'hi'}"),
    ("trailing-comma", b'{"message":"hi",}'),
    ("empty-body", b""),
    ("only-spaces", b"   "),
    ("bare-word", b"hello"),
    ("nan", b'{"message":"hi","x":NaN}'),
    ("bad-escape", b'{"message":"a\\qb"}'),
    ("raw-newline-in-string", b'{"message":"a\nb"}'),
    # comments
    ("block-comment", b'{"message":"hi" /* note */}'),
    ("line-comment", b'// note\n{"message":"hi"}'),
    # trailing garbage
    ("trailing-word", b'{"message":"hi"} x'),
    ("two-documents", b'{"message":"hi"}{"message":"hi"}'),
    ("trailing-brace", b'{"message":"hi"}}'),
    # duplicate keys
    ("duplicate-top", b'{"message":"hi","message":"ho"}'),
    ("duplicate-other-top", b'{"x":1,"message":"hi","x":2}'),
    ("duplicate-nested-ignored", b'{"x":{"a":1,"a":2},"message":"hi"}'),
    ("duplicate-in-array-object",
     b'{"x":[{"k":1},{"k":1,"k":2}],"message":"hi"}'),
    # nesting
    ("nested-17", nested(17)),
    ("nested-100", nested(100)),
    ("nested-objects-17",
     b'{"message":"hi","x":' + b'{"a":' * 16 + b"1" + b"}" * 16 + b"}"),
    # not an object
    ("top-array", b'[{"message":"hi"}]'),
    ("top-string", b'"hi"'),
    ("top-number", b"42"),
    ("top-null", b"null"),
    # message
    ("message-missing", b'{"session_id":"abc"}'),
    ("message-empty", b'{"message":""}'),
    ("message-number", b'{"message":42}'),
    ("message-null", b'{"message":null}'),
    ("message-bool", b'{"message":true}'),
    ("message-array", b'{"message":["hi"]}'),
    ("message-object", b'{"message":{"text":"hi"}}'),
    ("message-nul", b'{"message":"a\\u0000b"}'),
    ("message-only-nul", b'{"message":"\\u0000"}'),
    # stream
    ("stream-number", b'{"message":"hi","stream":1}'),
    ("stream-string", b'{"message":"hi","stream":"true"}'),
    ("stream-array", b'{"message":"hi","stream":[]}'),
    ("stream-object", b'{"message":"hi","stream":{}}'),
    # session_id
    ("sid-number", b'{"message":"hi","session_id":42}'),
    ("sid-bool", b'{"message":"hi","session_id":true}'),
    ("sid-array", b'{"message":"hi","session_id":["a"]}'),
    ("sid-object", b'{"message":"hi","session_id":{}}'),
    ("sid-empty", b'{"message":"hi","session_id":""}'),
    ("sid-129", b'{"message":"hi","session_id":"' + b"a" * 129 + b'"}'),
    ("sid-slash", b'{"message":"hi","session_id":"a/b"}'),
    ("sid-dot", b'{"message":"hi","session_id":"a.b"}'),
    ("sid-dotdot", b'{"message":"hi","session_id":".."}'),
    ("sid-space", b'{"message":"hi","session_id":"a b"}'),
    ("sid-braces", b'{"message":"hi","session_id":"a}b{"}'),
    ("sid-colon", b'{"message":"hi","session_id":"a:b"}'),
    ("sid-non-ascii", '{"message":"hi","session_id":"caf\u00e9"}'
     .encode()),
    ("sid-escaped-nul", b'{"message":"hi","session_id":"a\\u0000b"}'),
    ("sid-newline", b'{"message":"hi","session_id":"ab\\n"}'),
    # invalid UTF-8 as raw bytes
    ("utf8-overlong", b'{"message":"\xc0\xaf"}'),
    ("utf8-overlong-3", b'{"message":"\xe0\x80\xaf"}'),
    ("utf8-surrogate", b'{"message":"\xed\xa0\x80"}'),
    ("utf8-f5", b'{"message":"\xf5\x80\x80\x80"}'),
    ("utf8-above-10ffff", b'{"message":"\xf4\x90\x80\x80"}'),
    ("utf8-lone-continuation", b'{"message":"a\x80b"}'),
    ("utf8-ff", b'{"message":"a\xffb"}'),
    ("utf8-truncated", b'{"message":"ok \xe2\x82"}'),
    ("utf8-truncated-at-end", b'{"message":"ok"} \xe2\x82'),
    ("utf8-in-ignored-field", b'{"message":"hi","x":"\xc0\xaf"}'),
    ("utf8-in-key", b'{"message":"hi","\xed\xa0\x80":1}'),
    # surrogate escapes that are not a pair
    ("lone-high", b'{"message":"\\ud800"}'),
    ("lone-low", b'{"message":"\\udc00"}'),
    ("high-then-char", b'{"message":"\\ud800x"}'),
    ("high-then-high", b'{"message":"\\ud800\\ud800"}'),
    ("high-then-bmp", b'{"message":"\\ud83d\\u0041"}'),
    ("reversed-pair", b'{"message":"\\ude00\\ud83d"}'),
    ("lone-in-ignored-field", b'{"message":"hi","x":"\\udfff"}'),
]


@pytest.mark.parametrize("body", [b for _, b in BAD_BODIES],
                         ids=[n for n, _ in BAD_BODIES])
def test_bad_request_body_is_400(stack, http, body):
    assert_json_error(post_raw(http, stack, body), 400, "bad_request")


def test_bad_request_calls_no_model_and_stores_nothing(stack, http, model):
    sid = "errors-untouched-session"
    r = post_raw(http, stack, json.dumps({"session_id": sid,
                                          "message": "hi"}).encode())
    assert r.status_code == 200, r.text
    before = http.get(f"{stack.url}/api/chat/{sid}", timeout=5).json()
    model.reset()
    for body in [{"session_id": sid, "message": 42},
                 {"session_id": sid, "message": ""},
                 {"session_id": sid, "message": "hi", "stream": "yes"},
                 {"session_id": sid, "message": "x" * (MAX_MESSAGE + 1)}]:
        r = post_raw(http, stack, json.dumps(body).encode())
        assert r.status_code in (400, 413), r.text
    assert model.stats()["requests"] == 0
    after = http.get(f"{stack.url}/api/chat/{sid}", timeout=5).json()
    assert after == before


def test_nesting_of_16_levels_is_allowed(stack, http, model):
    r = post_raw(http, stack, nested(16))
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------- 413

@pytest.mark.parametrize("message", [
    "a" * (MAX_MESSAGE + 1),
    # 16385 two-byte characters: 32770 bytes, though fewer characters.
    "é" * 16385,
], ids=["ascii", "multibyte"])
def test_message_over_max_message_bytes_is_413(stack, http, message):
    body = json.dumps({"message": message}, ensure_ascii=False).encode()
    assert_json_error(post_raw(http, stack, body), 413, "too_large")


@pytest.mark.parametrize("message", [
    "a" * MAX_MESSAGE,
    "é" * (MAX_MESSAGE // 2),
    "😀" * (MAX_MESSAGE // 4),
], ids=["ascii", "two-byte", "four-byte"])
def test_message_exactly_at_max_message_bytes_is_ok(stack, http, model,
                                                     message):
    assert len(message.encode()) == MAX_MESSAGE
    body = json.dumps({"message": message}, ensure_ascii=False).encode()
    r = post_raw(http, stack, body)
    assert r.status_code == 200, r.text
    assert model.stats()["recent"][-1]["body"]["messages"][-1][
        "content"] == message


def padded_body(size):
    """A valid request of exactly size bytes (the padding is ignored)."""
    head, tail = b'{"message":"hi","pad":"', b'"}'
    return head + b"p" * (size - len(head) - len(tail)) + tail


def test_body_over_max_body_bytes_is_413(stack, http):
    body = padded_body(MAX_BODY + 1)
    assert len(body) == MAX_BODY + 1
    assert_json_error(post_raw(http, stack, body), 413, "too_large")


def test_body_exactly_at_max_body_bytes_is_ok(stack, http, model):
    body = padded_body(MAX_BODY)
    assert len(body) == MAX_BODY
    r = post_raw(http, stack, body)
    assert r.status_code == 200, r.text


def test_body_over_the_cap_is_413_even_when_malformed(stack, http):
    assert_json_error(post_raw(http, stack, b"{" * (MAX_BODY + 10)), 413,
                      "too_large")


# ------------------------------------------------------------------- 415

@pytest.mark.parametrize("content_type", [
    None,
    "text/plain",
    "application/json; charset=latin1",
    "application/json; charset=iso-8859-1",
    "application/x-www-form-urlencoded",
    "application/jsonx",
    "application/json-patch+json",
    "text/json",
    "multipart/form-data; boundary=x",
], ids=lambda c: str(c))
def test_wrong_content_type_is_415(stack, http, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = post_raw(http, stack, b'{"message":"hi"}', headers)
    assert_json_error(r, 415, "unsupported_media_type")


@pytest.mark.parametrize("content_type", [
    "application/json",
    "application/json; charset=utf-8",
    "application/json;charset=UTF-8",
    "Application/JSON",
    'application/json; charset="utf-8"',
])
def test_json_content_types_are_accepted(stack, http, model, content_type):
    r = post_raw(http, stack, b'{"message":"hi"}',
                 {"Content-Type": content_type})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------ 404 and 405

@pytest.mark.parametrize("method,path", [
    ("GET", "/api/nope"),
    ("POST", "/api/nope"),
    ("GET", "/api/chatx"),
    ("POST", "/api/chats"),
    ("GET", "/api/healthz/x"),
    ("GET", "/api"),
    ("GET", "/nope"),
    ("GET", "/v1/nope"),
])
def test_unknown_path_is_404(stack, http, method, path):
    r = http.request(method, f"{stack.url}{path}", timeout=5)
    assert_json_error(r, 404, "not_found")


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/api/chat", "POST"),
    ("PUT", "/api/chat", "POST"),
    ("DELETE", "/api/chat", "POST"),
    ("PATCH", "/api/chat", "POST"),
    ("PUT", "/api/chat/x", "GET, DELETE"),
    ("POST", "/api/chat/x", "GET, DELETE"),
    ("PATCH", "/api/chat/x", "GET, DELETE"),
    ("POST", "/api/healthz", "GET"),
    ("DELETE", "/api/healthz", "GET"),
])
def test_wrong_method_is_405_with_allow(stack, http, method, path, allow):
    r = http.request(method, f"{stack.url}{path}", timeout=5)
    assert_json_error(r, 405, "method_not_allowed")
    assert r.headers.get("Allow") == allow, r.headers


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/chat/bad.id"),
    ("DELETE", "/api/chat/bad.id"),
    ("GET", "/api/chat/" + "a" * 129),
    ("DELETE", "/api/chat/" + "a" * 129),
    ("GET", "/api/chat/a%20b"),
    ("GET", "/api/chat/a/b"),
    ("GET", "/api/chat/caf%C3%A9"),
    ("GET", "/api/chat/"),
], ids=["get-dot", "delete-dot", "get-129", "delete-129", "space", "slash",
        "non-ascii", "empty"])
def test_bad_session_id_in_the_path_is_400(stack, http, method, path):
    r = http.request(method, f"{stack.url}{path}", timeout=5)
    assert_json_error(r, 400, "bad_request")


def test_session_id_of_128_chars_in_the_path_is_valid(stack, http):
    r = http.get(f"{stack.url}/api/chat/{'a' * 128}", timeout=5)
    assert_json_error(r, 404, "not_found")


# ------------------------------------------------------- 502, 503 and 504

def test_upstream_error_is_502(stack, http, model):
    model.set(mode="fail", status=500)
    body = assert_json_error(post_raw(http, stack, b'{"message":"hi"}'),
                             502, "upstream_error")
    assert body["error"]["message"] == "the model provider failed (HTTP 500)"


def test_upstream_garbage_is_502(stack, http, model):
    model.set(mode="garbage")
    assert_json_error(post_raw(http, stack, b'{"message":"hi"}'), 502,
                      "upstream_error")


def test_upstream_timeout_is_504(stack, http, model):
    model.set(mode="hang")
    start = time.monotonic()
    r = post_raw(http, stack, b'{"message":"hi"}')
    elapsed = time.monotonic() - start
    assert_json_error(r, 504, "upstream_timeout")
    assert TIMEOUT_MS / 1000 - 0.1 <= elapsed <= TIMEOUT_MS / 1000 + 1, \
        elapsed


def test_redis_down_is_503_with_retry_after(stack, http, model):
    stack.stop_service("redis")
    try:
        for method, path, body in [
                ("POST", "/api/chat", b'{"message":"hi"}'),
                ("GET", "/api/chat/some-session", None),
                ("DELETE", "/api/chat/some-session", None)]:
            r = http.request(method, f"{stack.url}{path}", data=body,
                             headers=JSON_CT, timeout=10)
            assert_json_error(r, 503, "unavailable")
            assert re.fullmatch(r"[1-9][0-9]*",
                                r.headers.get("Retry-After", "")), r.headers
        assert model.stats()["requests"] == 0
    finally:
        stack.start_service("redis")
    deadline = time.monotonic() + 5
    while http.get(f"{stack.url}/api/healthz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "Redis is back, healthz is not"
        time.sleep(0.1)


# ------------------------------------- raw FastCGI: the body and its length

BODY = b'{"message":"hello"}'


def raw(stack, params, body=BODY, timeout=5.0):
    return fcgi_request(stack.socket_path, params, body, timeout=timeout)


def test_raw_client_speaks_fastcgi(stack, model):
    """The baseline: a request as nginx would send it works; a long
    parameter value needs the 4-byte length form."""
    r = raw(stack, chat_params(content_length=len(BODY),
                               HTTP_USER_AGENT="x" * 300))
    assert r.status == 200, r
    assert r.app_status == 0 and r.protocol_status == 0
    assert set(r.json()) == {"session_id", "reply", "model", "usage"}


def test_raw_body_longer_than_content_length_is_400(stack, model):
    r = raw(stack, chat_params(content_length=len(BODY) - 3))
    assert_json_error(r, 400, "bad_request")
    assert model.stats()["requests"] == 0


def test_raw_body_shorter_than_content_length_is_400_at_once(stack, model):
    r = raw(stack, chat_params(content_length=len(BODY) + 10), timeout=2)
    assert_json_error(r, 400, "bad_request")
    assert r.elapsed < 2
    assert model.stats()["requests"] == 0


def test_raw_empty_body_with_a_content_length_is_400(stack):
    r = raw(stack, chat_params(content_length=100), body=b"", timeout=2)
    assert_json_error(r, 400, "bad_request")


def test_raw_no_content_length_reads_the_body(stack, model):
    r = raw(stack, chat_params(content_length=None))
    assert r.status == 200, r
    assert model.stats()["recent"][-1]["body"]["messages"][-1] == {
        "role": "user", "content": "hello"}


@pytest.mark.parametrize("length", [MAX_BODY + 1, 10 ** 15],
                         ids=["just-over", "huge"])
def test_raw_content_length_over_the_cap_is_413_unread(stack, length):
    """The announced length alone decides: no body is sent at all (the
    STDIN stream stays open), so an application that waited for it would
    hang past the deadline."""
    r = fcgi_request(stack.socket_path,
                     chat_params(content_length=length), body=None,
                     timeout=2)
    assert_json_error(r, 413, "too_large")


def test_raw_body_over_the_cap_without_content_length_is_413(stack):
    body = padded_body(MAX_BODY + 5000)
    r = raw(stack, chat_params(content_length=None), body=body)
    assert_json_error(r, 413, "too_large")


@pytest.mark.parametrize("value", ["abc", "12abc", "-5", " 19", "1e3", "",
                                   "99999999999999999999999"])
def test_raw_content_length_not_a_number_is_handled(stack, value):
    r = raw(stack, chat_params(content_length=value), timeout=3)
    # Either it is ignored (the body is read to its end) or refused; either
    # way a JSON answer, never a hang or a crash.
    assert r.status in (200, 400, 413), r
    assert r.headers["content-type"].startswith("application/json"), r
    if r.status != 200:
        assert r.json()["error"]["code"] in ("bad_request", "too_large")


def test_raw_missing_request_method(stack):
    r = raw(stack, chat_params(content_length=len(BODY),
                               REQUEST_METHOD=None))
    assert_json_error(r, 405, "method_not_allowed")
    assert r.headers.get("allow") == "POST"


def test_raw_missing_document_and_request_uri(stack):
    r = raw(stack, chat_params(content_length=len(BODY), DOCUMENT_URI=None,
                               REQUEST_URI=None, SCRIPT_NAME=None))
    assert_json_error(r, 404, "not_found")


def test_raw_missing_document_uri_falls_back_to_request_uri(stack, model):
    r = raw(stack, chat_params(content_length=len(BODY), DOCUMENT_URI=None,
                               REQUEST_URI="/api/chat?x=1"))
    assert r.status == 200, r


def test_raw_no_params_at_all(stack):
    r = raw(stack, {}, body=b"")
    assert r.status in (404, 405), r
    assert r.headers["content-type"].startswith("application/json"), r


def test_raw_request_id_from_the_web_server_is_used(stack):
    r = raw(stack, chat_params(method="GET", uri="/api/healthz",
                               content_type=None, REQUEST_ID="abc-123"),
            body=b"")
    assert r.status == 200, r
    assert r.headers["x-request-id"] == "abc-123"


def test_raw_connection_closed_right_after_the_answer(stack, model):
    """Once the whole request was read, the worker closes at once rather
    than waiting (libfcgi's linger, up to 2 s) for the web server to close
    first: a unix socket cannot lose the answer to a reset."""
    r = fcgi_request(stack.socket_path, chat_params(), BODY, wait_close=3)
    assert r.status == 200, r
    assert r.closed_in is not None and r.closed_in < 0.5, r.closed_in


def test_raw_early_413_waits_for_the_web_server_to_close(stack):
    """A body left unread (413 on the announced length) keeps the wait: the
    web server may still be writing, and a close now would cut it off."""
    r = fcgi_request(stack.socket_path,
                     chat_params(content_length=MAX_BODY + 1), body=None,
                     end_stdin=False, wait_close=3)
    assert_json_error(r, 413, "too_large")
    assert r.closed_in is None or r.closed_in > 1, r.closed_in


def test_raw_requests_left_the_pool_healthy(stack, http):
    """Last in the module: after all of the above the pool answers, and no
    worker died (the master logs every death that is not a clean exit)."""
    r = http.get(f"{stack.url}/api/healthz", timeout=5)
    assert r.status_code == 200, r.text
    r = raw(stack, chat_params(method="GET", uri="/api/healthz",
                               content_type=None), body=b"")
    assert r.status == 200, r
    log = stack.log_path("chatfcgi").read_text(errors="replace")
    for sign in ("killed by signal", "exited with status", "died"):
        assert sign not in log, [line for line in log.splitlines()
                                 if sign in line]
