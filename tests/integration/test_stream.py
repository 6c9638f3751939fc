"""Streaming chat turns (POST /api/chat with "stream": true) through the real
stack: nginx -> chatfcgi pool -> local model, Redis history.

The contract (docs: /work/shared/API.md): a 200 text/event-stream of
`event: delta` {"content"} events and one `event: done` {session_id, model,
usage}; an error after the stream began is one `event: error` with the error
object and the turn is not stored; an error before the first byte keeps its
JSON status. A client that hangs up cancels the upstream call and frees its
worker.

The client (sse_client.py) reads the raw socket, so arrival times are those
of the bytes, not of a buffered line reader. Figures worth watching (first
delta vs. upstream start, abort detection latency) are printed: run with -s
to see them.
"""

import json
import re
import socket
import threading
import time
import uuid

import pytest

import fcgi_client
import helpers
from helpers import LocalModel, post_chat
from sse_client import stream_chat
from polling import wait_for

STACK_ENV = {"CHATFCGI_WORKERS": "4"}

MODEL_NAME = "local-eliza"   # CHATFCGI_MODEL of the test stacks

UTF8_SHORT = "é🙂漢"          # 2-, 4- and 3-byte characters, one word
UTF8_LONG = ("Grüße aus Köln — café crème 🙂🙂🙂 漢字テスト "
             "👍🏽 naïve 𝄞 ok")
ESCAPES = ('He said "hi" \\ then\nnew line\n\nand a\ttab, '
           '</script> {"json": [1]} done')


def new_sid():
    return "t-" + uuid.uuid4().hex


def pieces(reply):
    """How the local model cuts a reply into content events (one per word,
    whitespace kept)."""
    return re.findall(r"\s*\S+\s*", reply) or [reply]


def history(http, st, sid):
    r = http.get(f"{st.url}/api/chat/{sid}", timeout=5)
    assert r.status_code in (200, 404), r.text
    return r


def turn(http, st, message, sid, timeout=5):
    """A plain (non-streaming) turn that must succeed."""
    r = post_chat(http, st, message, sid, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def assert_not_stored(http, st, sid, before=None):
    """No history for a new session (404), or the history unchanged."""
    r = history(http, st, sid)
    if before is None:
        assert r.status_code == 404, \
            f"a failed turn was stored: {r.text}"
        body = r.json()
        assert body["error"]["code"] == "not_found", body
    else:
        assert r.status_code == 200, r.text
        assert r.json()["messages"] == before, \
            "a failed turn changed the stored history"


def assert_sse_ok(res):
    """200 event stream of delta* then exactly one done, well-formed."""
    assert res.status == 200, (res.status, res.body, res.events)
    assert res.headers.get("content-type", "").startswith(
        "text/event-stream"), res.headers
    assert res.headers.get("x-request-id"), res.headers
    assert res.complete, "the stream did not end properly"
    assert not res.stray.strip(), f"bytes after the last event: {res.stray!r}"
    names = res.names
    assert names and names[-1] == "done", names
    assert names == ["delta"] * (len(names) - 1) + ["done"], names
    for e in res.events:
        assert e.utf8_ok, f"event data is not valid UTF-8: {e.raw!r}"
        assert e.json_ok, f"event data is not JSON: {e.raw!r}"
    for e in res.deltas:
        assert set(e.data) == {"content"}, e.data
        content = e.data["content"]
        assert isinstance(content, str) and content, e.data
        content.encode("utf-8")  # raises on a lone surrogate (\ud83d)


def assert_json_error(res, status, code):
    """An error answered before the first byte: plain JSON, no stream."""
    body = helpers.assert_json_error(res, status, code)
    assert not res.events, res.events
    return body


def assert_error_event(res, code):
    """Exactly one error event, last, with the contract's error object."""
    assert res.status == 200, (res.status, res.body)
    assert res.headers.get("content-type", "").startswith(
        "text/event-stream"), res.headers
    names = res.names
    assert "done" not in names, names
    assert names.count("error") == 1, names
    assert names[-1] == "error", names
    err = res.events[-1]
    assert err.json_ok, err.raw
    assert set(err.data) == {"error"}, err.data
    assert set(err.data["error"]) == {"code", "message"}, err.data
    assert err.data["error"]["code"] == code, err.data
    assert isinstance(err.data["error"]["message"], str) and \
        err.data["error"]["message"], err.data
    assert res.complete or res.eof, "the stream did not end after the error"
    return err.data


def restart_redis(st, http):
    """Start Redis again and wait until healthz reports it up."""
    st.start_service("redis")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if http.get(f"{st.url}/api/healthz", timeout=5).status_code == 200:
            return True
        time.sleep(0.05)
    return False


def last_upstream_request(model):
    recent = model.stats()["recent"]
    assert recent, "the model got no request"
    return recent[-1]


def word_count(messages):
    """The local model's token count: words of every message."""
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content.split())
    return total


