#!/usr/bin/python3
"""Time to the first streamed delta, over keep-alive HTTP/1.1 connections.

    stream_client.py URL [--kind chat|openai] [-n STREAMS] [-c CONNECTIONS]

Sends STREAMS streaming POSTs to URL, spread over CONNECTIONS keep-alive
connections (raw sockets, one selector loop, so no thread or GIL sits between
the socket and the clock), and measures for each one the time from the
moment the request was written to the moment the first delta arrived:

  --kind chat    URL is chatfcgi's POST /api/chat (API.md): the body is
                 {"session_id", "message", "stream": true}; the first delta
                 is the first "event: delta" of the answer.
  --kind openai  URL is an OpenAI-compatible chat-completions endpoint (the
                 fake upstream itself, or the ceil-proxy nginx in front of
                 it): the body is {"model", "messages", "stream": true}; the
                 first delta is the first "data: " line of the answer.

Each answer is then read to its end (chunked or Content-Length), so the
connection is reused for the next stream. Prints one line:

  @@STREAM n=N ok=K errors=E p50_ms=A p90_ms=B p99_ms=C max_ms=D

(or, with --json, one JSON object with the same fields and every sample).
Python 3 standard library only.
"""

import argparse
import json
import math
import os
import selectors
import socket
import sys
import time
import urllib.parse

MESSAGE = "Hello, how are you?"
SYSTEM = "You are a helpful assistant."
READ_SIZE = 65536
TIMEOUT_S = 30.0


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1,
                   math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


