"""Who may change a session, and when, through nginx: a DELETE during a
turn wins (the turn stores nothing and gets 409), a turn that no longer
holds its lock stores nothing, and with client keys a session belongs to
the key that made it (others get 404, as for a session that does not
exist), while GET and DELETE count in the rate limit like turns.

Redis is read and changed directly (redis_cluster.redis_command) to see
the owner's key and to play a lock that expired while the model answered.
"""

import hashlib
import json
import threading
import time

import pytest

from fcgi_client import chat_params, fcgi_request
from helpers import assert_json_error, post_chat
from polling import wait_for
from redis_cluster import redis_command

# Turns run side by side; no retries, so that a model failure is final.
STACK_ENV = {"CHATFCGI_WORKERS": "4", "CHATFCGI_UPSTREAM_RETRIES": "0"}

SLOW_MS = 1500

# The keyed stack: one client key per test, so that each test has a rate
# limit of its own.
KEYS = {name: f"sk-{name}-session-test" for name in (
    "alice", "bob", "carol", "dave", "erin", "frank")}
RPM = 6


# ---------------------------------------------------------------- helpers

def lock_key(session_id):
    return f"chat:{{{session_id}}}:lock"


def owner_key(session_id):
    return f"chat:{{{session_id}}}:owner"


def digest(key):
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(name):
    return {"Authorization": f"Bearer {KEYS[name]}"}


def identity(name):
    """How chatfcgi names a key's holder (guard.c): its digest's start."""
    return f"key:{digest(KEYS[name])[:16]}"


def delete(http, st, session_id, **kw):
    return http.delete(f"{st.url}/api/chat/{session_id}", timeout=5, **kw)


def fresh_rate_window():
    """Wait for the next minute when this one is about to end: the rate
    counters are per wall-clock minute, and a test must not see its count
    start again halfway."""
    left = 60 - time.time() % 60
    if left < 5:
        time.sleep(left + 0.1)


@pytest.fixture(scope="module")
def keyed(stack_factory):
    return stack_factory({
        "CHATFCGI_CLIENT_KEYS": ", ".join(digest(k) for k in KEYS.values()),
        "CHATFCGI_RATE_LIMIT_RPM": str(RPM)})


def turn(http, st, message, session_id, **kw):
    return post_chat(http, st, message, session_id, timeout=15, **kw)


def history(http, st, session_id, **kw):
    return http.get(f"{st.url}/api/chat/{session_id}", timeout=5, **kw)


def user_messages(http, st, session_id):
    r = history(http, st, session_id)
    assert r.status_code == 200, r.text
    return [m["content"] for m in r.json()["messages"]
            if m["role"] == "user"]


class Background:
    """A turn running in a thread while the test does something else."""

    def __init__(self, http, st, message, session_id, **kw):
        self.response = None
        self.thread = threading.Thread(target=self._run, args=(
            http, st, message, session_id), kwargs=kw)
        self.thread.start()

    def _run(self, http, st, message, session_id, **kw):
        self.response = turn(http, st, message, session_id, **kw)

    def result(self):
        self.thread.join(15)
        assert self.response is not None, "the turn did not end"
        return self.response


def wait_locked(st, session_id):
    """Wait until a turn of the session holds its lock (it is then with
    the model)."""
    assert wait_for(lambda: redis_command(st.redis_port, "EXISTS",
                                          lock_key(session_id)), 5), \
        "no turn took the lock"


# ------------------------------------------------ a DELETE during a turn

def test_delete_during_a_turn_wins(stack, http, model):
    """DELETE answers 204 at once and the session stays deleted: the turn
    in flight stores nothing (409), rather than bringing back a history
    the user has just deleted."""
    sid = "delete-during-a-turn"
    assert turn(http, stack, "first", sid).status_code == 200
    model.set(delay_ms=SLOW_MS)
    running = Background(http, stack, "second", sid)
    wait_locked(stack, sid)
    r = http.delete(f"{stack.url}/api/chat/{sid}", timeout=5)
    assert r.status_code == 204, r.text
    assert_json_error(running.result(), 409, "conflict")
    assert_json_error(history(http, stack, sid), 404, "not_found")
    # The id starts afresh.
    model.set(delay_ms=0)
    assert turn(http, stack, "third", sid).status_code == 200
    assert user_messages(http, stack, sid) == ["third"]


# ------------------------------------------------------- a lost lock

