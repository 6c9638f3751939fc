"""doc/API.md's error table against the code: every (status, code) pair
that chatfcgi sends (its send_error calls in app/*.c) or the nginx
recipes answer themselves is in the table, and the table lists no pair
that nothing sends. Static: it reads files and starts nothing."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TABLE_ROW = re.compile(r"^\| (\d{3}) \| `(\w+)` \|", re.M)
SEND_ERROR = re.compile(r"send_error\(")
NGINX_ERROR = re.compile(r"return (\d{3}) '\{\"error\":\{\"code\":\"(\w+)\"")
NGINX_RECIPES = ("deploy/nginx/chatfcgi.conf", "deploy/local/nginx.conf.in")


def documented():
    text = (REPO / "doc" / "API.md").read_text()
    table = text[text.index("## Errors"):]
    return {(int(s), c) for s, c in TABLE_ROW.findall(table)}


def call_args(text, start):
    """The arguments of the C call whose "(" ends at start, split at the
    commas outside parentheses and string literals."""
    args, depth, begin, quoted = [], 0, start, False
    for i in range(start, len(text)):
        ch = text[i]
        if ch == '"' and text[i - 1] != "\\":
            quoted = not quoted
        elif quoted:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth == 0:
            return args + [text[begin:i]]
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(text[begin:i])
            begin = i + 1
    return args


def sent_by_the_code():
    """(status, code) of every send_error call; a status or code chosen by
    a ?: gives one pair per branch, in order."""
    pairs = set()
    for src in sorted((REPO / "app").glob("*.c")):
        text = src.read_text()
        for call in SEND_ERROR.finditer(text):
            args = call_args(text, call.end())
            if len(args) < 3:
                continue  # the definition's own parameter list
            statuses = [int(s) for s in re.findall(r"\b(\d{3})\b", args[1])]
            codes = re.findall(r'"(\w+)"', args[2])
            if not statuses or not codes:
                continue  # a forwarding call: status and code are variables
            if len(statuses) == 1:
                statuses *= len(codes)
            assert len(statuses) == len(codes), (src.name, args)
            pairs |= set(zip(statuses, codes))
    return pairs


def answered_by_nginx():
    pairs = set()
    for recipe in NGINX_RECIPES:
        text = (REPO / recipe).read_text()
        pairs |= {(int(s), c) for s, c in NGINX_ERROR.findall(text)}
    return pairs


def test_every_error_sent_is_documented():
    missing = (sent_by_the_code() | answered_by_nginx()) - documented()
    assert not missing, f"not in doc/API.md's error table: {sorted(missing)}"


def test_every_documented_error_is_sent():
    unsent = documented() - sent_by_the_code() - answered_by_nginx()
    assert not unsent, f"in doc/API.md but sent by nothing: {sorted(unsent)}"


def test_the_scan_sees_the_ternary_and_the_405():
    """The scan itself: the model failure's two pairs (chosen by ?:) and
    the 405 of http_send_not_allowed are found."""
    sent = sent_by_the_code()
    assert {(502, "upstream_error"), (504, "upstream_timeout"),
            (405, "method_not_allowed")} <= sent, sorted(sent)
