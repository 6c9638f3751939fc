"""A small streaming client for POST /api/chat with "stream": true.

It speaks HTTP/1.1 over a raw socket and decodes the chunked body itself,
so every event is seen the moment its bytes arrive (requests' iter_lines
buffers; this does not). For each event it records its name, its data
(parsed JSON), and when it arrived (monotonic and wall clock). It can hang
up abruptly after N events or after a delay, to play a client that goes
away. Every read has a timeout: a server that hangs makes the call raise
SSETimeout instead of blocking the test.

    from sse_client import stream_chat
    res = stream_chat(stack.url, "hello", session_id="s1")
    res.status, res.headers["content-type"], res.names, res.text, res.done

Standard library only.
"""

import json
import socket
import time
import urllib.parse
from dataclasses import dataclass, field

RECV_SIZE = 65536


class SSETimeout(AssertionError):
    """The server sent nothing for read_timeout, or the whole exchange took
    longer than total_timeout (an AssertionError, so a test reports it as a
    failed expectation)."""


class ProtocolError(AssertionError):
    """The server's bytes are not well-formed HTTP/1.1 or SSE framing."""


@dataclass
class Event:
    name: str              # "message" when the event had no event: field
    raw: bytes             # the data lines, joined with \n, as bytes
    t: float               # time.monotonic() when its last byte arrived
    wall: float            # time.time() at the same moment
    data: object = None    # parsed JSON, or None when raw is not JSON
    utf8_ok: bool = True   # raw is valid UTF-8
    json_ok: bool = True   # raw parsed as JSON

    def __repr__(self):
        return f"Event({self.name!r}, {self.raw[:120]!r})"


@dataclass
class StreamResult:
    status: int = 0
    reason: str = ""
    headers: dict = field(default_factory=dict)   # lower-case name -> value
    header_list: list = field(default_factory=list)
    events: list = field(default_factory=list)
    body: bytes = b""           # the body of a response that is not SSE
    complete: bool = False      # the body ended properly (last chunk seen)
    eof: bool = False           # the server closed the connection
    closed_by_client: bool = False
    t_sent: float = 0.0         # monotonic / wall clock, request sent
    wall_sent: float = 0.0
    t_head: float = 0.0         # response head received
    t_closed: float = 0.0       # monotonic / wall clock, we hung up
    wall_closed: float = 0.0
    stray: bytes = b""          # undispatched SSE bytes at the end

    @property
    def is_sse(self):
        return self.headers.get("content-type", "").startswith(
            "text/event-stream")

    @property
    def names(self):
        return [e.name for e in self.events]

    @property
    def deltas(self):
        return [e for e in self.events if e.name == "delta"]

    @property
    def text(self):
        """The deltas' content joined (raises if a delta is malformed)."""
        return "".join(e.data["content"] for e in self.deltas)

    def last(self, name):
        found = [e for e in self.events if e.name == name]
        return found[-1] if found else None

    @property
    def done(self):
        return self.last("done")

    def json(self):
        """The body of a non-SSE answer, parsed."""
        return json.loads(self.body.decode("utf-8"))


class _SSEParser:
    """The client side of the text/event-stream format (WHATWG rules for
    the fields we need: event, data, comments, LF/CRLF/CR line ends)."""

    def __init__(self, sink):
        self.sink = sink
        self.buf = b""
        self.name = ""
        self.data = []
        self.has_data = False

    def feed(self, chunk, t, wall):
        self.buf += chunk
        while True:
            cut = _line_end(self.buf)
            if cut is None:
                return
            line, rest = cut
            self.buf = rest
            self._line(line, t, wall)

    def _line(self, line, t, wall):
        if line == b"":
            if self.has_data:
                self.sink(_make_event(self.name or "message",
                                      b"\n".join(self.data), t, wall))
            self.name, self.data, self.has_data = "", [], False
            return
        if line.startswith(b":"):
            return
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if name == b"event":
            self.name = value.decode("utf-8", "replace")
        elif name == b"data":
            self.data.append(value)
            self.has_data = True

    def leftover(self):
        return self.buf + b"\n".join(self.data)


def _line_end(buf):
    """(line, rest) for the first complete line, or None. A CR at the very
    end may be the first half of a CRLF: wait for more."""
    for i, b in enumerate(buf):
        if b == 0x0A:
            return buf[:i], buf[i + 1:]
        if b == 0x0D:
            if i + 1 == len(buf):
                return None
            skip = 2 if buf[i + 1] == 0x0A else 1
            return buf[:i], buf[i + skip:]
    return None


def _make_event(name, raw, t, wall):
    ev = Event(name=name, raw=raw, t=t, wall=wall)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        ev.utf8_ok = ev.json_ok = False
        return ev
    try:
        ev.data = json.loads(text)
    except ValueError:
        ev.json_ok = False
    return ev


