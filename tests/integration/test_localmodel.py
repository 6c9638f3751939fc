"""Tests of app/localmodel.py alone: the OpenAI shapes it serves and every
/control mode the chatbot's integration tests rely on.

Run with Debian's interpreter, which has pytest and requests:
    /usr/bin/python3 -m pytest -q tests/integration/test_localmodel.py
"""

import json
import os
import select
import socket
import subprocess
import sys
import time

import pytest
import requests

from helpers import new_session

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "..", "..", "app", "localmodel.py")
SAD = [{"role": "user", "content": "I feel sad about my job"}]


def start_server():
    """Start localmodel on a free port; return (process, base URL).

    --port 0 lets the kernel pick the port inside the server itself and the
    "listening" line names it, so no other process can take it in between.
    """
    proc = subprocess.Popen([sys.executable, SERVER, "--host", "127.0.0.1",
                             "--port", "0"], stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 5)
    line = proc.stdout.readline() if ready else ""
    if "listening on http://" not in line:
        stop_server(proc)
        raise RuntimeError(f"localmodel did not start: {line!r}")
    return proc, line.split("listening on ")[1].strip().removesuffix("/v1")


def stop_server(proc):
    """Stop the process this module started (by its PID, nothing else)."""
    proc.terminate()
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
    finally:
        proc.stdout.close()


def call(method, url, session=None, timeout=5, **kw):
    """One request, on a connection of its own unless a session is given."""
    if session is not None:
        return session.request(method, url, timeout=timeout, **kw)
    with new_session() as s:
        return s.request(method, url, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def base():
    proc, url = start_server()
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(autouse=True)
def reset(base):
    call("POST", base + "/control/reset").raise_for_status()


def control(base, **fields):
    r = call("POST", base + "/control", json=fields)
    assert r.json() == {"ok": True}


def stats(base):
    return call("GET", base + "/control/stats").json()


def wait_for(base, predicate, seconds=1.0):
    """Poll the stats until predicate holds; return the last stats seen."""
    deadline = time.monotonic() + seconds
    while True:
        current = stats(base)
        if predicate(current) or time.monotonic() > deadline:
            return current
        time.sleep(0.02)


def chat(base, messages=SAD, session=None, timeout=5, headers=None,
         **fields):
    return call("POST", base + "/v1/chat/completions", session, timeout,
                headers=headers,
                json={"model": "test-model", "messages": messages, **fields})


def reply_of(response):
    return response.json()["choices"][0]["message"]["content"]


def sse_events(pieces):
    """A tiny incremental SSE parser: the data of each event, pieces fed one
    by one as reads would deliver them, bytes decoded per complete event."""
    events, buffer = [], b""
    for piece in pieces:
        buffer += piece
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            lines = [line[5:].removeprefix(" ")
                     for line in block.decode().split("\n")
                     if line.startswith("data:")]
            if lines:           # a block of comments only is no event
                events.append("\n".join(lines))
    return events


def streamed_text(events):
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content", "")
                   for c in chunks if c["choices"])


def is_utf8(data):
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


def raw_chat(base, payload, close_after=None):
    """POST over a bare socket, so the HTTP chunks are visible as sent.

    Returns (head, chunks, ended): the chunk payloads in order, and whether
    the body had its terminating zero-length chunk.  close_after=N hangs up
    once N bytes arrived instead of reading to the end.
    """
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps(payload).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while close_after is None or len(data) < close_after:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    chunks = []
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return head, chunks, True
        chunks.append(rest[:size])
        rest = rest[size + 2:]              # the data and its CRLF
    return head, chunks, False


def stream_payload(**fields):
    return {"model": "m", "messages": SAD, "stream": True, **fields}


# --- the OpenAI face ---------------------------------------------------------

def test_models_and_routing(base):
    models = call("GET", base + "/v1/models").json()
    assert models == {"object": "list", "data": [{
        "id": "local-eliza", "object": "model", "created": 0,
        "owned_by": "chatfcgi"}]}
    missing = call("GET", base + "/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = call("DELETE", base + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
    assert wrong.json()["error"]["message"]


def test_completion_shape_and_reflecting_reply(base):
    r = chat(base)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) > 12
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "test-model"
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    reply = choice["message"]["content"]
    assert choice["message"]["role"] == "assistant"
    assert "sad about your job" in reply        # reflected: my -> your
    words = len(reply.split())
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": words,
                             "total_tokens": 6 + words}
    assert reply_of(chat(base)) == reply        # deterministic
    anonymous = call("POST", base + "/v1/chat/completions",
                     json={"messages": SAD}).json()
    assert anonymous["model"] == "local-eliza"


