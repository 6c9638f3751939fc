"""The chat turn through nginx, as shared/API.md describes it: new sessions,
the answer's shape, request ids, what reaches the upstream model (history,
system prompt, model, key), the stored history (order, trimming by messages
and by bytes, TTL), DELETE, unicode, and the lenient parts of the request
(null means absent, unknown fields are ignored).

Redis is read directly with a few lines of RESP over a socket, so that the
tests see the stored key and its TTL, not only what the API shows.
"""

import json
import re

import pytest

from helpers import LocalModel, assert_json_error, post_chat
from redis_cluster import redis_command

# The module's stack keeps every default (history_max_messages 20,
# history_max_bytes 64 KiB, TTL 86400 s, no system prompt, no API key).
DEFAULT_TTL = 86400

# A second stack with small limits and the upstream settings under test.
SYSTEM_PROMPT = "You are a terse test bot. Ünïcödé too: 你好"
API_KEY = "sk-test-0123456789"
CONFIGURED_MODEL = "test-model-7b"
SMALL_TTL = 1000
CONFIGURED_ENV = {
    "CHATFCGI_UPSTREAM_SYSTEM_PROMPT": SYSTEM_PROMPT,
    "CHATFCGI_API_KEY": API_KEY,
    "CHATFCGI_MODEL": CONFIGURED_MODEL,
    "CHATFCGI_CHAT_HISTORY_MAX_MESSAGES": "4",
    "CHATFCGI_CHAT_HISTORY_MAX_BYTES": "200",
    "CHATFCGI_CHAT_HISTORY_TTL_SECONDS": str(SMALL_TTL),
}

HEX32 = re.compile(r"[0-9a-f]{32}")


# ---------------------------------------------------------------- helpers

def history_key(session_id):
    return f"chat:{{{session_id}}}:history"


def stored(st, session_id):
    """The Redis list of a session, decoded."""
    items = redis_command(st.redis_port, "LRANGE", history_key(session_id),
                          0, -1)
    return [json.loads(i) for i in items]


def chat(http, st, message=None, session_id=None, expect=200, **fields):
    r = post_chat(http, st, message, session_id, **fields)
    assert r.status_code == expect, r.text
    return r


def get_history(http, st, session_id, expect=200):
    r = http.get(f"{st.url}/api/chat/{session_id}", timeout=5)
    assert r.status_code == expect, r.text
    return r


def pairs(*turns):
    """[(user, assistant), ...] -> the stored message list."""
    out = []
    for user, assistant in turns:
        out += [{"role": "user", "content": user},
                {"role": "assistant", "content": assistant}]
    return out


@pytest.fixture(scope="module")
def configured(stack_factory):
    return stack_factory(CONFIGURED_ENV)


@pytest.fixture
def cmodel(configured, http):
    m = LocalModel.of(configured, http)
    m.reset()
    yield m
    m.reset()


# ----------------------------------------------------------- new sessions

def test_new_session_gets_a_random_128_bit_hex_id(stack, http, model):
    a = chat(http, stack, "hello").json()
    b = chat(http, stack, "hello").json()
    assert HEX32.fullmatch(a["session_id"]), a
    assert HEX32.fullmatch(b["session_id"]), b
    assert a["session_id"] != b["session_id"]


def test_answer_shape(stack, http, model):
    r = chat(http, stack, "I feel happy today")
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"session_id", "reply", "model", "usage"}, body
    assert body["model"] == "local-eliza"
    assert isinstance(body["reply"], str) and body["reply"]
    # The local model's reply is deterministic: ELIZA reflects the fragment.
    assert "happy today" in body["reply"], body
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens"}, usage
    for v in usage.values():
        assert type(v) is int and v >= 0, usage
    # The counts are the upstream's own (localmodel counts words).
    assert usage["completion_tokens"] == len(body["reply"].split())
    assert usage["prompt_tokens"] == len("I feel happy today".split())


def test_reply_is_the_upstreams_and_usage_null_when_it_gives_none(
        stack, http, model):
    """An upstream answer without "model" and "usage": the configured model
    is reported and usage is null."""
    model.set(mode="garbage", body=json.dumps({"choices": [{"message": {
        "role": "assistant", "content": "fixed reply"}}]}))
    body = chat(http, stack, "hi").json()
    assert body["reply"] == "fixed reply"
    assert body["model"] == "local-eliza"
    assert body["usage"] is None


