"""Who may change a session, and when, through nginx: a DELETE during a
turn wins (the turn stores nothing and gets 409), and a turn that no
longer holds its lock stores nothing.

Redis is read and changed directly (redis_cluster.redis_command) to play a
lock that expired while the model answered.
"""

import threading
import time

from helpers import assert_json_error, post_chat
from polling import wait_for
from redis_cluster import redis_command

# Turns run side by side; no retries, so that a model failure is final.
STACK_ENV = {"CHATFCGI_WORKERS": "4", "CHATFCGI_UPSTREAM_RETRIES": "0"}

SLOW_MS = 1500


# ---------------------------------------------------------------- helpers

def lock_key(session_id):
    return f"chat:{{{session_id}}}:lock"


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
