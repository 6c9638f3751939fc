"""Helpers shared by the integration tests: one definition of each, so that
the test files cannot drift apart. Fixtures stay in conftest.py; this is a
plain module (pytest puts tests/integration on sys.path, as it does for
polling.py and fcgi_client.py), imported as

    from helpers import assert_json_error
"""

import requests


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
