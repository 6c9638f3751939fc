#!/usr/bin/python3
"""Streamed answers over keep-alive HTTP/1.1 connections, timed.

    stream_client.py URL [--kind chat|openai] [-n STREAMS] [-c CONNECTIONS]
                     [--timeout S] [--ticks] [--ready] [--json]

Sends STREAMS streaming POSTs to URL, spread over CONNECTIONS keep-alive
connections (raw non-blocking sockets, one selector loop, so no thread or
GIL sits between the socket and the clock): each connection starts its next
stream as soon as its answer has ended, until STREAMS have started. For
each stream it measures the time from the moment the request was written
to the moment the first delta arrived, and the whole answer, from the
moment the stream was started (the connect included) to its last byte:

  --kind chat    URL is chatfcgi's POST /api/chat (API.md): the body is
                 {"session_id", "message", "stream": true}, one session per
                 connection; the first delta is the first "event: delta",
                 the end "event: done".
  --kind openai  URL is an OpenAI-compatible chat-completions endpoint (the
                 fake upstream itself, or the ceil-proxy nginx in front of
                 it): the body is {"model", "messages", "stream": true}; the
                 first delta is the first "data: " line, the end
                 "data: [DONE]".

Each answer is read to its end (chunked or Content-Length), so the
connection is reused for the next stream. A stream counts as ok with
status 200, a first delta and the end event (and no "event: error");
otherwise it is an error of one kind: non200 (another status), broken (a
200 that closed, timed out or ended without the end event) or sockerr
(connect, send or read failed before a status line). Prints one line:

  @@STREAM n=N ok=K errors=E p50_ms=A p90_ms=B p99_ms=C max_ms=D

(first delta), or with --json one JSON object with every field and sample,
and the answer time's p99 of each round (a connection's k-th stream is in
round k: the first round is the one that meets a cold server).
--ticks prints, once a second, "@@TICK t=S active=A started=B ended=C" (A:
streams in progress) for a driver that samples memory while they are held
(make bench-held); --ready prints "@@READY" and waits for a line on stdin
before the first stream, so that such a driver can take its "before"
sample with this process already started. The soft RLIMIT_NOFILE is raised to the hard one, so
that thousands of connections fit. Python 3 standard library only.
"""

import argparse
import errno
import json
import math
import os
import resource
import selectors
import socket
import sys
import time
import urllib.parse

MESSAGE = "Hello, how are you?"
SYSTEM = "You are a helpful assistant."
READ_SIZE = 65536
TIMEOUT_S = 30.0
MARKERS = {"chat": (b"event: delta", b"event: done", b"event: error"),
           "openai": (b"data: ", b"data: [DONE]", None)}
