#!/usr/bin/python3
"""The module layout of doc/DESIGN.md, checked from the sources' includes.

One way down: no two modules include each other (nor any longer circle);
master.c sees no request-path header, even through other headers; chat is
the only module that includes both the Redis schema (chatdb) and the model
(llm); the lower modules include nothing of the web side. Exits 1 naming
every broken rule.
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r'^\s*#\s*include\s+"([a-z0-9_]+)\.h"', re.M)

REQUEST_PATH = {"route", "guard", "chat", "v1", "metrics", "chatdb", "store",
                "cluster", "llm", "plan", "exchange", "answer", "sse", "http",
                "fcgi", "messages"}
WEB_SIDE = {"fcgi", "worker", "master", "http"}
LOWER = ["llm", "store", "cluster", "sse", "json"]


def includes(path):
    return set(INCLUDE.findall(path.read_text()))


def module_graph():
    """module -> the modules its .c and .h include (itself left out)."""
    graph = {}
    for path in list((ROOT / "app").glob("*.c")) + \
            list((ROOT / "include").glob("*.h")):
        graph.setdefault(path.stem, set()).update(includes(path))
    for mod, deps in graph.items():
        deps.discard(mod)
    return graph


def header_closure(start):
    """Every header a file sees, through the headers it includes."""
    seen, todo = set(), set(includes(start))
    while todo:
        name = todo.pop()
        header = ROOT / "include" / f"{name}.h"
        if name in seen or not header.exists():
            continue
        seen.add(name)
        todo |= includes(header)
    return seen


def circles(graph):
    """Each include circle once, as a list of modules."""
    found, state = [], {}

    def visit(mod, stack):
        state[mod] = "open"
        stack.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
    return found


def problems():
    graph = module_graph()
    for circle in circles(graph):
        yield "include circle: " + " -> ".join(circle)
    seen = header_closure(ROOT / "app" / "master.c") & REQUEST_PATH
    if seen:
        yield f"master.c sees request-path headers: {sorted(seen)}"
    both = sorted(m for m, d in graph.items() if {"chatdb", "llm"} <= d)
    if both != ["chat"]:
        yield f"modules including both chatdb and llm: {both} (want chat)"
    for mod in LOWER:
        bad = graph.get(mod, set()) & WEB_SIDE
        if bad:
            yield f"{mod} includes {sorted(bad)}"


def main():
    found = list(problems())
    for line in found:
        print(f"layout: {line}", file=sys.stderr)
    if not found:
        print("layout: one way down, no circles; master.c sees no "
              "request-path header; only chat uses both chatdb and llm")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