def test_reply_uses_the_conversation(base):
    first = {"role": "user", "content": "I need a long holiday"}
    answer = {"role": "assistant", "content": "Why do you need it?"}
    recall = chat(base, [first, answer,
                         {"role": "user", "content": "What did I say?"}])
    assert "I need a long holiday" in reply_of(recall)
    again = {"role": "user", "content": "i need a long holiday!"}
    repeat = chat(base, [first, answer, again])
    assert reply_of(repeat).startswith(("You already told me",
                                        "You said that before"))
    greeting = chat(base, [{"role": "user", "content": "Hello there"}])
    assert reply_of(greeting).startswith(("Hello", "Hi"))


def test_bad_requests_get_openai_errors(base):
    with new_session() as s:
        bad_json = s.post(base + "/v1/chat/completions", data="{nope",
                          timeout=5)
        no_messages = chat(base, messages=[], session=s)
        not_objects = chat(base, messages=["hi"], session=s)
        for r in (bad_json, no_messages, not_objects):
            assert r.status_code == 400
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["message"]
            assert error["param"] is None and error["code"] is None
        assert chat(base, session=s).status_code == 200     # still serving


def test_stream_joins_to_the_completion_and_reports_usage(base):
    expected = reply_of(chat(base))
    r = chat(base, stream=True, stream_options={"include_usage": True})
    assert r.headers["Content-Type"] == "text/event-stream"
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert r.headers["Cache-Control"] == "no-cache"
    events = sse_events([r.content])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len(chunks) == len(expected.split()) + 2
    assert streamed_text(events) == expected
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {},
                                      "finish_reason": "stop"}]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(expected.split())
    plain = sse_events([chat(base, stream=True).content])
    assert not any("usage" in json.loads(e) for e in plain[:-1])


def test_keep_alive_reuses_one_connection(base):
    with new_session() as s:
        for i in range(5):
            assert chat(base, session=s, stream=i % 2 == 1).status_code == 200
        seen = s.get(base + "/control/stats", timeout=5).json()
    assert seen["connections"] == 1 and seen["requests"] == 5


# --- control modes -----------------------------------------------------------

def test_fail_with_status_and_body(base):
    control(base, mode="fail", status=429, body='{"error": "slow down"}')
    r = chat(base, stream=True)
    assert r.status_code == 429 and r.text == '{"error": "slow down"}'
    control(base, mode="fail")
    r = chat(base)
    assert r.status_code == 500
    assert r.json()["error"]["message"] == "local model told to fail"


def test_hang_notices_the_client_leaving(base):
    control(base, mode="hang")
    started = time.time()
    with pytest.raises(requests.exceptions.ReadTimeout):
        chat(base, timeout=0.3)
    seen = wait_for(base, lambda s: s["disconnects"] == 1)
    assert seen["disconnects"] == 1
    assert started < seen["last_disconnect_at"] < started + 1.3
    # The hanging thread ended: only the stats request's connection is open.
    assert wait_for(base, lambda s: s["open_connections"] == 1)[
        "open_connections"] == 1


def test_garbage(base):
    control(base, mode="garbage")
    r = chat(base)
    assert r.status_code == 200 and r.json() == {"unexpected": True}
    r = chat(base, stream=True)
    assert r.status_code == 200 and r.headers["Connection"] == "close"
    events = sse_events([r.content])
    assert events and set(events) == {"this is not json"}
    control(base, mode="garbage", body="<html>oops</html>")
    assert chat(base).text == "<html>oops</html>"


def test_drop_without_stream_sends_nothing(base):
    control(base, mode="drop")
    with pytest.raises(requests.exceptions.ConnectionError):
        chat(base)
    assert stats(base)["requests"] == 1         # no silent retry hid it


def test_drop_mid_stream(base):
    first_words = reply_of(chat(base)).split()[:2]
    control(base, mode="drop", drop_after=2)
    head, chunks, ended = raw_chat(base, stream_payload())
    assert head.startswith(b"HTTP/1.1 200") and not ended
    events = sse_events(chunks)
    assert len(events) == 2 and "[DONE]" not in events
    assert streamed_text(events) == " ".join(first_words) + " "