# ----------------------------------------------------------- other stacks

@pytest.fixture(scope="module")
def solo_stack(stack_factory):
    """One worker: a worker left busy by a request shows at once."""
    return stack_factory({"CHATFCGI_WORKERS": "1"})


@pytest.fixture(scope="module")
def quick_stack(stack_factory):
    """An upstream timeout of one second, a reply cap of 4 KiB."""
    return stack_factory({"CHATFCGI_WORKERS": "2",
                          "CHATFCGI_UPSTREAM_TIMEOUT_MS": "1000",
                          "CHATFCGI_UPSTREAM_MAX_RESPONSE_BYTES": "4096"})


@pytest.fixture(scope="module")
def wide_stack(stack_factory):
    return stack_factory({"CHATFCGI_WORKERS": "40"})


def with_model(st, http):
    """For a fixture to yield from: (st, its local model), the model reset
    before and after the test."""
    m = LocalModel.of(st, http)
    m.reset()
    yield st, m
    m.reset()


@pytest.fixture
def solo(solo_stack, http):
    yield from with_model(solo_stack, http)


@pytest.fixture
def quick(quick_stack, http):
    yield from with_model(quick_stack, http)


@pytest.fixture
def wide(wide_stack, http):
    yield from with_model(wide_stack, http)


# ------------------------------------------------------------ happy path

def test_stream_shape_and_stored_turn(stack, model, http):
    reply = "Streaming answers arrive piece by piece, as they are made."
    model.set(reply=reply)
    sid = new_sid()
    res = stream_chat(stack.url, "Tell me about streams", sid)
    assert_sse_ok(res)
    assert len(res.deltas) >= 1
    assert res.text == reply

    upstream = last_upstream_request(model)
    body = upstream["body"]
    assert body["stream"] is True
    assert upstream["headers"].get("x-request-id") == \
        res.headers["x-request-id"]

    done = res.done.data
    assert set(done) == {"session_id", "model", "usage"}, done
    assert done["session_id"] == sid
    assert done["model"] == MODEL_NAME
    usage = done["usage"]
    assert usage["prompt_tokens"] == word_count(body["messages"]), usage
    assert usage["completion_tokens"] == len(reply.split()), usage

    r = history(http, stack, sid)
    assert r.status_code == 200, r.text
    assert r.json() == {"session_id": sid, "messages": [
        {"role": "user", "content": "Tell me about streams"},
        {"role": "assistant", "content": res.text}]}

    # a second streamed turn of the same session carries the history
    model.set(reply="And more.")
    res2 = stream_chat(stack.url, "Go on", sid)
    assert_sse_ok(res2)
    assert res2.text == "And more."
    sent = last_upstream_request(model)["body"]["messages"]
    assert sent[-3:] == [{"role": "user", "content": "Tell me about streams"},
                         {"role": "assistant", "content": reply},
                         {"role": "user", "content": "Go on"}]
    msgs = history(http, stack, sid).json()["messages"]
    assert [m["content"] for m in msgs] == [
        "Tell me about streams", reply, "Go on", "And more."]


def test_stream_without_session_id_gets_a_new_one(stack, model, http):
    model.set(reply="Hello, stranger.")
    res = stream_chat(stack.url, "hello")
    assert_sse_ok(res)
    sid = res.done.data["session_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", sid), sid
    msgs = history(http, stack, sid).json()["messages"]
    assert msgs == [{"role": "user", "content": "hello"},
                    {"role": "assistant", "content": "Hello, stranger."}]


def test_empty_reply_is_just_done(stack, model, http):
    """No content at all: no delta (an empty one is useless), one done; what
    is stored is what was streamed."""
    model.set(reply="")
    sid = new_sid()
    res = stream_chat(stack.url, "say nothing", sid)
    assert_sse_ok(res)
    assert res.names == ["done"], res.events
    assert res.done.data["session_id"] == sid
    r = history(http, stack, sid)
    assert r.status_code == 200, r.text
    assert r.json()["messages"] == [
        {"role": "user", "content": "say nothing"},
        {"role": "assistant", "content": ""}]


