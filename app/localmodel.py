#!/usr/bin/env python3
"""localmodel: a small OpenAI-compatible chat-completions server for chatfcgi.

It answers with a rule-based ELIZA, so the whole stack runs offline, and it
can be told over /control to misbehave like a bad model provider (fail, hang,
send garbage, drop the connection, stream slowly or in odd pieces) so that
the integration tests drive every upstream failure path for real.

Standard library only: it runs under a bare Debian /usr/bin/python3.

    python3 app/localmodel.py --host 127.0.0.1 --port 8081 [--verbose]
        [--tls-cert FILE --tls-key FILE]    # HTTPS, as real providers are
"""

import argparse
import collections
import json
import re
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_ID = "local-eliza"
MAX_BODY = 16 * 1024 * 1024
HANG_SECONDS = 600
POLL_SECONDS = 0.01    # how often a waiting thread looks for a gone client
SPLIT_PAUSE = 0.005    # between split_bytes pieces, so each is its own read
RECENT_REQUESTS = 20
RECORDED_HEADERS = ("authorization", "x-request-id", "content-type")
DONE_EVENT = b"data: [DONE]\n\n"
COMMENT_EVENT = b": keep-alive\n\n"
GARBAGE_EVENT = b"data: this is not json\n\n"


# --- ELIZA -----------------------------------------------------------------

REFLECTIONS = {
    "i": "you", "me": "you", "my": "your", "mine": "yours",
    "myself": "yourself", "am": "are", "was": "were", "i'm": "you are",
    "i've": "you have", "i'll": "you will", "i'd": "you would",
    "you": "I", "your": "my", "yours": "mine", "yourself": "myself",
    "are": "am", "you're": "I am", "you've": "I have", "you'll": "I will",
}

# First match wins, so specific phrases come before general ones.  "{0}" is
# the fragment the rule captured, reflected.
RULES = [(re.compile(pattern, re.I), answers) for pattern, answers in [
    (r"^(?:hi|hello|hey|greetings|good (?:morning|afternoon|evening))\b",
     ["Hello. How are you feeling today?", "Hello! What brings you here?",
      "Hi there. What would you like to talk about?"]),
    (r"\bi need (.+)", ["Why do you need {0}?", "Are you sure you need {0}?",
                        "Would it really help you to get {0}?"]),
    (r"\bi feel (.+)", ["Why do you feel {0}?", "Do you often feel {0}?",
                        "Tell me more about feeling {0}."]),
    (r"\bi(?: am|'m) (.+)", ["How long have you been {0}?",
                             "Why do you say you are {0}?",
                             "How does being {0} make you feel?"]),
    (r"\bi (?:want|would like) (.+)", ["Why do you want {0}?",
                                       "What if you got {0}?"]),
    (r"\bbecause (.+)", ["Is that the real reason?",
                         "If {0}, what else must be true?",
                         "What other reasons come to mind?"]),
    (r"\byou(?: are|'re) (.+)", ["Why do you think I am {0}?",
                                 "Does it please you to think I am {0}?"]),
    (r"^you (.+)", ["We were talking about you, not me.",
                    "Why do you say I {0}?"]),
    (r"\bmy (.+)", ["Tell me more about your {0}.",
                    "Why do you say your {0}?"]),
    (r"\?$", ["Why do you ask?", "What do you think?",
              "Perhaps you can answer that yourself."]),
]]

RECALL = re.compile(r"\bwhat did i (?:say|tell you)\b|\bdo you remember\b",
                    re.IGNORECASE)
REPEATED = ["You already told me that. What else is on your mind?",
            "You said that before. Why does it keep coming back to you?"]
FALLBACK = ["Please tell me more.", "I see. Go on.",
            "How does that make you feel?", "Let's explore that further.",
            "Interesting. Why do you say that?"]


def reflect(fragment):
    """Turn the user's point of view into ours: "my job" -> "your job"."""
    return re.sub(r"[A-Za-z']+",
                  lambda m: REFLECTIONS.get(m.group().lower(), m.group()),
                  fragment)


def normalize(text):
    """Lower-case words only, so "I feel sad." repeats "i feel sad"."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def message_text(message):
    """The text of a message; content may be a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content if isinstance(
            part, dict) and isinstance(part.get("text"), str))
    return ""


