"""Several model providers: fallback on errors, cooldown shared by the
pool, hedging a provider that hangs, streams that fall over before their
first delta (and never after), and everything down. Two local models of
the test's own are the providers, so each can be told to misbehave."""

import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import LocalModel, new_session, post_chat
from sse_client import stream_chat

REPO = Path(__file__).resolve().parents[2]


class Model(LocalModel):
    """A local model on a free port, started and stopped by the test."""

    def __init__(self):
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", str(REPO / "app" / "localmodel.py"),
             "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        self.url = re.search(r"(http://\S+)/v1", line).group(1)
        super().__init__(self.url, new_session())

    def requests(self):
        return self.stats()["requests"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def models():
    pair = [Model(), Model()]
    yield pair
    for m in pair:
        m.stop()


@pytest.fixture(autouse=True)
def fresh(models):
    for m in models:
        m.reset()


def make_stack(stack_factory, models, **env):
    base = {"CHATFCGI_UPSTREAM_URL": ", ".join(f"{m.url}/v1" for m in models),
            "CHATFCGI_UPSTREAM_TIMEOUT_MS": "3000",
            "CHATFCGI_WORKERS": "4"}
    base.update({f"CHATFCGI_UPSTREAM_{k.upper()}": str(v)
                 for k, v in env.items()})
    return stack_factory(base)


def turn(http, st, message="hello", session_id=None, timeout=15):
    return post_chat(http, st, message, session_id, timeout=timeout)


def metric(http, st, name):
    text = http.get(f"{st.url}/api/metrics", timeout=5).text
    line = next(l for l in text.splitlines() if l.startswith(name + " ") or
                l.startswith(name + "{") and l.split()[0] == name)
    return float(line.split()[-1])


@pytest.fixture(scope="module")
def failover(stack_factory, models):
    return make_stack(stack_factory, models, cooldown_failures=3,
                      cooldown_s=2, retries=0)


@pytest.mark.parametrize("status", [500, 429, 503])
def test_failing_first_provider_falls_over(http, failover, models, status):
    first, second = models
    first.set(mode="fail", status=status)
    second.set(reply="from the second")
    r = turn(http, failover)
    assert r.status_code == 200, r.text
    assert r.json()["reply"] == "from the second"
    assert first.requests() >= 1 and second.requests() >= 1


def test_no_client_error_under_load_and_cooldown(http, failover, models):
    """Provider 1 fails every request: 4 threads for 10 s see no error, and
    once it is cooling down its request count stops growing; after the
    cooldown (2 s), healthy again, it is asked again."""
    first, second = models
    first.set(mode="fail", status=500)
    errors, done = [], []
    stop = time.monotonic() + 10

    def load():
        s = new_session()
        while time.monotonic() < stop:
            r = turn(s, failover)
            (done if r.status_code == 200 else errors).append(r.status_code)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    print(f"\n{len(done)} turns, {len(errors)} errors; provider 1 asked "
          f"{first.requests()} times")
    assert not errors, errors[:5]
    assert first.requests() < len(done) / 4  # skipped most of the time
    # Right after a failed probe a fresh cooldown begins: not asked then.
    deadline = time.monotonic() + 5
    probed = first.requests()
    while first.requests() == probed and time.monotonic() < deadline:
        assert turn(http, failover).status_code == 200
        time.sleep(0.05)
    cooling = first.requests()
    assert cooling > probed, "provider 1 was never probed again"
    assert turn(http, failover).status_code == 200
    assert first.requests() == cooling
    first.set(mode="normal", reply="back again")
    time.sleep(2.2)
    r = turn(http, failover)
    assert r.json()["reply"] == "back again", r.text
    text = http.get(f"{failover.url}/api/metrics", timeout=5).text
    assert re.search(r'chatfcgi_provider_cooldowns_total\{provider='
                     r'"upstream1"\} [1-9]', text), text


def test_request_fault_is_not_tried_elsewhere(http, failover, models):
    first, second = models
    first.set(mode="fail", status=400)
    r = turn(http, failover)
    assert r.status_code == 502, r.text
    assert second.requests() == 0


def test_all_down_is_502_and_nothing_stored(http, failover, models):
    for m in models:
        m.set(mode="fail", status=500)
    r = turn(http, failover, session_id="all-down")
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_error"
    got = http.get(f"{failover.url}/api/chat/all-down", timeout=5)
    assert got.status_code == 404


def test_all_hanging_is_504(http, stack_factory, models):
    st = make_stack(stack_factory, models, timeout_ms=800, retries=0)
    for m in models:
        m.set(mode="hang")
    start = time.monotonic()
    r = turn(http, st)
    elapsed = time.monotonic() - start
    assert r.status_code == 504, r.text
    assert elapsed < 2 * 0.8 + 1, elapsed  # one timeout per provider


def test_hedging_a_hanging_provider(http, stack_factory, models):
    """With hedging, a turn takes about hedge_after_ms plus the second
    provider's time; without, it falls over at the provider timeout."""
    first, second = models
    hedged = make_stack(stack_factory, models, hedge_after_ms=300,
                        timeout_ms=3000)
    plain = make_stack(stack_factory, models, timeout_ms=1500, retries=0)
    first.set(mode="hang")
    second.set(reply="hedged")
    start = time.monotonic()
    r = turn(http, hedged)
    hedge_time = time.monotonic() - start
    assert r.status_code == 200 and r.json()["reply"] == "hedged", r.text
    assert 0.3 <= hedge_time < 1.0, hedge_time
    start = time.monotonic()
    r = turn(http, plain)
    plain_time = time.monotonic() - start
    assert r.status_code == 200, r.text
    assert 1.5 <= plain_time < 2.5, plain_time
    print(f"\nhanging provider 1: {hedge_time:.2f} s with hedging, "
          f"{plain_time:.2f} s without")
    text = http.get(f"{hedged.url}/api/metrics", timeout=5).text
    assert re.search(r'chatfcgi_provider_hedges_won_total\{provider='
                     r'"upstream2"\} [1-9]', text), text


def test_stream_falls_over_before_its_first_delta(failover, models):
    first, second = models
    first.set(mode="fail", status=503)
    second.set(reply="one two three")
    res = stream_chat(failover.url, "hello")
    assert res.status == 200
    assert res.text == "one two three"
    assert res.done is not None


def test_stream_never_falls_over_after_a_delta(stack_factory, models):
    """(A stack of its own: in the module's, provider 1 is cooling down.)"""
    st = make_stack(stack_factory, models)
    first, second = models
    first.set(mode="drop", drop_after=2)
    res = stream_chat(st.url, "hello", session_id="cut-stream")
    assert res.status == 200
    assert res.names[-1] == "error", res.names
    assert second.requests() == 0


def provider_errors(http, st):
    """chatfcgi_provider_errors_total as {(provider, kind): count}, the
    kinds that are not 0 only."""
    text = http.get(f"{st.url}/api/metrics", timeout=5).text
    found = re.findall(r'^chatfcgi_provider_errors_total\{provider="(\w+)",'
                       r'kind="(\w+)"\} (\d+)$', text, re.M)
    return {(p, k): int(n) for p, k, n in found if int(n)}


def chunk(text):
    return json.dumps({"choices": [{"index": 0, "delta": {"content": text},
                                    "finish_reason": None}]})


FINISH = json.dumps({"choices": [{"index": 0, "delta": {},
                                  "finish_reason": "stop"}]})


def read_request(conn):
    """Read one HTTP request (head and Content-Length body) from conn."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return
        data += more
    head, body = data.split(b"\r\n\r\n", 1)
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    need = int(length.group(1)) if length else 0
    while len(body) < need:
        more = conn.recv(65536)
        if not more:
            return
        body += more


class ScriptedUpstream:
    """A model provider for what the local model cannot be told to do: a
    stream with an error object in it, and answers held back until `hold`
    requests are in (or a second has passed), then begun to all of them in
    one go, so that two attempts of one call race. Each request gets a 200
    event stream of the SSE data values `events`, one every 50 ms, then the
    connection is closed."""

    HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Connection: close\r\n\r\n")

    def __init__(self, events, hold=1):
        self.events = [b"data: %s\n\n" % e.encode() for e in events]
        self.hold = hold
        self.requests = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.url = "http://127.0.0.1:%d/v1" % self.server.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _accept_held(self):
        conns, deadline = [], None
        while not self.stopping and len(conns) < self.hold and \
                (deadline is None or time.monotonic() < deadline):
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            read_request(conn)
            conns.append(conn)
            deadline = deadline or time.monotonic() + 1
        return conns

    def _send_all(self, conns, data):
        for c in conns:
            try:
                c.sendall(data)
            except OSError:
                pass  # the attempt was stopped: curl closed it

    def _run(self):
        while not self.stopping:
            conns = self._accept_held()
            self.requests += len(conns)
            for i, event in enumerate(self.events):
                self._send_all(conns, (self.HEAD if i == 0 else b"") + event)
                time.sleep(0.05)
            for c in conns:
                c.close()

    def stop(self):
        self.stopping = True
        self.thread.join(5)
        self.server.close()


@pytest.fixture
def scripted():
    made = []

    def make(events, hold=1):
        made.append(ScriptedUpstream(events, hold))
        return made[-1]

    yield make
    for up in made:
        up.stop()


def test_a_hedge_that_loses_the_race_is_no_failure(http, stack_factory,
                                                   scripted):
    """Both attempts begin to stream at the same moment: one wins, the
    other is stopped, and neither provider is charged a failure."""
    up = scripted([chunk("Hello"), chunk(" there"), FINISH, "[DONE]"],
                  hold=2)
    st = stack_factory({"CHATFCGI_UPSTREAM_URL": f"{up.url}, {up.url}",
                        "CHATFCGI_UPSTREAM_HEDGE_AFTER_MS": "100",
                        "CHATFCGI_UPSTREAM_TIMEOUT_MS": "3000"})
    for i in range(5):
        res = stream_chat(st.url, "hello")
        assert res.status == 200 and res.text == "Hello there", res.events
    assert up.requests == 10
    assert provider_errors(http, st) == {}


def test_an_over_long_stream_line_is_a_bad_answer_not_retried(
        http, stack_factory, models):
    """A stream line over the parser's cap (256 KiB) is a bad answer: not a
    broken transfer worth another round."""
    first = models[0]
    st = stack_factory({"CHATFCGI_UPSTREAM_URL": f"{first.url}/v1",
                        "CHATFCGI_UPSTREAM_RETRIES": "1"})
    first.set(reply="x" * (300 * 1024))
    res = stream_chat(st.url, "hello")
    assert res.status == 502, res
    assert first.requests() == 1
    assert provider_errors(http, st) == {("upstream1", "bad_answer"): 1}


def test_an_error_object_mid_stream(http, stack_factory, scripted):
    """An error object in a 200 stream, before any content: an error of
    the stream's HTTP status (200) worth another round, as a 5xx is; the
    client learns the kind, the log the provider's words."""
    secret = "quota exceeded for org-4Kq9 (billing@example.com)"
    up = scripted([json.dumps({"error": {"message": secret,
                                         "type": "server_error"}})])
    st = stack_factory({"CHATFCGI_UPSTREAM_URL": up.url,
                        "CHATFCGI_UPSTREAM_RETRIES": "1"})
    res = stream_chat(st.url, "hello")
    assert res.status == 502, res
    message = res.json()["error"]["message"]
    assert "mid-stream" in message and "200" in message, message
    assert b"org-4Kq9" not in res.body
    assert up.requests == 2
    assert provider_errors(http, st) == {("upstream1", "http_error"): 2}
    log = Path(st.log_path("chatfcgi")).read_text()
    assert f"req={res.headers['x-request-id']}" in log
    assert secret in log


def test_an_error_object_after_content_is_an_error_event(http,
                                                        stack_factory,
                                                        scripted):
    """Once content reached the client, an error object mid-stream ends
    the stream with an error event that names the kind, not the
    provider's words, and is not tried again."""
    secret = "content filter of account acct_7Hx2 triggered"
    up = scripted([chunk("Hel"), chunk("lo"),
                   json.dumps({"error": {"message": secret}})])
    st = stack_factory({"CHATFCGI_UPSTREAM_URL": up.url})
    res = stream_chat(st.url, "hello")
    assert res.status == 200 and res.text == "Hello", res.events
    assert res.names[-1] == "error", res.names
    assert res.events[-1].data["error"]["message"] == \
        "the model reported an error mid-stream (HTTP 200)", res.events
    assert b"acct_7Hx2" not in res.events[-1].raw
    assert up.requests == 1
    assert secret in Path(st.log_path("chatfcgi")).read_text()
