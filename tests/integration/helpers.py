"""Helpers shared by the integration tests: one definition of each, so that
the test files cannot drift apart. Fixtures stay in conftest.py; this is a
plain module (pytest puts tests/integration on sys.path, as it does for
polling.py and fcgi_client.py), imported as

    from helpers import assert_json_error, LocalModel, new_session, post_chat
"""

import requests


def new_session():
    """A requests.Session that ignores the proxy settings of the
    environment (everything the tests reach is on loopback)."""
    s = requests.Session()
    s.trust_env = False
    return s


def post_chat(http, st, message=None, session_id=None, *, timeout=10,
              headers=None, **fields):
    """POST /api/chat on stack st (any object with .url) and return the
    response. The body has the message and the session_id unless they are
    None, and any other fields (stream=True, ...)."""
    body = {}
    if message is not None:
        body["message"] = message
    if session_id is not None:
        body["session_id"] = session_id
    body.update(fields)
    return http.post(f"{st.url}/api/chat", json=body, headers=headers,
                     timeout=timeout)


class LocalModel:
    """The local model's control API (app/localmodel.py) at base_url, for
    any stack's model (st.model_url) or one a test started itself."""

    def __init__(self, base_url, session):
        self.base_url = base_url
        self.session = session

    @classmethod
    def of(cls, st, session):
        """The local model of stack st (one started without an external
        upstream)."""
        assert st.model_url, "this stack has no local model"
        return cls(st.model_url, session)

    def _call(self, method, path, **kw):
        r = self.session.request(method, f"{self.base_url}{path}",
                                 timeout=5, **kw)
        r.raise_for_status()
        if r.headers.get("Content-Type", "").startswith("application/json"):
            return r.json()
        return r.text

    def set(self, **fields):
        """POST /control with these fields (mode, status, delay_ms, ...)."""
        return self._call("POST", "/control", json=fields)

    def reset(self):
        """POST /control/reset: back to normal answers, counters zeroed."""
        return self._call("POST", "/control/reset")

    def stats(self):
        """GET /control/stats."""
        return self._call("GET", "/control/stats")


def _shown(r):
    """What a failed assertion shows of a response."""
    if isinstance(r, requests.Response):
        return (r.status_code, dict(r.headers), r.text)
    return r  # FcgiResponse, sse_client.StreamResult: their repr says all


def assert_json_error(r, status, code, *, request_id=True):
    """r is the API's JSON error: the status, Content-Type application/json,
    a body of nothing but {"error": {"code": code, "message": "<non-empty
    text>"}}, and an X-Request-Id header. Returns the parsed body.

    r: a requests.Response, an fcgi_client.FcgiResponse or an
    sse_client.StreamResult (the last two have .status and lower-cased
    header names; requests' headers ignore case).

    request_id=False: no X-Request-Id is required (chatfcgi sets one, as
    do the nginx recipe's error pages; Apache's own error pages do not).
    """
    got = r.status_code if isinstance(r, requests.Response) else r.status
    assert got == status, _shown(r)
    assert r.headers.get("content-type", "").startswith(
        "application/json"), _shown(r)
    if request_id:
        assert r.headers.get("x-request-id"), _shown(r)
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), \
        body
    assert set(body) == {"error"}, body
    assert body["error"].get("code") == code, body
    message = body["error"].get("message")
    assert isinstance(message, str) and message.strip(), body
    return body