def eliza_reply(messages):
    """Answer the last user message, deterministically for a conversation.

    The choice among a rule's responses depends on the message text and the
    conversation length, never on randomness, so tests can compare replies.
    """
    said = [message_text(m).strip() for m in messages
            if m.get("role") == "user"]
    if not said or not said[-1]:
        return "Hello. What would you like to talk about?"
    text, earlier = said[-1], said[:-1]
    seed = len(messages) + sum(map(ord, text))
    if RECALL.search(text):
        if not earlier:
            return "You have not told me anything yet. What is on your mind?"
        return f'You said: "{earlier[-1]}". Tell me more about that.'
    if normalize(text) in {normalize(e) for e in earlier}:
        return REPEATED[seed % len(REPEATED)]
    for pattern, responses in RULES:
        match = pattern.search(text)
        if match:
            fragment = match.group(1) if pattern.groups else ""
            fragment = reflect(fragment.rstrip(" .!?,;:"))
            return responses[seed % len(responses)].format(fragment)
    return FALLBACK[seed % len(FALLBACK)]


# --- OpenAI shapes -----------------------------------------------------------

def openai_error(message, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind,
                      "param": None, "code": None}}


def chat_request_problem(request):
    """Why a chat request is unusable, or None; deliberately minimal."""
    if not isinstance(request, dict):
        return "the request body must be a JSON object"
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    if not all(isinstance(m, dict) for m in messages):
        return "each message must be an object"
    return None


def utf8(text):
    # A lone surrogate from the request's JSON becomes "?", not an exception.
    return text.encode("utf-8", "replace")


def dump(obj):
    """JSON in raw UTF-8, as real providers send it, so that split_bytes can
    cut a character in two."""
    return utf8(json.dumps(obj, ensure_ascii=False))


def sse(obj):
    return b"data: " + dump(obj) + b"\n\n"


# --- Tools ---------------------------------------------------------------------

ARGUMENT_PIECE = 4     # bytes of arguments per streamed fragment
DEMO_TOOLS = {"get_time": re.compile(r"\btime\b|\bclock\b", re.I),
              "calculate": re.compile(r"^\s*(?:calculate|compute)\s+(.+)",
                                      re.I)}


def offered_tools(request):
    """The names of the functions the request offers the model."""
    tools = request.get("tools")
    if not isinstance(tools, list):
        return set()
    return {t["function"].get("name") for t in tools if isinstance(t, dict)
            and isinstance(t.get("function"), dict)}


def demo_tool_calls(request):
    """What the bundled model asks of the demo tools, when they are offered
    and the last user message asks for the time or a calculation."""
    messages = request["messages"]
    if messages[-1].get("role") != "user":
        return None
    text, offered = message_text(messages[-1]), offered_tools(request)
    for name, pattern in DEMO_TOOLS.items():
        match = pattern.search(text)
        if name in offered and match:
            arguments = {"expression": match.group(1)} if pattern.groups \
                else {}
            return [{"name": name, "arguments": json.dumps(arguments)}]
    return None


def tool_results_reply(messages):
    """After tool results: say what the tools answered."""
    results = []
    for m in reversed(messages):
        if m.get("role") != "tool":
            break
        results.append(message_text(m))
    return "The tools answered: " + "; ".join(reversed(results))


def with_ids(calls):
    return [{"id": c.get("id") or "call_" + uuid.uuid4().hex[:12],
             "name": c["name"], "arguments": c.get("arguments", "{}")}
            for c in calls]