def test_deltas_arrive_incrementally(stack, model):
    reply = "one two three four five six"
    model.set(reply=reply, chunk_delay_ms=200)
    res = stream_chat(stack.url, "count for me", new_sid())
    assert_sse_ok(res)
    assert res.text == reply
    deltas = res.deltas
    assert len(deltas) == 6, [d.data for d in deltas]
    spread = deltas[-1].t - deltas[0].t
    started = last_upstream_request(model)["at"]  # wall clock, model side
    first_latency = deltas[0].wall - started
    print(f"\n[stream] first delta {first_latency * 1000:.1f} ms after the "
          f"upstream began; first->last delta {spread * 1000:.0f} ms; "
          f"head after {(res.t_head - res.t_sent) * 1000:.1f} ms")
    assert spread >= 0.8, f"deltas bunched: first->last {spread:.3f} s"
    # each one on its own, as the model sent it
    for i, d in enumerate(deltas):
        assert d.t - deltas[0].t >= 0.2 * i - 0.08, \
            [round(x.t - deltas[0].t, 3) for x in deltas]
    assert first_latency <= 0.15, \
        f"first delta {first_latency:.3f} s after the upstream began"
    # done after the model's closing events (stop, usage, [DONE])
    assert res.done.t >= deltas[-1].t


@pytest.mark.parametrize("behaviour,reply", [
    ({"split_bytes": 1}, UTF8_SHORT),
    ({"split_bytes": 7}, UTF8_LONG),
    ({"split_bytes": 7}, ESCAPES),
    ({"split_bytes": 3, "sse_comments": True}, UTF8_LONG),
    ({"coalesce": True}, UTF8_LONG),
    ({"coalesce": True}, ESCAPES),
    ({"sse_comments": True}, UTF8_LONG),
], ids=["split1-utf8", "split7-utf8", "split7-escapes",
        "split3-comments-utf8", "coalesce-utf8", "coalesce-escapes",
        "comments-utf8"])
def test_odd_upstream_chunking_reassembles(stack, model, http, behaviour,
                                           reply):
    model.set(reply=reply, **behaviour)
    sid = new_sid()
    res = stream_chat(stack.url, "talk to me", sid, total_timeout=20)
    assert_sse_ok(res)  # every delta valid UTF-8 JSON, no lone surrogate
    assert res.text == reply
    assert len(res.deltas) <= len(pieces(reply))
    assert res.done.data["usage"]["completion_tokens"] == len(reply.split())
    msgs = history(http, stack, sid).json()["messages"]
    assert msgs[-1] == {"role": "assistant", "content": reply}


# ---------------------------------------------------- errors mid-stream

@pytest.mark.parametrize("session", ["new", "existing"])
def test_upstream_drop_mid_stream(stack, model, http, session):
    sid = new_sid()
    before = None
    if session == "existing":
        turn(http, stack, "I feel fine", sid)
        before = history(http, stack, sid).json()["messages"]
        assert len(before) == 2
    reply = "alpha beta gamma delta epsilon zeta"
    model.set(mode="drop", drop_after=2, reply=reply)
    res = stream_chat(stack.url, "stream then break", sid)
    assert_error_event(res, "upstream_error")
    assert res.names == ["delta", "delta", "error"], res.events
    assert res.text == "".join(pieces(reply)[:2])
    assert_not_stored(http, stack, sid, before)


def test_upstream_timeout_mid_stream_is_error_event(quick, http):
    st, model = quick
    model.set(reply="slow words keep coming one by one until the end",
              chunk_delay_ms=400)
    sid = new_sid()
    t0 = time.monotonic()
    res = stream_chat(st.url, "be slow", sid)
    took = time.monotonic() - t0
    assert res.deltas, res.events
    assert_error_event(res, "upstream_timeout")
    assert 0.9 <= took <= 3.0, took
    assert_not_stored(http, st, sid)