class _Chunked:
    """Incremental decoder of a chunked transfer coding."""

    def __init__(self):
        self.buf = b""
        self.state = "size"   # size, data, crlf, trailer, done
        self.left = 0
        self.finished = False

    def feed(self, data):
        """The payload decoded from what has arrived so far."""
        self.buf += data
        out = []
        while True:
            if self.state == "size":
                nl = self.buf.find(b"\r\n")
                if nl < 0:
                    if len(self.buf) > 4096:
                        raise ProtocolError(f"bad chunk size line "
                                            f"{self.buf[:80]!r}")
                    break
                size_line = self.buf[:nl].split(b";")[0].strip()
                try:
                    self.left = int(size_line, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {size_line!r}") \
                        from None
                self.buf = self.buf[nl + 2:]
                self.state = "data" if self.left else "trailer"
            elif self.state == "data":
                if not self.buf:
                    break
                take = self.buf[:self.left]
                out.append(take)
                self.buf = self.buf[len(take):]
                self.left -= len(take)
                if self.left == 0:
                    self.state = "crlf"
            elif self.state == "crlf":
                if len(self.buf) < 2:
                    break
                if self.buf[:2] != b"\r\n":
                    raise ProtocolError(f"no CRLF after a chunk: "
                                        f"{self.buf[:20]!r}")
                self.buf = self.buf[2:]
                self.state = "size"
            elif self.state == "trailer":
                nl = self.buf.find(b"\r\n")
                if nl < 0:
                    break
                line, self.buf = self.buf[:nl], self.buf[nl + 2:]
                if line == b"":
                    self.state = "done"
                    self.finished = True
            else:
                break
        return b"".join(out)


def _split_url(base_url):
    u = urllib.parse.urlsplit(base_url)
    return u.hostname or "127.0.0.1", u.port or 80


def build_request(host, port, path, body, headers=None):
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
             "Content-Type: application/json",
             "Accept: text/event-stream",
             f"Content-Length: {len(body)}", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def stream_chat(base_url, message=None, session_id=None, *, stream=True,
                payload=None, path="/api/chat", headers=None,
                close_after_events=None, close_after=None, rst=False,
                on_event=None, read_timeout=5.0, total_timeout=30.0):
    """POST a chat turn and read the answer as it streams.

    payload: the whole JSON body (else built from message/session_id/stream;
    bytes are sent as they are). close_after_events: hang up once that many
    events have arrived. close_after: hang up that many seconds after the
    request was sent, whatever arrived. rst: hang up with a TCP reset
    (SO_LINGER 0) instead of a FIN. on_event(event): called as each event
    arrives, before the next read. read_timeout: the longest silence
    allowed; total_timeout: the longest exchange. Either raises SSETimeout
    (hanging up on purpose is not a timeout).
    """
    if payload is None:
        payload = {"message": message, "stream": stream}
        if session_id is not None:
            payload["session_id"] = session_id
    body = payload if isinstance(payload, bytes) else \
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    host, port = _split_url(base_url)
    res = StreamResult()
    sock = socket.create_connection((host, port), timeout=read_timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        _exchange(sock, res, build_request(host, port, path, body, headers),
                  close_after_events, close_after, read_timeout,
                  total_timeout, rst, on_event)
    finally:
        if not res.closed_by_client:
            sock.close()
    return res


def _hang_up(sock, res, rst):
    if rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    res.t_closed = time.monotonic()
    res.wall_closed = time.time()
    res.closed_by_client = True


def _exchange(sock, res, request, close_after_events, close_after,
              read_timeout, total_timeout, rst=False, on_event=None):
    res.t_sent = time.monotonic()
    res.wall_sent = time.time()
    sock.sendall(request)
    deadline = res.t_sent + total_timeout
    close_at = res.t_sent + close_after if close_after is not None else None
    head = b""
    chunked = None
    remaining = None          # Content-Length left, None: until EOF
    def sink(event):
        res.events.append(event)
        if on_event is not None:
            on_event(event)

    parser = _SSEParser(sink)
    in_body = False

    def body_bytes(data, t, wall):
        nonlocal remaining
        if chunked is not None:
            payload = chunked.feed(data)
            if chunked.finished:
                res.complete = True
        else:
            payload = data
            if remaining is not None:
                payload = payload[:remaining]
                remaining -= len(payload)
                if remaining == 0:
                    res.complete = True
        if res.is_sse:
            parser.feed(payload, t, wall)
        else:
            res.body += payload

    while True:
        if close_after_events is not None and \
                len(res.events) >= close_after_events:
            _hang_up(sock, res, rst)
            break
        now = time.monotonic()
        if close_at is not None and now >= close_at:
            _hang_up(sock, res, rst)
            break
        if res.complete:
            break
        if now >= deadline:
            raise SSETimeout(f"no complete answer within {total_timeout} s; "
                             f"so far: status {res.status}, "
                             f"events {res.events}")
        wait = min(read_timeout, deadline - now)
        if close_at is not None:
            wait = min(wait, close_at - now)
        sock.settimeout(max(wait, 0.001))
        try:
            data = sock.recv(RECV_SIZE)
        except socket.timeout:
            if close_at is not None and time.monotonic() >= close_at:
                continue
            if time.monotonic() >= deadline:
                continue
            raise SSETimeout(f"the server sent nothing for {read_timeout} s;"
                             f" so far: status {res.status}, "
                             f"events {res.events}") from None
        except ConnectionResetError:
            data = b""
        t, wall = time.monotonic(), time.time()
        if not data:
            res.eof = True
            if not in_body:
                raise ProtocolError(f"connection closed before a full "
                                    f"response head: {head!r}")
            if chunked is None and remaining is None:
                res.complete = True
            break
        if in_body:
            body_bytes(data, t, wall)
            continue
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            continue
        head, rest = head[:end], head[end + 4:]
        _parse_head(res, head)
        res.t_head = t
        in_body = True
        te = res.headers.get("transfer-encoding", "").lower()
        if "chunked" in te:
            chunked = _Chunked()
        elif "content-length" in res.headers:
            remaining = int(res.headers["content-length"])
            if remaining == 0:
                res.complete = True
        if rest:
            body_bytes(rest, t, wall)
    res.stray = parser.leftover()


def _parse_head(res, head):
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ProtocolError(f"bad status line {lines[0]!r}")
    res.status = int(parts[1])
    res.reason = parts[2] if len(parts) > 2 else ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        res.header_list.append((name.strip(), value.strip()))
        res.headers[name.strip().lower()] = value.strip()