@dataclass
class Answer:
    """One assistant reply, rendered as a completion or as stream chunks."""
    model: str
    reply: str
    usage: dict
    tool_calls: list | None = None
    index_zero: bool = False    # every call streamed with index 0 (Ollama)
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def for_request(cls, request, behaviour):
        messages = request["messages"]
        calls = behaviour.tool_calls or demo_tool_calls(request)
        if behaviour.reply is not None:
            reply = behaviour.reply
        elif calls:
            reply = ""
        elif messages[-1].get("role") == "tool":
            reply = tool_results_reply(messages)
        else:
            reply = eliza_reply(messages)
        model = request.get("model")
        prompt = sum(len(message_text(m).split()) for m in messages)
        completion = len(reply.split())
        return cls(model if isinstance(model, str) and model else MODEL_ID,
                   reply, {"prompt_tokens": prompt,
                           "completion_tokens": completion,
                           "total_tokens": prompt + completion},
                   with_ids(calls) if calls else None, behaviour.index_zero)

    @property
    def finish_reason(self):
        return "tool_calls" if self.tool_calls else "stop"

    def openai_tool_calls(self):
        return [{"id": c["id"], "type": "function",
                 "function": {"name": c["name"],
                              "arguments": c["arguments"]}}
                for c in self.tool_calls]

    def tool_call_events(self):
        """Each call as OpenAI streams it: id, type and name with empty
        arguments first, then the arguments a few bytes at a time."""
        events = []
        for i, c in enumerate(self.tool_calls):
            index = 0 if self.index_zero else i
            head = {"index": index, "id": c["id"], "type": "function",
                    "function": {"name": c["name"], "arguments": ""}}
            events.append(sse(self.chunk({"tool_calls": [head]})))
            args = c["arguments"]
            for at in range(0, len(args), ARGUMENT_PIECE):
                piece = args[at:at + ARGUMENT_PIECE]
                events.append(sse(self.chunk({"tool_calls": [
                    {"index": index, "function": {"arguments": piece}}]})))
        return events

    def _envelope(self, kind):
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.model}

    def completion(self):
        message = {"role": "assistant", "content": self.reply}
        if self.tool_calls:
            message = {"role": "assistant", "content": self.reply or None,
                       "tool_calls": self.openai_tool_calls()}
        return {**self._envelope("chat.completion"),
                "choices": [{"index": 0, "message": message,
                             "finish_reason": self.finish_reason}],
                "usage": self.usage}

    def chunk(self, delta, finish_reason=None):
        return {**self._envelope("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta,
                             "finish_reason": finish_reason}]}

    def content_events(self):
        """One event per word, spaces kept, so the pieces join to the reply;
        then the tool calls, if any."""
        if self.tool_calls:
            return self.tool_call_events()
        pieces = re.findall(r"\s*\S+\s*", self.reply) or [self.reply]
        return [sse(self.chunk({"role": "assistant", "content": p} if i == 0
                               else {"content": p}))
                for i, p in enumerate(pieces)]

    def closing_events(self, include_usage):
        events = [sse(self.chunk({}, self.finish_reason))]
        if include_usage:
            events.append(sse({**self._envelope("chat.completion.chunk"),
                               "choices": [], "usage": self.usage}))
        return events + [DONE_EVENT]


# --- Demo and test tools -------------------------------------------------------

CALC = re.compile(r"^[0-9+\-*/%(). ]{1,200}$")


def calculate(expression):
    """A tiny calculator: digits, + - * / % and parentheses, nothing else
    (checked before eval, which gets no names at all)."""
    if not isinstance(expression, str) or not CALC.match(expression):
        raise ValueError("only digits, + - * / % ( ) . and spaces")
    try:
        return eval(expression, {"__builtins__": {}}, {})  # noqa: S307
    except (SyntaxError, ArithmeticError, TypeError) as exc:
        raise ValueError(str(exc)) from exc


def tool_query(path):
    """How a test tool at /tools/echo?delay_ms=..&status=..&hang=1 acts."""
    query = dict(p.split("=", 1) for p in path.partition("?")[2].split("&")
                 if "=" in p)
    return (int(query.get("delay_ms", 0)), int(query.get("status", 200)),
            query.get("hang") == "1", query.get("text") == "1")


# --- Test control ------------------------------------------------------------

MODES = ("normal", "fail", "hang", "garbage", "drop")


def _count(value):
    return type(value) is int and value >= 0    # bool is an int: refuse it


def _text(value):
    return value is None or isinstance(value, str)


def _flag(value):
    return isinstance(value, bool)


def _calls(value):
    """tool_calls: a list of {name, arguments[, id]}, all strings."""
    return value is None or (isinstance(value, list) and all(
        isinstance(c, dict) and isinstance(c.get("name"), str) and
        all(isinstance(c.get(k, ""), str) for k in ("arguments", "id"))
        for c in value))


CONTROL_FIELDS = {
    "mode": lambda v: isinstance(v, str) and v in MODES,
    "status": lambda v: type(v) is int and 200 <= v <= 599,
    "body": _text, "reply": _text, "coalesce": _flag, "sse_comments": _flag,
    "delay_ms": _count, "chunk_delay_ms": _count, "split_bytes": _count,
    "drop_after": _count, "times": _count, "retry_after": _count,
    "tool_calls": _calls, "index_zero": _flag,
    "tool_result_failures": _count, "handshake_delay_ms": _count,
}