def test_turn_that_lost_its_lock_stores_nothing(stack, http, model):
    """The lock expired while the model answered (played by deleting it)
    and another turn took it: the first turn stores nothing (409), the
    second is stored alone, its history not trimmed by a stale index."""
    sid = "lock-lost"
    model.set(delay_ms=SLOW_MS, times=1)
    first = Background(http, stack, "first", sid)
    wait_locked(stack, sid)
    redis_command(stack.redis_port, "DEL", lock_key(sid))
    second = turn(http, stack, "second", sid)
    assert second.status_code == 200, second.text
    r = first.result()
    assert_json_error(r, 409, "conflict")
    assert user_messages(http, stack, sid) == ["second"]
    # The second turn's lock was not touched by the first's failure.
    assert turn(http, stack, "third", sid).status_code == 200


# ------------------------------------------------ sessions and their keys

def test_another_key_gets_404_on_a_session(keyed, http):
    """Bob knows Alice's session id: reading, continuing and deleting it
    all answer what an unknown session answers, and change nothing."""
    sid = "owned-by-alice"
    mine = turn(http, keyed, "I feel fine", sid, headers=bearer("alice"))
    assert mine.status_code == 200, mine.text
    unknown = history(http, keyed, "never-made", headers=bearer("bob"))
    assert_json_error(unknown, 404, "not_found")
    for r in (history(http, keyed, sid, headers=bearer("bob")),
              turn(http, keyed, "let me in", sid, headers=bearer("bob")),
              delete(http, keyed, sid, headers=bearer("bob"))):
        assert_json_error(r, 404, "not_found")
        assert r.json() == unknown.json()
    r = history(http, keyed, sid, headers=bearer("alice"))
    assert r.status_code == 200, r.text
    assert [m["content"] for m in r.json()["messages"]] == [
        "I feel fine", mine.json()["reply"]]


def test_owner_is_kept_as_long_as_the_history(keyed, http):
    sid = "owned-by-carol"
    r = turn(http, keyed, "hello", sid, headers=bearer("carol"))
    assert r.status_code == 200, r.text
    port = keyed.redis_port
    assert redis_command(port, "GET", owner_key(sid)) == \
        identity("carol").encode()
    owner_ttl = redis_command(port, "TTL", owner_key(sid))
    history_ttl = redis_command(port, "TTL", f"chat:{{{sid}}}:history")
    assert 0 < history_ttl - 5 <= owner_ttl <= history_ttl, \
        (owner_ttl, history_ttl)


def test_owner_deletes_and_the_id_is_free_again(keyed, http):
    sid = "owned-by-erin"
    assert turn(http, keyed, "hello", sid,
                headers=bearer("erin")).status_code == 200
    assert delete(http, keyed, sid, headers=bearer("erin")).status_code \
        == 204
    assert redis_command(keyed.redis_port, "EXISTS", owner_key(sid)) == 0
    r = turn(http, keyed, "mine now", sid, headers=bearer("frank"))
    assert r.status_code == 200, r.text


def test_get_and_delete_count_in_the_rate_limit(keyed, http):
    """rpm counts every request of a client, not only its turns: reading
    and deleting sessions cannot be used to probe ids without limit."""
    fresh_rate_window()
    sid = "owned-by-dave"
    assert turn(http, keyed, "hello", sid,
                headers=bearer("dave")).status_code == 200
    for _ in range(RPM - 2):
        r = history(http, keyed, "probe-" + sid, headers=bearer("dave"))
        assert_json_error(r, 404, "not_found")
    assert delete(http, keyed, "probe-" + sid,
                  headers=bearer("dave")).status_code == 204
    for r in (history(http, keyed, sid, headers=bearer("dave")),
              delete(http, keyed, sid, headers=bearer("dave"))):
        assert_json_error(r, 429, "rate_limited")
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    # The limit is the client's own: another key still reads.
    assert history(http, keyed, "never-made",
                   headers=bearer("bob")).status_code == 404


def test_without_client_keys_a_session_is_anyones_who_knows_its_id(
        stack, http, model):
    """An address is not an owner (one is shared behind a NAT, and a
    client may change it): without client keys nothing is stored as the
    owner, and the session id is what protects a session."""
    sid = "no-keys-session"
    assert turn(http, stack, "hello", sid).status_code == 200
    assert redis_command(stack.redis_port, "EXISTS", owner_key(sid)) == 0
    r = fcgi_request(stack.socket_path, chat_params(
        method="GET", uri=f"/api/chat/{sid}", content_type=None,
        REMOTE_ADDR="192.0.2.77"), body=b"")
    assert r.status == 200, r
    assert json.loads(r.body)["session_id"] == sid