def test_model_in_the_answer_is_the_one_the_upstream_reports(
        stack, http, model):
    model.set(mode="garbage", body=json.dumps({
        "model": "reported-model-v2",
        "choices": [{"message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1}}))
    body = chat(http, stack, "hi").json()
    assert body["model"] == "reported-model-v2"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1}


# ------------------------------------------------------------ request ids

def test_x_request_id_on_every_response(stack, http, model):
    sid = chat(http, stack, "hello").json()["session_id"]
    responses = [
        chat(http, stack, "hello again", sid),
        get_history(http, stack, sid),
        http.delete(f"{stack.url}/api/chat/{sid}", timeout=5),
        http.get(f"{stack.url}/api/chat/{sid}", timeout=5),       # 404
        http.post(f"{stack.url}/api/chat", data=b"{", timeout=5,
                  headers={"Content-Type": "application/json"}),  # 400
        http.get(f"{stack.url}/api/chat", timeout=5),             # 405
        http.get(f"{stack.url}/api/healthz", timeout=5),
        http.get(f"{stack.url}/api/nope", timeout=5),             # app 404
        http.get(f"{stack.url}/nope", timeout=5),                 # nginx's
    ]
    ids = [r.headers.get("X-Request-Id") for r in responses]
    assert all(ids), [(r.status_code, r.headers) for r in responses]
    assert len(set(ids)) == len(ids), ids


def test_x_request_id_is_sent_to_the_upstream(stack, http, model):
    r = chat(http, stack, "I need a holiday")
    recent = model.stats()["recent"][-1]
    assert recent["headers"]["x-request-id"] == r.headers["X-Request-Id"]


# ------------------------------------------------- what the upstream gets

def test_upstream_gets_history_then_the_new_message(stack, http, model):
    first = chat(http, stack, "I feel sad about my job").json()
    sid = first["session_id"]
    second = chat(http, stack, "my boss shouts at me", sid).json()

    requests_seen = model.stats()["recent"]
    assert len(requests_seen) == 2
    assert requests_seen[0]["body"]["messages"] == [
        {"role": "user", "content": "I feel sad about my job"}]
    body = requests_seen[1]["body"]
    assert body["messages"] == [
        {"role": "user", "content": "I feel sad about my job"},
        {"role": "assistant", "content": first["reply"]},
        {"role": "user", "content": "my boss shouts at me"},
    ]
    assert body["model"] == "local-eliza"
    assert body.get("stream") in (None, False)
    assert second["reply"]


def test_no_system_message_and_no_authorization_by_default(
        stack, http, model):
    chat(http, stack, "hello")
    recent = model.stats()["recent"][-1]
    assert [m["role"] for m in recent["body"]["messages"]] == ["user"]
    assert "authorization" not in recent["headers"]
    assert recent["headers"]["content-type"] == "application/json"


def test_configured_system_prompt_model_and_key(configured, http, cmodel):
    first = chat(http, configured, "I am tired").json()
    sid = first["session_id"]
    chat(http, configured, "I need sleep", sid)
    seen = cmodel.stats()["recent"]
    for req in seen:
        assert req["headers"]["authorization"] == f"Bearer {API_KEY}"
        assert req["body"]["model"] == CONFIGURED_MODEL
        assert req["body"]["messages"][0] == {"role": "system",
                                              "content": SYSTEM_PROMPT}
    assert seen[-1]["body"]["messages"][1:] == [
        {"role": "user", "content": "I am tired"},
        {"role": "assistant", "content": first["reply"]},
        {"role": "user", "content": "I need sleep"},
    ]
    # The local model echoes the model asked for: the answer reports it.
    assert first["model"] == CONFIGURED_MODEL
    # The system prompt is sent, never stored.
    roles = [m["role"] for m in
             get_history(http, configured, sid).json()["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]


# ------------------------------------------------------------- the history

def test_two_turns_then_get_shows_four_messages_in_order(stack, http, model):
    a = chat(http, stack, "I feel happy").json()
    sid = a["session_id"]
    b = chat(http, stack, "because the sun shines", sid).json()
    assert b["session_id"] == sid
    r = get_history(http, stack, sid)
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json() == {"session_id": sid, "messages": pairs(
        ("I feel happy", a["reply"]),
        ("because the sun shines", b["reply"]))}
    assert stored(stack, sid) == r.json()["messages"]


def test_client_chosen_session_id_of_128_chars(stack, http, model):
    sid = ("Ab9_-" * 26)[:128]
    body = chat(http, stack, "hello", sid).json()
    assert body["session_id"] == sid
    assert get_history(http, stack, sid).json()["messages"] == pairs(
        ("hello", body["reply"]))


def test_unknown_session_is_404(stack, http):
    r = get_history(http, stack, "never-used-session-id", expect=404)
    assert_json_error(r, 404, "not_found")


def test_trimmed_to_history_max_messages(configured, http, cmodel):
    """history_max_messages = 4: after three turns the last two pairs."""
    sid = None
    turns = []
    for i in range(1, 4):
        cmodel.set(reply=f"reply {i}")
        r = chat(http, configured, f"message {i}", sid).json()
        sid = r["session_id"]
        turns.append((f"message {i}", f"reply {i}"))
    expected = pairs(*turns[-2:])
    assert get_history(http, configured, sid).json()["messages"] == expected
    assert stored(configured, sid) == expected
    # The third turn's upstream call saw the history as trimmed after the
    # second turn: both earlier pairs (4 messages), then the new message.
    third = cmodel.stats()["recent"][-1]["body"]["messages"]
    assert third[1:] == pairs(*turns[:2]) + [
        {"role": "user", "content": "message 3"}]


@pytest.mark.parametrize("first,second", [
    # 100 B, then 101 B: 201 bytes > 200 (but only 171 characters), so
    # the first pair goes.
    (("é" * 30, "x" * 40), ("b" * 60, "y" * 41)),
    # 300 B alone, over the cap: the newest pair is kept even so.
    (("a" * 60, "x" * 40), ("c" * 150, "z" * 150)),
], ids=["whole-pairs", "newest-pair-even-over-max-bytes"])
def test_trimmed_by_history_max_bytes_whole_pairs(configured, http, cmodel,
                                                   first, second):
    """history_max_bytes = 200 bytes of content (UTF-8 bytes, not
    characters): a history over it loses its oldest pairs, but never the
    newest."""
    (message1, reply1), (message2, reply2) = first, second
    cmodel.set(reply=reply1)
    sid = chat(http, configured, message1).json()["session_id"]
    cmodel.set(reply=reply2)
    chat(http, configured, message2, sid)
    expected = pairs(second)
    assert get_history(http, configured, sid).json()["messages"] == expected
    assert stored(configured, sid) == expected


def test_history_exactly_at_max_bytes_is_kept(configured, http, cmodel):
    cmodel.set(reply="x" * 40)
    sid = chat(http, configured, "a" * 60).json()["session_id"]  # 100 B
    chat(http, configured, "b" * 60, sid)                        # 100 B
    assert get_history(http, configured, sid).json()["messages"] == pairs(
        ("a" * 60, "x" * 40), ("b" * 60, "x" * 40))


def test_ttl_is_set_and_refreshed_on_every_turn(stack, http, model):
    sid = chat(http, stack, "hello").json()["session_id"]
    key = history_key(sid)
    ttl = redis_command(stack.redis_port, "TTL", key)
    assert DEFAULT_TTL - 10 <= ttl <= DEFAULT_TTL, ttl
    # Shorten it behind the application's back; the next turn refreshes it.
    redis_command(stack.redis_port, "EXPIRE", key, 100)
    assert redis_command(stack.redis_port, "TTL", key) <= 100
    chat(http, stack, "hello again", sid)
    ttl = redis_command(stack.redis_port, "TTL", key)
    assert DEFAULT_TTL - 10 <= ttl <= DEFAULT_TTL, ttl


def test_ttl_follows_history_ttl_seconds(configured, http, cmodel):
    sid = chat(http, configured, "hello").json()["session_id"]
    ttl = redis_command(configured.redis_port, "TTL", history_key(sid))
    assert SMALL_TTL - 10 <= ttl <= SMALL_TTL, ttl


# ------------------------------------------------------------------ DELETE

def test_delete_then_get_is_404(stack, http, model):
    sid = chat(http, stack, "hello").json()["session_id"]
    r = http.delete(f"{stack.url}/api/chat/{sid}", timeout=5)
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert "Content-Length" not in r.headers or \
        r.headers["Content-Length"] == "0", r.headers
    assert redis_command(stack.redis_port, "EXISTS", history_key(sid)) == 0
    assert_json_error(get_history(http, stack, sid, expect=404), 404,
                      "not_found")


def test_delete_is_idempotent(stack, http):
    for _ in range(2):
        r = http.delete(f"{stack.url}/api/chat/no-such-session-42",
                        timeout=5)
        assert r.status_code == 204, r.text
        assert r.content == b""


def test_a_deleted_session_id_starts_afresh(stack, http, model):
    sid = chat(http, stack, "I feel happy").json()["session_id"]
    http.delete(f"{stack.url}/api/chat/{sid}", timeout=5)
    body = chat(http, stack, "I feel calm", sid).json()
    assert get_history(http, stack, sid).json()["messages"] == pairs(
        ("I feel calm", body["reply"]))
    assert model.stats()["recent"][-1]["body"]["messages"] == [
        {"role": "user", "content": "I feel calm"}]


# ----------------------------------------------------------------- unicode

@pytest.mark.parametrize("message", [
    "I feel 😀 héllo",
    "中文 日本語テキスト 한국어",
    "mixed: \"quotes\" \\ back\\slash / tab\t newline\n ctrl\x01\x1f end",
    "𝄞 music and \u2028 line separator, \u00a0 nbsp",
], ids=["emoji", "cjk", "escapes", "astral"])
def test_unicode_round_trips_exactly(stack, http, model, message):
    body = chat(http, stack, message).json()
    sid = body["session_id"]
    assert model.stats()["recent"][-1]["body"]["messages"][-1] == {
        "role": "user", "content": message}
    assert get_history(http, stack, sid).json()["messages"] == pairs(
        (message, body["reply"]))


def test_unicode_reply_round_trips(stack, http, model):
    reply = "答え: ✓ 😀 — «ok»"
    model.set(reply=reply)
    body = chat(http, stack, "hello").json()
    assert body["reply"] == reply
    assert get_history(http, stack, body["session_id"]).json()[
        "messages"][1]["content"] == reply


def test_escaped_surrogate_pair_is_stored_as_the_character(
        stack, http, model):
    raw = b'{"message":"smile \\ud83d\\ude00 \\u00e9"}'
    r = http.post(f"{stack.url}/api/chat", data=raw, timeout=10,
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    msgs = get_history(http, stack, r.json()["session_id"]).json()[
        "messages"]
    assert msgs[0]["content"] == "smile 😀 é"


# ------------------------------------------------------ lenient requests

def test_null_session_id_and_stream_mean_absent(stack, http, model):
    r = http.post(f"{stack.url}/api/chat", timeout=10, json={
        "message": "hello", "session_id": None, "stream": None})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert HEX32.fullmatch(body["session_id"]), body
    assert body["reply"]
    assert model.stats()["recent"][-1]["body"].get("stream") in (None,
                                                                  False)


def test_stream_false_is_a_plain_answer(stack, http, model):
    r = chat(http, stack, "hello", stream=False)
    assert r.headers["Content-Type"].startswith("application/json")
    assert set(r.json()) == {"session_id", "reply", "model", "usage"}


def test_unknown_fields_are_ignored(stack, http, model):
    sid = chat(http, stack, "hello").json()["session_id"]
    r = http.post(f"{stack.url}/api/chat", timeout=10, json={
        "session_id": sid, "message": "I feel fine",
        "temperature": 2, "model": "other", "messages": [{"role": "x"}],
        "extra": {"nested": [1, {"deep": None}], "message": 42}})
    assert r.status_code == 200, r.text
    assert r.json()["session_id"] == sid
    seen = model.stats()["recent"][-1]["body"]
    assert seen["model"] == "local-eliza"
    assert seen["messages"][-1] == {"role": "user", "content": "I feel fine"}
    assert len(get_history(http, stack, sid).json()["messages"]) == 4


def test_heavily_escaped_history_is_kept_whole_and_trimmed(stack_factory,
                                                            http):
    """Replies of control characters: 1 byte of content each, but 6 in the
    stored JSON (\\u001b). 10 pairs are ~25 KB of content, well under
    history_max_bytes, so the last 20 messages must all be kept, shown by
    GET and sent upstream, and the Redis list must stay at 20. (A smaller
    max_response_bytes shrinks the room for loading a history; the
    default leaves so much room that this needs megabytes.)"""
    st = stack_factory({"CHATFCGI_UPSTREAM_MAX_RESPONSE_BYTES": "16384"})
    ctl = LocalModel.of(st, http)
    reply = "\x1b" * 2500
    ctl.set(reply=reply)
    sid = "escaped-replies"
    for i in range(12):
        chat(http, st, f"turn {i}", sid)
    expected = pairs(*[(f"turn {i}", reply) for i in range(2, 12)])
    assert len(stored(st, sid)) == 20  # history_max_messages
    assert stored(st, sid) == expected
    assert get_history(http, st, sid).json()["messages"] == expected
    last = ctl.stats()["recent"][-1]["body"]["messages"]
    assert last == pairs(*[(f"turn {i}", reply) for i in range(1, 11)]) + [
        {"role": "user", "content": "turn 11"}]