@dataclass(frozen=True)
class Behaviour:
    """How to answer chat requests; set as a whole by POST /control."""
    mode: str = "normal"
    status: int = 500
    body: str | None = None
    reply: str | None = None
    delay_ms: int = 0
    chunk_delay_ms: int = 0
    split_bytes: int = 0
    drop_after: int = 1
    times: int = 0
    retry_after: int = 0    # mode fail: a Retry-After header (seconds)
    coalesce: bool = False
    sse_comments: bool = False
    tool_calls: list | None = None  # answer with these calls
    index_zero: bool = False        # stream every call with index 0
    tool_result_failures: int = 0   # fail (500) this many requests that
                                    # carry tool results, whatever `times`
    handshake_delay_ms: int = 0     # TLS: wait before each handshake, as a
                                    # provider short of CPU would

    @classmethod
    def from_json(cls, obj):
        """Build from a /control body; ValueError names the first bad field."""
        if not isinstance(obj, dict):
            raise ValueError("the control body must be a JSON object")
        for name, value in obj.items():
            valid = CONTROL_FIELDS.get(name)
            if valid is None:
                raise ValueError(f"unknown control field {name!r}")
            if not valid(value):
                raise ValueError(f"bad value for control field {name!r}")
        return cls(**obj)


class State:
    """What /control sets and /control/stats reports, shared by all threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.open_connections = 0
        self.reset()

    def reset(self):
        with self.lock:
            self.behaviour, self.remaining = Behaviour(), 0
            self.connections = self.requests = self.disconnects = 0
            self.tool_calls = self.tool_result_failures = 0
            self.tls_full = self.tls_resumed = 0
            self.last_disconnect_at = None
            self.recent = collections.deque(maxlen=RECENT_REQUESTS)

    def connection_opened(self):
        with self.lock:
            self.connections += 1
            self.open_connections += 1

    def connection_closed(self):
        with self.lock:
            self.open_connections -= 1

    def set_behaviour(self, behaviour):
        with self.lock:
            self.behaviour, self.remaining = behaviour, behaviour.times
            self.tool_result_failures = behaviour.tool_result_failures

    def take_tool_result_failure(self, request):
        """True when this request, which answers tool calls, is to fail."""
        with self.lock:
            if self.tool_result_failures and \
                    request["messages"][-1].get("role") == "tool":
                self.tool_result_failures -= 1
                return True
            return False

    def take_behaviour(self):
        """The behaviour for one chat request; counts `times` down."""
        with self.lock:
            behaviour = self.behaviour
            if self.remaining:
                self.remaining -= 1
                if not self.remaining:
                    self.behaviour = Behaviour()
            return behaviour

    def record_request(self, headers, body):
        with self.lock:
            self.requests += 1
            self.recent.append({"at": time.time(), "headers": headers,
                                "body": body})

    def count_handshake(self, resumed):
        with self.lock:
            if resumed:
                self.tls_resumed += 1
            else:
                self.tls_full += 1

    def count_tool_call(self):
        with self.lock:
            self.tool_calls += 1

    def record_disconnect(self):
        with self.lock:
            self.disconnects += 1
            self.last_disconnect_at = time.time()

    def stats(self):
        with self.lock:
            return {"connections": self.connections,
                    "open_connections": self.open_connections,
                    "requests": self.requests,
                    "tool_calls": self.tool_calls,
                    "tls_handshakes": {"full": self.tls_full,
                                       "resumed": self.tls_resumed},
                    "disconnects": self.disconnects,
                    "last_disconnect_at": self.last_disconnect_at,
                    "recent": list(self.recent)}


def parse_json(body):
    """The decoded body, or None when it is not JSON at all."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def stream_writes(events, behaviour):
    """The socket writes for a stream and the pause between them."""
    data = b"".join(events)
    if behaviour.coalesce:
        return [data], 0
    if behaviour.split_bytes:
        n = behaviour.split_bytes
        return [data[i:i + n] for i in range(0, len(data), n)], SPLIT_PAUSE
    return events, behaviour.chunk_delay_ms / 1000


