"""A small FastCGI client (Python standard library only) for the tests that
must reach chatfcgi's socket directly: nginx reads the whole request body
and sets CONTENT_LENGTH itself, so a body that disagrees with its announced
length, or comes without one, can only be sent from here.

    from fcgi_client import fcgi_request, chat_params

    r = fcgi_request(stack.socket_path,
                     chat_params(content_length=len(body)), body)
    r.status, r.headers["content-type"], r.json()

One request per connection (FCGI_KEEP_CONN off, as nginx sends it), role
RESPONDER. Every read has a deadline, so an application that waits for bytes
that never come fails the test with FcgiTimeout instead of blocking it.

The record layout and the name-value pair encoding follow the FastCGI 1.0
specification, sections 3.3 and 3.4.
"""

import json
import socket
import struct
import time

FCGI_VERSION_1 = 1

FCGI_BEGIN_REQUEST = 1
FCGI_ABORT_REQUEST = 2
FCGI_END_REQUEST = 3
FCGI_PARAMS = 4
FCGI_STDIN = 5
FCGI_STDOUT = 6
FCGI_STDERR = 7

FCGI_RESPONDER = 1
FCGI_KEEP_CONN = 1

FCGI_REQUEST_COMPLETE = 0

HEADER = struct.Struct(">BBHHBx")   # version, type, id, length, padding
BEGIN_BODY = struct.Struct(">HB5x")  # role, flags
END_BODY = struct.Struct(">IB3x")    # app status, protocol status
MAX_CONTENT = 0xFFFF
REQUEST_ID = 1
STDIN_PIECE = 32 * 1024              # bytes per FCGI_STDIN record


class FcgiError(Exception):
    """The application broke the protocol or the connection."""


class FcgiTimeout(FcgiError):
    """No complete response before the deadline: the application hangs."""


# ------------------------------------------------------------- encoding

def record(rtype, content=b"", request_id=REQUEST_ID):
    """One record, padded to a multiple of 8 bytes (the spec's advice)."""
    if len(content) > MAX_CONTENT:
        raise ValueError("record content over 65535 bytes")
    padding = -len(content) % 8
    return (HEADER.pack(FCGI_VERSION_1, rtype, request_id, len(content),
                        padding) + content + b"\0" * padding)


def stream_records(rtype, data, piece=MAX_CONTENT):
    """A stream (PARAMS, STDIN): its data in records, then the empty record
    that ends it."""
    out = [record(rtype, data[i:i + piece])
           for i in range(0, len(data), piece)]
    return b"".join(out) + record(rtype)


def _length(n):
    """A name-value length: 1 byte below 128, else 4 bytes, high bit set."""
    if n < 128:
        return bytes([n])
    if n > 0x7FFFFFFF:
        raise ValueError("name or value too long")
    return struct.pack(">I", n | 0x80000000)


def _bytes(s):
    return s if isinstance(s, bytes) else str(s).encode("utf-8")


def encode_params(params):
    """FCGI_PARAMS content for a dict; a value of None leaves the name out."""
    out = []
    for name, value in params.items():
        if value is None:
            continue
        name, value = _bytes(name), _bytes(value)
        out.append(_length(len(name)) + _length(len(value)) + name + value)
    return b"".join(out)


def chat_params(method="POST", uri="/api/chat",
                content_type="application/json", content_length=None,
                **extra):
    """The parameters nginx would send (/etc/nginx/fastcgi_params), for a
    request to uri. content_type or content_length None leaves it out;
    extra adds or overrides (a value of None removes that one)."""
    path, _, query = uri.partition("?")
    params = {
        "QUERY_STRING": query,
        "REQUEST_METHOD": method,
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": content_length,
        "SCRIPT_NAME": path,
        "REQUEST_URI": uri,
        "DOCUMENT_URI": path,
        "DOCUMENT_ROOT": "/nonexistent",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REQUEST_SCHEME": "http",
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "fcgi_client.py",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000",
        "SERVER_ADDR": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_NAME": "localhost",
        "HTTP_HOST": "localhost",
    }
    params.update(extra)
    return params


# ------------------------------------------------------------- response