TAIL = 32  # bytes of body kept to find a marker split across reads


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1,
                   math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def raise_nofile(need):
    """Soft RLIMIT_NOFILE up to the hard one: the default soft 1024 would
    cap a run at about a thousand connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if need > hard:
        raise OSError(f"{need} connections need {need} descriptors; "
                      f"RLIMIT_NOFILE allows {hard}")


class StreamError(Exception):
    """A stream that failed; kind is non200, broken or sockerr."""

    def __init__(self, kind, msg):
        super().__init__(msg)
        self.kind = kind


class Conn:
    """One keep-alive connection and the state of the answer it reads."""

    def __init__(self, addr, host_header, path, kind):
        self.addr, self.host_header, self.path, self.kind = \
            addr, host_header, path, kind
        self.first_marker, self.end_marker, self.error_marker = MARKERS[kind]
        self.session = os.urandom(16).hex()  # one session per connection
        self.streams = 0  # begun on this connection: the current one's round
        self.sock = None
        self.connecting = False
        self.reset()

    def reset(self):
        self.out = b""            # request bytes not yet written
        self.buf = b""
        self.head_done = False
        self.status = None
        self.chunked = False
        self.remaining = None     # Content-Length left, or chunk left
        self.cstate = "size"      # chunked decoding state
        self.close_after = False
        self.tail = b""           # end of the decoded body (for markers)
        self.seen_end = self.seen_error = False
        self.t_start = self.t_sent = self.t_first = None
        self.done = False

    def connect(self):
        """Start a non-blocking connect: a burst of thousands must not wait
        for each handshake (or a 1 s SYN retry) in turn."""
        family, stype, proto, _, sockaddr = self.addr
        self.sock = socket.socket(family, stype, proto)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = self.sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, f"connect: {os.strerror(err)}")
        self.connecting = err != 0

    def connected(self):
        """After a connect became writable: did it succeed?"""
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect: {os.strerror(err)}")
        self.connecting = False

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        self.connecting = False

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
                f"Host: {self.host_header}\r\n"
                f"Content-Type: application/json\r\n"
                f"Accept: text/event-stream\r\n"
                f"Authorization: Bearer sk-fake\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        return head + data

    def begin(self, now):
        """Start the next stream: connect if needed, queue the request."""
        self.reset()
        self.streams += 1
        self.t_start = now
        if self.sock is None:
            self.connect()
        self.out = self.request_bytes()

    def flush(self, now):
        """Write what the socket takes; True once the request is out."""
        if self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                return False
            self.out = self.out[n:]
        if not self.out and self.t_sent is None:
            self.t_sent = now
        return not self.out

    def feed(self, data, now):
        """Consume received bytes; sets t_first, the markers and done."""
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(self.buf[:end])
            self.buf = self.buf[end + 4:]
        new = self._feed_chunked() if self.chunked else self._feed_plain()
        window = self.tail + new
        if self.t_first is None and self.first_marker in window:
            self.t_first = now
        self.seen_end = self.seen_end or self.end_marker in window
        self.seen_error = self.seen_error or bool(
            self.error_marker and self.error_marker in window)
        self.tail = window[-TAIL:]

    def _parse_head(self, raw):
        head = raw.decode("latin-1").split("\r\n")
        self.head_done = True
        try:
            self.status = int(head[0].split()[1])
        except (IndexError, ValueError):
            raise StreamError("sockerr", f"bad status line {head[0]!r}")
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

    def _feed_plain(self):
        take = self.buf if self.remaining is None else self.buf[:self.remaining]
        self.buf = self.buf[len(take):]
        if self.remaining is not None:
            self.remaining -= len(take)
            if self.remaining == 0:
                self.done = True
        return take

    def _feed_chunked(self):
        # states: "size" (a chunk-size line), "data" (self.remaining bytes),
        # "crlf" (the CRLF after a chunk's data), "trailer" (after the last
        # chunk: lines until an empty one). Returns the body bytes decoded.
        body = b""
        while True:
            if self.cstate == "size":
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return body
                size = int(self.buf[:end].split(b";")[0], 16)
                self.buf = self.buf[end + 2:]
                if size == 0:
                    self.cstate = "trailer"
                else:
                    self.remaining, self.cstate = size, "data"
            elif self.cstate == "data":
                if not self.buf:
                    return body
                take = self.buf[:self.remaining]
                body += take
                self.buf = self.buf[len(take):]
                self.remaining -= len(take)
                if self.remaining == 0:
                    self.cstate = "crlf"
            elif self.cstate == "crlf":
                if len(self.buf) < 2:
                    return body
                self.buf = self.buf[2:]
                self.cstate = "size"
            else:  # trailer
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return body
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                if not line:
                    self.done = True
                    return body

    def closed_by_peer(self):
        """The server closed: the end of a close-delimited answer, or a
        failure."""
        if self.head_done and self.close_after and not self.chunked:
            self.done = True
        elif self.head_done:
            raise StreamError("broken", "connection closed mid-answer")
        else:
            raise StreamError("sockerr", "connection closed before a status")

    def verdict(self):
        """None for a good answer, else StreamError."""
        if self.status != 200:
            return StreamError("non200", f"status {self.status}")
        if self.t_first is None or not self.seen_end or self.seen_error:
            return StreamError("broken", f"status 200, delta seen: "
                               f"{self.t_first is not None}, end seen: "
                               f"{self.seen_end}, error event: "
                               f"{self.seen_error}")
        return None


class Client:
    """The selector loop over the connections of one run."""

    def __init__(self, url, kind, streams, conns, timeout_s, tick):
        u = urllib.parse.urlsplit(url)
        port = u.port or 80
        addr = socket.getaddrinfo(u.hostname, port, type=socket.SOCK_STREAM)[0]
        self.pool = [Conn(addr, f"{u.hostname}:{port}", u.path or "/", kind)
                     for _ in range(min(conns, streams))]
        self.url, self.kind, self.streams = url, kind, streams
        self.timeout_s, self.tick = timeout_s, tick
        self.sel = selectors.DefaultSelector()
        self.started = self.ended = 0
        self.first_ms, self.answer_ms = [], []
        self.answer_ms_by_round = []  # [round - 1]: that round's answers
        self.errors = {"non200": 0, "broken": 0, "sockerr": 0}
        self.first_errors = []

    def start(self, c):
        """The connection's next stream, while streams are left."""
        while self.started < self.streams:
            self.started += 1
            try:
                c.begin(time.perf_counter())
                if c.connecting or not c.flush(time.perf_counter()):
                    self.sel.register(c.sock, selectors.EVENT_WRITE, c)
                else:
                    self.sel.register(c.sock, selectors.EVENT_READ, c)
                return
            except OSError as e:
                self.fail(c, StreamError("sockerr", str(e)), registered=False)

    def fail(self, c, err, registered=True):
        self.ended += 1
        self.errors[err.kind] += 1
        if len(self.first_errors) < 3:
            self.first_errors.append(f"{err.kind}: {err}")
        if registered:
            self.sel.unregister(c.sock)
        c.close()

    def finish(self, c, now):
        self.sel.unregister(c.sock)
        self.ended += 1
        err = c.verdict()
        if err is None:
            self.first_ms.append((c.t_first - c.t_sent) * 1000.0)
            self.answer_ms.append((now - c.t_start) * 1000.0)
            while len(self.answer_ms_by_round) < c.streams:
                self.answer_ms_by_round.append([])
            self.answer_ms_by_round[c.streams - 1].append(self.answer_ms[-1])
        else:
            self.errors[err.kind] += 1
            if len(self.first_errors) < 3:
                self.first_errors.append(f"{err.kind}: {err}")
        if c.close_after:
            c.close()
        self.start(c)

    def on_event(self, c, mask):
        now = time.perf_counter()
        if mask & selectors.EVENT_WRITE:
            if c.connecting:
                c.connected()
            if c.flush(now):
                self.sel.modify(c.sock, selectors.EVENT_READ, c)
            return
        try:
            data = c.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        if data:
            c.feed(data, time.perf_counter())
        else:
            c.closed_by_peer()
        if c.done:
            self.finish(c, time.perf_counter())

    def expire(self, now):
        """Streams past the timeout fail (checked once a second: a scan of
        thousands of connections per event would cost more than the
        events)."""
        for key in list(self.sel.get_map().values()):
            c = key.data
            if now - c.t_start > self.timeout_s:
                kind = "broken" if c.status == 200 else "sockerr"
                self.fail(c, StreamError(kind, "timeout"))
                self.start(c)

    def loop(self):
        t0 = last = time.perf_counter()
        for c in self.pool:
            self.start(c)
        while self.sel.get_map():
            for key, mask in self.sel.select(timeout=1.0):
                c = key.data
                if self.sel.get_map().get(key.fd) is not key:
                    continue  # its stream ended in this round of events
                try:
                    self.on_event(c, mask)
                except StreamError as e:
                    self.fail(c, e)
                    self.start(c)
                except (OSError, ValueError) as e:
                    self.fail(c, StreamError("broken" if c.head_done
                                             else "sockerr", str(e)))
                    self.start(c)
            now = time.perf_counter()
            if now - last >= 1.0:
                last = now
                self.expire(now)
                if self.tick:
                    self.tick(now - t0, len(self.sel.get_map()),
                              self.started, self.ended)
        for c in self.pool:
            c.close()
        return time.perf_counter() - t0

    def result(self, elapsed):
        f, a = sorted(self.first_ms), sorted(self.answer_ms)
        return {"url": self.url, "kind": self.kind, "n": self.streams,
                "ok": len(a), "errors": sum(self.errors.values()),
                **self.errors, "first_errors": self.first_errors,
                "elapsed_s": elapsed,
                "p50_ms": percentile(f, 50), "p90_ms": percentile(f, 90),
                "p99_ms": percentile(f, 99), "max_ms": f[-1] if f else None,
                "answer_p50_ms": percentile(a, 50),
                "answer_p99_ms": percentile(a, 99),
                "answer_p99_ms_by_round": [percentile(sorted(r), 99) for r
                                           in self.answer_ms_by_round],
                "samples_ms": self.first_ms, "answer_ms": self.answer_ms}


def run(url, kind, streams, conns, timeout_s=TIMEOUT_S, tick=None):
    """STREAMS streams over CONNECTIONS connections; tick(t, active,
    started, ended) is called about once a second."""
    raise_nofile(min(conns, streams) + 64)
    client = Client(url, kind, streams, conns, timeout_s, tick)
    return client.result(client.loop())


def print_tick(t, active, started, ended):
    print(f"@@TICK t={t:.1f} active={active} started={started} "
          f"ended={ended}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("--kind", choices=("chat", "openai"), default="chat")
    ap.add_argument("-n", "--streams", type=int, default=1000)
    ap.add_argument("-c", "--connections", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S,
                    help="seconds a stream may take (default 30)")
    ap.add_argument("--ticks", action="store_true",
                    help="print @@TICK lines once a second")
    ap.add_argument("--ready", action="store_true",
                    help="print @@READY, start once a line comes on stdin")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (with every sample)")
    args = ap.parse_args(argv)
    if args.ready:
        print("@@READY", flush=True)
        sys.stdin.readline()
    r = run(args.url, args.kind, args.streams, args.connections,
            args.timeout, print_tick if args.ticks else None)
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