# --- HTTP --------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """One client connection; HTTP/1.1 so libcurl can keep it alive."""
    protocol_version = "HTTP/1.1"
    server_version = "localmodel/1"

    def setup(self):
        super().setup()
        # Streamed events are small writes; Nagle would hold them back.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.state = self.server.state
        self.state.connection_opened()
        if isinstance(self.connection, ssl.SSLSocket):
            self.handshake()

    def handshake(self):
        """TLS in this connection's thread, so that a slow or stalled
        client holds up no other; counted as full or resumed."""
        time.sleep(self.state.behaviour.handshake_delay_ms / 1000)
        self.connection.do_handshake()
        self.state.count_handshake(self.connection.session_reused)

    def finish(self):
        try:
            super().finish()
        finally:
            self.state.connection_closed()

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)

    def dispatch(self):
        try:
            self.body = self.read_body()
        except ValueError as exc:
            self.close_connection = True    # the framing is lost
            return self.send_json(400, openai_error(str(exc)))
        path = self.path.split("?", 1)[0]
        methods = ROUTES.get(path)
        if methods is None:
            return self.send_json(404, openai_error(f"no route for {path}",
                                                    "not_found_error"))
        action = methods.get(self.command)
        if action is None:
            return self.send_json(405, openai_error(
                f"{self.command} not allowed on {path}"),
                headers={"Allow": ", ".join(methods)})
        action(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = dispatch

    def read_body(self):
        """The whole request body; it must be consumed for keep-alive."""
        if "Transfer-Encoding" in self.headers:
            raise ValueError("send the body with a Content-Length")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_BODY:
            raise ValueError("bad Content-Length")
        return self.rfile.read(length)

    # --- plain responses

    def send_body(self, status, body, content_type="application/json",
                  headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status, obj, headers=None):
        self.send_body(status, dump(obj), headers=headers)

    # --- the endpoints

    def list_models(self):
        self.send_json(200, {"object": "list", "data": [
            {"id": MODEL_ID, "object": "model", "created": 0,
             "owned_by": "chatfcgi"}]})

    def set_control(self):
        try:
            behaviour = Behaviour.from_json(parse_json(self.body))
        except ValueError as exc:
            return self.send_json(400, openai_error(str(exc)))
        self.state.set_behaviour(behaviour)
        self.send_json(200, {"ok": True})

    def reset_control(self):
        self.state.reset()
        self.send_json(200, {"ok": True})

    def get_stats(self):
        self.send_json(200, self.state.stats())

    def chat_completions(self):
        request = parse_json(self.body)
        headers = {name: self.headers[name] for name in RECORDED_HEADERS
                   if name in self.headers}
        self.state.record_request(headers, request)
        problem = chat_request_problem(request)
        if problem:
            return self.send_json(400, openai_error(problem))
        behaviour = self.state.take_behaviour()
        self.disconnected = False
        if self.state.take_tool_result_failure(request):
            return self.fail(Behaviour())
        if behaviour.mode == "hang":
            return self.hang()
        if not self.wait(behaviour.delay_ms / 1000):
            return
        stream = request.get("stream") is True
        if behaviour.mode == "fail":
            return self.fail(behaviour)
        if behaviour.mode == "garbage":
            return self.garbage(behaviour, stream)
        if behaviour.mode == "drop" and not stream:
            return self.abort()
        answer = Answer.for_request(request, behaviour)
        if not stream:
            return self.send_json(200, answer.completion())
        events = answer.content_events()
        if behaviour.mode == "drop":
            return self.send_stream(events[:behaviour.drop_after], behaviour,
                                    complete=False)
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and \
            options.get("include_usage") is True
        self.send_stream(events + answer.closing_events(include_usage),
                         behaviour)

    # --- tools

    def tool_arguments(self):
        arguments = parse_json(self.body)
        if not isinstance(arguments, dict):
            self.send_json(400, {"error": "the arguments must be an object"})
            return None
        return arguments

    def tool_time(self):
        if self.tool_arguments() is not None:
            self.send_json(200, {"utc": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def tool_calculate(self):
        arguments = self.tool_arguments()
        if arguments is None:
            return
        try:
            self.send_json(200, {"result": calculate(
                arguments.get("expression"))})
        except ValueError as exc:
            self.send_json(422, {"error": str(exc)})

    def tool_echo(self):
        """A test tool: answers its arguments back, after delay_ms, with
        status, or never (hang=1); text=1 answers in plain text."""
        delay_ms, status, hang, text = tool_query(self.path)
        self.state.count_tool_call()
        self.disconnected = False
        if hang:
            return self.hang()
        if not self.wait(delay_ms / 1000):
            return
        if text:
            return self.send_body(status, self.body or b"-", "text/plain")
        self.send_json(status, {"echo": parse_json(self.body)})

    # --- misbehaviour

    def hang(self):
        """Say nothing until the client gives up, then close."""
        self.wait(HANG_SECONDS)
        self.close_connection = True

    def fail(self, behaviour):
        headers = ({"Retry-After": str(behaviour.retry_after)}
                   if behaviour.retry_after else None)
        if behaviour.body is None:
            return self.send_json(behaviour.status, openai_error(
                "local model told to fail", "server_error"), headers)
        self.send_body(behaviour.status, utf8(behaviour.body),
                       headers=headers)

    def garbage(self, behaviour, stream):
        """A 200 the client cannot use: not the JSON or the SSE it expects."""
        if stream:
            return self.send_stream([GARBAGE_EVENT] * 3,
                                    behaviour, close=True)
        body = behaviour.body
        if body is None:
            body = '{"unexpected": true}'
        self.send_body(200, utf8(body))

    def abort(self):
        """Cut the connection: no response, or no end to the one begun."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- streaming

    def send_stream(self, events, behaviour, complete=True, close=False):
        """Send SSE events as a chunked body, paced as `behaviour` says.

        complete=False cuts the connection where a proper end would be.
        """
        if behaviour.sse_comments:
            events = [e for event in events for e in (COMMENT_EVENT, event)]
        writes, pause = stream_writes(events, behaviour)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            for i, data in enumerate(writes):
                if i and not self.wait(pause):
                    return
                # One write is one send(): the framing and the data together.
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            if complete:
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.abort()
        except ConnectionError:
            self.client_went_away()

    # --- noticing a client that went away

    def wait(self, seconds):
        """Sleep, but return False as soon as the client hangs up."""
        deadline = time.monotonic() + seconds
        while True:
            if self.client_gone():
                self.client_went_away()
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, POLL_SECONDS))

    def client_gone(self):
        """True once the peer has closed: a read would see end of file.
        Over TLS the peek is of the raw socket, where a client waiting for
        its answer sends nothing but, as it goes, a close_notify alert."""
        try:
            peek = socket.MSG_PEEK | socket.MSG_DONTWAIT
            if isinstance(self.connection, ssl.SSLSocket):
                return socket.socket.recv(self.connection, 1, peek) != \
                    b"-"  # any byte, or end of file
            return self.connection.recv(1, peek) == b""
        except BlockingIOError:
            return False    # still there, just quiet
        except OSError:
            return True

    def client_went_away(self):
        """Count the disconnect once per request, and stop serving it."""
        self.close_connection = True
        if not self.disconnected:
            self.disconnected = True
            self.state.record_disconnect()


ROUTES = {
    "/v1/chat/completions": {"POST": Handler.chat_completions},
    "/v1/models": {"GET": Handler.list_models},
    "/control": {"POST": Handler.set_control},
    "/control/reset": {"POST": Handler.reset_control},
    "/control/stats": {"GET": Handler.get_stats},
    "/tools/get_time": {"POST": Handler.tool_time},
    "/tools/calculate": {"POST": Handler.tool_calculate},
    "/tools/echo": {"POST": Handler.tool_echo},
}


class Server(ThreadingHTTPServer):
    daemon_threads = True       # a hanging answer must not block exit
    allow_reuse_address = True
    request_queue_size = 128    # socketserver's 5 drops SYNs under load tests

    def __init__(self, address, verbose, tls=None):
        self.state = State()
        self.verbose = verbose
        super().__init__(address, Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)

    def handle_error(self, request, client_address):
        # A client vanishing mid-answer, or mid-handshake, is routine here,
        # not a bug to report.
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            super().handle_error(request, client_address)



def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081,
                        help="0 picks a free port (printed once listening)")
    parser.add_argument("--verbose", action="store_true",
                        help="log every request to stderr")
    parser.add_argument("--tls-cert", help="serve HTTPS with this PEM "
                        "certificate (chain), and --tls-key")
    parser.add_argument("--tls-key")
    return parser.parse_args(argv)


def tls_context(args):
    """The server's TLS context, or None for plain HTTP."""
    if not args.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


def stop(signum, frame):
    raise SystemExit(0)


def main(argv=None):
    args = parse_args(argv)
    try:
        server = Server((args.host, args.port), args.verbose,
                        tls_context(args))
    except (OSError, ssl.SSLError) as exc:
        sys.exit(f"localmodel: cannot listen on {args.host}:{args.port}: "
                 f"{exc}")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    scheme = "https" if args.tls_cert else "http"
    print(f"localmodel listening on {scheme}://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