class FcgiResponse:
    """A parsed CGI response: status (from "Status:", 200 when absent),
    headers (names lower-cased; the last of repeated names wins),
    header_lines (all of them, in order), body bytes, the application's
    stderr bytes, the FCGI_END_REQUEST statuses, and closed_in (see
    fcgi_request's wait_close)."""

    def __init__(self, stdout, stderr, app_status, protocol_status,
                 elapsed, closed_in=None):
        self.raw = stdout
        self.stderr = stderr
        self.app_status = app_status
        self.protocol_status = protocol_status
        self.elapsed = elapsed
        self.closed_in = closed_in
        head, sep, body = stdout.partition(b"\r\n\r\n")
        if not sep:
            head, sep, body = stdout.partition(b"\n\n")
        if not sep:
            raise FcgiError(f"no end of the CGI headers in {stdout[:200]!r}")
        self.body = body
        self.header_lines = []
        self.headers = {}
        for line in head.decode("latin-1").splitlines():
            name, colon, value = line.partition(":")
            if not colon:
                raise FcgiError(f"bad CGI header line {line!r}")
            self.header_lines.append((name.strip(), value.strip()))
            self.headers[name.strip().lower()] = value.strip()
        status = self.headers.get("status", "200")
        try:
            self.status = int(status.split()[0])
        except (ValueError, IndexError):
            raise FcgiError(f"bad Status header {status!r}") from None

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return (f"<FcgiResponse {self.status} {self.header_lines} "
                f"{self.body[:300]!r}>")


# ------------------------------------------------------------- the call

def _connect(address, timeout):
    if isinstance(address, tuple):
        return socket.create_connection(address, timeout=timeout)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(address))
    except BaseException:
        s.close()
        raise
    return s


def _recv_exact(sock, n, deadline):
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FcgiTimeout("no complete response in time")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(data))
        except socket.timeout:
            raise FcgiTimeout("no complete response in time") from None
        if not chunk:
            raise FcgiError(f"connection closed inside a record "
                            f"({len(data)} of {n} bytes)")
        data += chunk
    return data


def _read_response(sock, deadline):
    stdout, stderr = [], []
    while True:
        version, rtype, rid, length, padding = HEADER.unpack(
            _recv_exact(sock, HEADER.size, deadline))
        content = _recv_exact(sock, length + padding, deadline)[:length]
        if version != FCGI_VERSION_1:
            raise FcgiError(f"record version {version}")
        if rid != REQUEST_ID:
            raise FcgiError(f"record for request id {rid}")
        if rtype == FCGI_STDOUT:
            stdout.append(content)
        elif rtype == FCGI_STDERR:
            stderr.append(content)
        elif rtype == FCGI_END_REQUEST:
            app_status, protocol_status = END_BODY.unpack(content)
            return b"".join(stdout), b"".join(stderr), app_status, \
                protocol_status
        else:
            raise FcgiError(f"unexpected record type {rtype}")


def _seconds_to_close(sock, limit):
    """How long after the response the application closed the connection,
    or None when it kept it open for limit seconds. A shutdown of its
    sending side also reads as EOF here, so the test is a write: it fails
    only once the application's end is really closed."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            sock.send(b"\0")
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def fcgi_request(address, params, body=b"", timeout=5.0, end_stdin=True,
                 wait_close=None):
    """Send one request and return its FcgiResponse.

    address: a unix socket path, or a (host, port) tuple.
    params:  a dict (see chat_params); encoded with 1- and 4-byte lengths.
    body:    the FCGI_STDIN data; None sends no STDIN record at all (for an
             application that must answer without reading the body).
    end_stdin: False leaves the STDIN stream open (no empty record).
    timeout: seconds for the whole exchange; FcgiTimeout past it.
    wait_close: seconds to keep our end open after the response, waiting
             for the application to close its end first; the response's
             closed_in is then that delay (None: it did not close).

    An application may answer and close before it has read all of a large
    body (a 413): a send that fails then is not an error, the response
    already waiting is read.
    """
    start = time.monotonic()
    deadline = start + timeout
    with _connect(address, timeout) as sock:
        out = record(FCGI_BEGIN_REQUEST, BEGIN_BODY.pack(FCGI_RESPONDER, 0))
        out += stream_records(FCGI_PARAMS, encode_params(params))
        try:
            sock.sendall(out)
            if body is not None:
                for i in range(0, len(body), STDIN_PIECE):
                    sock.sendall(record(FCGI_STDIN,
                                        body[i:i + STDIN_PIECE]))
                if end_stdin:
                    sock.sendall(record(FCGI_STDIN))
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered early (and closed); read what it said
        except socket.timeout:
            raise FcgiTimeout("the application stopped reading the "
                              "request") from None
        stdout, stderr, app_status, protocol_status = _read_response(
            sock, deadline)
        elapsed = time.monotonic() - start
        closed_in = (_seconds_to_close(sock, wait_close)
                     if wait_close is not None else None)
    return FcgiResponse(stdout, stderr, app_status, protocol_status,
                        elapsed, closed_in)


def partial_request():
    """A chat request's head and the first byte of its body: the worker
    that accepts it waits for the rest, busy, until the connection
    closes."""
    begin = record(FCGI_BEGIN_REQUEST, BEGIN_BODY.pack(FCGI_RESPONDER, 0))
    return (begin + stream_records(FCGI_PARAMS, encode_params(
        chat_params(content_length=100))) + record(FCGI_STDIN, b"{"))