def test_redis_down_after_stream_began_is_error_event(stack, model, http):
    """Redis goes away while the model streams: the turn cannot be stored,
    so the stream ends with an error event (unavailable), not done."""
    sid = new_sid()
    turn(http, stack, "I feel fine", sid)
    before = history(http, stack, sid).json()["messages"]
    model.set(reply="one two three four five six", chunk_delay_ms=300)
    stopped = []

    def stop_redis(event):
        if event.name == "delta" and not stopped:
            stack.stop_service("redis")
            stopped.append(time.monotonic())

    try:
        res = stream_chat(stack.url, "keep talking", sid, on_event=stop_redis)
    finally:
        ok = restart_redis(stack, http)
    assert ok, "healthz did not come back after Redis restarted"
    assert stopped and res.deltas
    assert_error_event(res, "unavailable")
    assert res.text == "one two three four five six"
    assert_not_stored(http, stack, sid, before)


def test_reply_over_cap_mid_stream_is_error_event(quick, http):
    st, model = quick
    reply = " ".join(f"w{i:05d}" for i in range(800))  # 5.6 KB > 4 KiB
    model.set(reply=reply)
    sid = new_sid()
    res = stream_chat(st.url, "say a lot", sid)
    assert res.deltas, res.events
    assert_error_event(res, "upstream_error")
    assert reply.startswith(res.text)
    assert len(res.text.encode()) <= 4096
    assert_not_stored(http, st, sid)


def test_garbage_stream(stack, model, http):
    model.set(mode="garbage")
    sid = new_sid()
    res = stream_chat(stack.url, "hello?", sid)
    if res.status == 200:
        assert_error_event(res, "upstream_error")
    else:
        assert_json_error(res, 502, "upstream_error")
    assert "done" not in res.names
    assert_not_stored(http, stack, sid)


# ------------------------------------------- errors before the first byte

@pytest.mark.parametrize("behaviour", [
    {"mode": "fail", "status": 500},
    {"mode": "fail", "status": 400},
    {"mode": "fail", "status": 429},
    {"mode": "fail", "status": 503},
    # Headers of a 200 event stream, then the connection cut before any
    # event: nothing was sent to the client yet, so a JSON 502.
    {"mode": "drop", "drop_after": 0, "reply": "never said"},
    # A plain 200 that is not a completion at all.
    {"mode": "fail", "status": 200, "body": "this is not json"},
], ids=["500", "400", "429", "503", "drop-before-first-event",
        "plain-200-garbage"])
def test_upstream_fail_before_stream_is_json_502(stack, model, http,
                                                 behaviour):
    model.set(**behaviour)
    sid = new_sid()
    res = stream_chat(stack.url, "hello", sid)
    assert_json_error(res, 502, "upstream_error")
    assert_not_stored(http, stack, sid)


def test_upstream_that_does_not_stream(stack, model, http):
    """A plain 200 completion to a streaming call (an upstream that ignores
    "stream"): one delta with the whole reply, the upstream's model and
    usage in done, the turn stored."""
    reply = "A whole answer at once 🙂 — ok"
    completion = {"id": "x", "object": "chat.completion", "created": 1,
                  "model": "whole-model",
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant",
                                           "content": reply}}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 7,
                            "total_tokens": 10}}
    model.set(mode="fail", status=200, body=json.dumps(completion))
    sid = new_sid()
    res = stream_chat(stack.url, "hello", sid)
    assert_sse_ok(res)
    assert res.text == reply
    assert res.done.data == {"session_id": sid, "model": "whole-model",
                             "usage": {"prompt_tokens": 3,
                                       "completion_tokens": 7}}
    msgs = history(http, stack, sid).json()["messages"]
    assert msgs[-1] == {"role": "assistant", "content": reply}


def test_upstream_hang_before_stream_is_json_504(quick, http):
    st, model = quick
    model.set(mode="hang")
    sid = new_sid()
    t0 = time.monotonic()
    res = stream_chat(st.url, "hello", sid)
    took = time.monotonic() - t0
    assert_json_error(res, 504, "upstream_timeout")
    assert 0.9 <= took <= 3.0, took
    assert_not_stored(http, st, sid)
    # the timed-out upstream connection is closed, not left hanging
    assert wait_for(lambda: model.stats()["disconnects"] >= 1, 1.0), \
        model.stats()