def test_delay_and_times(base):
    control(base, delay_ms=300, times=1)
    started = time.monotonic()
    assert chat(base).status_code == 200
    assert 0.3 <= time.monotonic() - started < 1.5
    started = time.monotonic()
    assert chat(base).status_code == 200
    assert time.monotonic() - started < 0.2     # back to normal


def test_times_reverts_to_normal(base):
    control(base, mode="fail", status=503, times=2)
    assert [chat(base).status_code for _ in range(3)] == [503, 503, 200]


def test_split_bytes_cuts_lines_and_characters(base):
    # 29 is not a multiple of 3, and the 90-byte word holds several piece
    # boundaries, so at least one of them cuts a 3-byte character in two.
    reply = "Grüße " + "☕" * 30 + " alles gut"
    control(base, split_bytes=29, reply=reply)
    head, chunks, ended = raw_chat(base, stream_payload())
    assert ended and len(chunks) > 10
    assert {len(c) for c in chunks[:-1]} == {29} and 0 < len(chunks[-1]) <= 29
    assert any(not is_utf8(c) for c in chunks)
    assert streamed_text(sse_events(chunks)) == reply


def test_coalesce_sends_one_chunk(base):
    control(base, coalesce=True)
    head, chunks, ended = raw_chat(base, stream_payload())
    assert ended and len(chunks) == 1 and chunks[0].count(b"data: ") > 3
    assert streamed_text(sse_events(chunks)) == reply_of(chat(base))


def test_sse_comments_are_interleaved(base):
    control(base, sse_comments=True, chunk_delay_ms=5)
    head, chunks, ended = raw_chat(base, stream_payload())
    assert ended and chunks[0] == b": keep-alive\n\n"
    assert chunks.count(b": keep-alive\n\n") == len(chunks) // 2
    assert streamed_text(sse_events(chunks)) == reply_of(chat(base))


def test_client_leaving_mid_stream_is_counted(base):
    control(base, chunk_delay_ms=200, reply="one two three four five six")
    raw_chat(base, stream_payload(), close_after=1)   # the headers, then bye
    seen = wait_for(base, lambda s: s["disconnects"] == 1)
    assert seen["disconnects"] == 1 and seen["requests"] == 1


def test_control_rejects_bad_fields(base):
    for bad in ({"mode": "explode"}, {"delay_ms": -1}, {"delay_ms": "5"},
                {"coalesce": 1}, {"status": 99}, {"times": True},
                {"nonsense": 1}, [1]):
        r = call("POST", base + "/control", json=bad)
        assert r.status_code == 400, bad
        assert r.json()["error"]["message"]
    assert chat(base).status_code == 200        # nothing was applied


def test_recent_requests_and_reset(base):
    chat(base, headers={"Authorization": "Bearer k1", "X-Request-Id": "r-1"})
    recent = stats(base)["recent"]
    assert len(recent) == 1 and abs(recent[0]["at"] - time.time()) < 5
    assert recent[0]["headers"] == {"authorization": "Bearer k1",
                                    "x-request-id": "r-1",
                                    "content-type": "application/json"}
    assert recent[0]["body"] == {"model": "test-model", "messages": SAD}
    with new_session() as s:
        for i in range(25):
            chat(base, [{"role": "user", "content": f"n{i}"}], session=s)
    seen = stats(base)
    assert seen["requests"] == 26
    assert [r["body"]["messages"][0]["content"] for r in seen["recent"]] == \
        [f"n{i}" for i in range(5, 25)]             # the last 20, oldest first
    control(base, mode="fail")
    call("POST", base + "/control/reset").raise_for_status()
    cleared = stats(base)
    assert (cleared["requests"], cleared["recent"], cleared["disconnects"],
            cleared["last_disconnect_at"]) == (0, [], 0, None)
    assert chat(base).status_code == 200


def test_sigterm_exits_cleanly_even_while_hanging():
    proc, url = start_server()
    try:
        control(url, mode="hang")
        host, port = url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        body = b'{"messages":[{"role":"user","content":"hi"}]}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(url, lambda s: s["requests"] == 1)
        started = time.monotonic()
        assert stop_server(proc) == 0
        assert time.monotonic() - started < 2
        sock.close()
    finally:
        if proc.poll() is None:
            stop_server(proc)