class Conn:
    """One keep-alive connection and the state of the answer it reads."""

    def __init__(self, host, port, path, kind, index):
        self.host, self.port, self.path, self.kind = host, port, path, kind
        self.session = os.urandom(16).hex()  # one session per connection
        self.index = index
        self.sock = None
        self.reset()

    def reset(self):
        self.buf = b""
        self.head_done = False
        self.status = None
        self.chunked = False
        self.remaining = None     # Content-Length left, or chunk left
        self.cstate = "size"      # chunked decoding state
        self.close_after = False
        self.body = b""           # decoded body seen so far (for the marker)
        self.t_sent = None
        self.t_first = None
        self.done = False

    def connect(self):
        self.sock = socket.create_connection((self.host, self.port),
                                             timeout=TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def request_bytes(self):
        if self.kind == "chat":
            body = {"session_id": self.session, "message": MESSAGE,
                    "stream": True}
        else:
            body = {"model": "fake-1", "stream": True,
                    "messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": MESSAGE}]}
        data = json.dumps(body, separators=(",", ":")).encode()
        head = (f"POST {self.path} HTTP/1.1\r\n"
                f"Host: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\n"
                f"Accept: text/event-stream\r\n"
                f"Authorization: Bearer sk-fake\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        return head + data

    @property
    def marker(self):
        return b"event: delta" if self.kind == "chat" else b"data: "

    def send(self):
        """Write the next request (blocking write of a small buffer)."""
        if self.sock is None:
            self.connect()
        req = self.request_bytes()
        self.reset()
        self.sock.setblocking(True)
        self.t_sent = time.perf_counter()
        self.sock.sendall(req)
        self.sock.setblocking(False)

    def feed(self, data, now):
        """Consume received bytes; sets t_first and done."""
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            self.buf = self.buf[end + 4:]
            self.head_done = True
            try:
                self.status = int(head[0].split()[1])
            except (IndexError, ValueError):
                raise IOError(f"bad status line {head[0]!r}")
            for line in head[1:]:
                name, _, value = line.partition(":")
                name, value = name.strip().lower(), value.strip()
                if name == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True
                elif name == "content-length":
                    self.remaining = int(value)
                elif name == "connection" and value.lower() == "close":
                    self.close_after = True
            if not self.chunked and self.remaining is None:
                self.close_after = True  # read until the server closes
        if self.chunked:
            self._feed_chunked()
        else:
            self._feed_plain()
        if self.t_first is None and self.marker in self.body:
            self.t_first = now
        # keep only a tail long enough to find a marker split across reads
        if len(self.body) > 64:
            self.body = self.body[-64:]

    def _feed_plain(self):
        take = self.buf if self.remaining is None else self.buf[:self.remaining]
        self.body += take
        self.buf = self.buf[len(take):]
        if self.remaining is not None:
            self.remaining -= len(take)
            if self.remaining == 0:
                self.done = True

    def _feed_chunked(self):
        # states: "size" (a chunk-size line), "data" (self.remaining bytes),
        # "crlf" (the CRLF after a chunk's data), "trailer" (after the last
        # chunk: lines until an empty one)
        while True:
            if self.cstate == "size":
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(self.buf[:end].split(b";")[0], 16)
                self.buf = self.buf[end + 2:]
                if size == 0:
                    self.cstate = "trailer"
                else:
                    self.remaining, self.cstate = size, "data"
            elif self.cstate == "data":
                if not self.buf:
                    return
                take = self.buf[:self.remaining]
                self.body += take
                self.buf = self.buf[len(take):]
                self.remaining -= len(take)
                if self.remaining == 0:
                    self.cstate = "crlf"
            elif self.cstate == "crlf":
                if len(self.buf) < 2:
                    return
                self.buf = self.buf[2:]
                self.cstate = "size"
            else:  # trailer
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                if not line:
                    self.done = True
                    return


def run(url, kind, streams, conns):
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname, u.port or 80
    path = u.path or "/"
    sel = selectors.DefaultSelector()
    pool = [Conn(host, port, path, kind, i) for i in range(min(conns,
                                                              streams))]
    samples, errors, first_errors = [], 0, []
    started = 0

    def start(c):
        nonlocal started, errors
        while started < streams:
            started += 1
            try:
                c.send()
                sel.register(c.sock, selectors.EVENT_READ, c)
                return
            except OSError as e:
                errors += 1
                if len(first_errors) < 3:
                    first_errors.append(f"send: {e}")
                c.close()

    for c in pool:
        start(c)
    while sel.get_map():
        events = sel.select(timeout=1.0)
        now_wall = time.perf_counter()
        for key in list(sel.get_map().values()):
            c = key.data
            if now_wall - c.t_sent > TIMEOUT_S:
                errors += 1
                if len(first_errors) < 3:
                    first_errors.append("timeout")
                sel.unregister(c.sock)
                c.close()
                start(c)
        events = [(k, m) for k, m in events if k.fd in sel.get_map()
                  and sel.get_map()[k.fd].data is k.data]
        for key, _ in events:
            c = key.data
            try:
                try:
                    data = c.sock.recv(READ_SIZE)
                except BlockingIOError:
                    continue
                now = time.perf_counter()
                if not data:
                    if c.head_done and c.close_after and not c.chunked:
                        c.done = True
                    else:
                        raise IOError("connection closed mid-answer")
                else:
                    c.feed(data, now)
            except (OSError, ValueError) as e:
                errors += 1
                if len(first_errors) < 3:
                    first_errors.append(str(e))
                sel.unregister(c.sock)
                c.close()
                start(c)
                continue
            if c.done:
                sel.unregister(c.sock)
                if c.status == 200 and c.t_first is not None:
                    samples.append((c.t_first - c.t_sent) * 1000.0)
                else:
                    errors += 1
                    if len(first_errors) < 3:
                        first_errors.append(f"status {c.status}, "
                                            f"delta seen: {c.t_first is not None}")
                if c.close_after:
                    c.close()
                start(c)
    for c in pool:
        c.close()
    s = sorted(samples)
    return {"url": url, "kind": kind, "n": streams, "ok": len(s),
            "errors": errors, "first_errors": first_errors,
            "p50_ms": percentile(s, 50), "p90_ms": percentile(s, 90),
            "p99_ms": percentile(s, 99), "max_ms": s[-1] if s else None,
            "samples_ms": samples}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("--kind", choices=("chat", "openai"), default="chat")
    ap.add_argument("-n", "--streams", type=int, default=1000)
    ap.add_argument("-c", "--connections", type=int, default=4)
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (with every sample)")
    args = ap.parse_args(argv)
    r = run(args.url, args.kind, args.streams, args.connections)
    if args.json:
        print(json.dumps(r))
    else:
        def f(v):
            return "-" if v is None else f"{v:.2f}"
        print(f"@@STREAM n={r['n']} ok={r['ok']} errors={r['errors']} "
              f"p50_ms={f(r['p50_ms'])} p90_ms={f(r['p90_ms'])} "
              f"p99_ms={f(r['p99_ms'])} max_ms={f(r['max_ms'])}")
        for e in r["first_errors"]:
            print(f"  error: {e}", file=sys.stderr)
    return 0 if r["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