@pytest.mark.parametrize("payload", [
    {"message": "", "stream": True},
    {"stream": True},
    {"message": 42, "stream": True},
    {"message": "hi", "session_id": "bad id!", "stream": True},
    {"message": "hi", "stream": "yes"},
    b'{"message": "hi", "stream": true',
    b'{"message": "\xff\xfe", "stream": true}',
], ids=["empty-message", "no-message", "message-not-string", "bad-session",
        "stream-not-bool", "truncated-json", "invalid-utf8"])
def test_validation_error_with_stream_is_json_400(stack, model, payload):
    res = stream_chat(stack.url, payload=payload)
    assert_json_error(res, 400, "bad_request")
    assert model.stats()["requests"] == 0


def test_redis_down_with_stream_is_json_503(stack, model, http):
    sid = new_sid()
    stack.stop_service("redis")
    try:
        res = stream_chat(stack.url, "hello", sid)
        assert_json_error(res, 503, "unavailable")
        assert res.headers.get("retry-after") == "1", res.headers
        assert model.stats()["requests"] == 0
    finally:
        ok = restart_redis(stack, http)
    assert ok, "healthz did not come back after Redis restarted"


def test_turn_succeeds_after_redis_restart(solo, http):
    """Redis restarts between two turns (nothing runs meanwhile), so the
    worker's connection is stale. Redis is up again: the next turn must
    succeed, not answer 503 (one worker, so the same connection is used)."""
    st, model = solo
    sid = new_sid()
    res = stream_chat(st.url, "before the restart", sid)
    assert_sse_ok(res)  # the worker now holds a Redis connection
    st.stop_service("redis")
    st.start_service("redis")  # returns once Redis answers PING
    res = stream_chat(st.url, "after the restart", sid)
    assert_sse_ok(res)
    msgs = history(http, st, sid).json()["messages"]
    assert [m["content"] for m in msgs][::2] == ["before the restart",
                                                 "after the restart"]


# ------------------------------------------------------- client hang-ups

def wait_disconnect(model, since_wall, timeout=1.0):
    """The model's stats once it has seen a disconnect; the detection
    latency (model's last_disconnect_at minus since_wall) in seconds."""
    deadline = since_wall + timeout
    while True:
        stats = model.stats()
        if stats["disconnects"] >= 1 or time.time() > deadline:
            break
        time.sleep(0.01)
    at = stats["last_disconnect_at"]
    return stats, (at - since_wall) if at is not None else None


def assert_worker_free(http, st, model, sid):
    """With one worker: the history read and the next turn go through at
    once, so the worker is not stuck in the cancelled call."""
    model.reset()
    t0 = time.monotonic()
    assert_not_stored(http, st, sid)
    res = stream_chat(st.url, "next turn", sid, read_timeout=3,
                      total_timeout=3)
    took = time.monotonic() - t0
    assert_sse_ok(res)
    assert took < 1.5, f"the next turn took {took:.2f} s"
    return took


def assert_upstream_cancelled(http, st, model, sid, res, what, how):
    """After the client hung up (res, with a FIN or an RST: how): the one
    upstream call was cancelled within 1 s, and the worker is free for the
    next turn at once."""
    stats, latency = wait_disconnect(model, res.wall_closed)
    assert stats["requests"] == 1, stats
    print(f"\n[abort/{how}] {what}: upstream cancelled "
          f"{latency * 1000 if latency is not None else float('nan'):.1f}"
          f" ms after the client hung up")
    assert stats["disconnects"] == 1, \
        f"the upstream call was not cancelled within 1 s: {stats}"
    assert latency <= 1.0, latency
    took = assert_worker_free(http, st, model, sid)
    print(f"[abort/{how}] next turn on the same worker took "
          f"{took * 1000:.0f} ms")


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_client_abort_while_model_silent(solo, http, how):
    st, model = solo
    model.set(mode="hang")
    sid = new_sid()
    res = stream_chat(st.url, "are you there?", sid, close_after=0.3,
                      rst=(how == "rst"))
    assert res.closed_by_client
    assert res.status == 0 and not res.events  # nothing came before
    assert_upstream_cancelled(http, st, model, sid, res, "model silent", how)


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_client_abort_mid_stream(solo, http, how):
    st, model = solo
    reply = " ".join(f"word{i}" for i in range(40))
    model.set(reply=reply, chunk_delay_ms=300)
    sid = new_sid()
    res = stream_chat(st.url, "talk for a long time", sid,
                      close_after_events=2, rst=(how == "rst"))
    assert res.closed_by_client
    assert res.status == 200
    assert res.names == ["delta", "delta"], res.events
    assert res.text == "".join(pieces(reply)[:2])
    assert_upstream_cancelled(http, st, model, sid, res, "mid-stream", how)


def test_client_gone_after_done_changes_nothing(solo, http):
    """Hanging up right after done: the turn was complete and stays."""
    st, model = solo
    model.set(reply="Short and sweet.")
    sid = new_sid()
    res = stream_chat(st.url, "hi", sid, close_after_events=4)
    assert "done" in res.names, res.events
    msgs = history(http, st, sid).json()["messages"]
    assert msgs[-1] == {"role": "assistant", "content": "Short and sweet."}


def send_then_stop_reading(st, payload, request_id):
    """A raw FastCGI request for payload that shuts down its read side once
    sent: the worker reads the whole request, and its first write fails
    (EPIPE) without its poll ever seeing the client leave. Returns the
    socket, for the caller to close."""
    body = json.dumps(payload).encode()
    params = fcgi_client.chat_params(content_length=len(body),
                                     REQUEST_ID=request_id)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(st.socket_path))
    sock.sendall(
        fcgi_client.record(fcgi_client.FCGI_BEGIN_REQUEST,
                           fcgi_client.BEGIN_BODY.pack(
                               fcgi_client.FCGI_RESPONDER, 0)) +
        fcgi_client.stream_records(fcgi_client.FCGI_PARAMS,
                                   fcgi_client.encode_params(params)) +
        fcgi_client.stream_records(fcgi_client.FCGI_STDIN, body))
    sock.shutdown(socket.SHUT_RD)
    return sock


def access_status(st, request_id, timeout=5.0):
    """The status of chatfcgi's access log line for request_id, once
    written, else None."""
    pattern = re.compile(r" access req=%s \S+ \S+ (\d+) " %
                         re.escape(request_id))

    def logged():
        text = st.log_path("chatfcgi").read_text(errors="replace")
        found = pattern.search(text)
        return int(found.group(1)) if found else None
    return wait_for(logged, timeout)


def test_client_gone_before_a_whole_answer_is_sent_stores_nothing(solo,
                                                                   http):
    """A streamed turn whose upstream answers in one piece (it ignores
    "stream"), for a client that has stopped reading: writing that piece
    is the first write, and it fails. The turn must end as a client gone
    (499), not be stored with an empty reply as a success."""
    st, model = solo
    model.set(mode="fail", status=200, body=json.dumps({
        "model": "whole-model", "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "never read"}}]}))
    sid, request_id = new_sid(), "gone-" + uuid.uuid4().hex
    sock = send_then_stop_reading(st, {"session_id": sid, "stream": True,
                                       "message": "hello?"}, request_id)
    try:
        assert access_status(st, request_id) == 499
    finally:
        sock.close()
    assert_worker_free(http, st, model, sid)  # and the turn is not stored


# ------------------------------------------------------------ many at once

def test_many_concurrent_streams(wide, http):
    st, model = wide
    n = 40
    reply = "one two three four five six seven eight nine ten"
    model.set(reply=reply, chunk_delay_ms=100)
    results = [None] * n
    errors = []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait(5)
            results[i] = stream_chat(st.url, f"stream number {i}",
                                     f"wide-{i}-{uuid.uuid4().hex[:8]}",
                                     read_timeout=10, total_timeout=20)
        except BaseException as exc:  # noqa: BLE001  reported below
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    took = time.monotonic() - t0
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)
    for res in results:
        assert_sse_ok(res)
        assert res.text == reply
        assert len(res.deltas) == 10
    firsts = sorted(r.deltas[0].t - r.t_sent for r in results)
    print(f"\n[wide] {n} streams in {took:.2f} s; first delta after "
          f"median {firsts[n // 2] * 1000:.0f} ms, max "
          f"{firsts[-1] * 1000:.0f} ms")
    # one stream alone takes ~1.3 s (13 events, 100 ms apart): they ran
    # side by side, not one after the other
    assert took < 10, took
    assert model.stats()["requests"] == n

    r = http.get(f"{st.url}/api/healthz", timeout=5)
    assert r.status_code == 200, r.text
    model.reset()
    sid = new_sid()
    turn(http, st, "still there?", sid)
    res = stream_chat(st.url, "and streaming?", sid)
    assert_sse_ok(res)
