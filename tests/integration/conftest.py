"""Fixtures for the integration tests: each test module gets its own local
stack (Redis, local model, chatfcgi pool, nginx; deploy/local/stack.py) on
free loopback ports, and it is always stopped.

Fixtures
  stack          module scope. A started Stack (see deploy/local/stack.py:
                 .url, .model_url, .redis_port, .socket_path, .pid(name),
                 .log_tail(name, n), .stop_service(name), .start_service(name))
                 in a fresh /tmp/cfXXXXXXXX run dir. A module sets extra
                 chatfcgi settings with a module attribute, e.g.
                     STACK_ENV = {"CHATFCGI_UPSTREAM_TIMEOUT_MS": "500"}
                 (a value of None removes a variable). Stopped and its dir
                 removed after the module; the dir is kept, and its path
                 printed at the end of the run, when a test of the module
                 failed.
  stack_factory  module scope. make(env=None) -> another started Stack with
                 its own env, stopped (and cleaned) with the module.
  model          function scope. Drives the stack's local model through its
                 control API: model.set(**fields) -> POST /control,
                 model.reset() -> POST /control/reset, model.stats() ->
                 GET /control/stats. The model is reset before and after every
                 test that takes this fixture, so no mode leaks into the next
                 test. Skips the test when the stack has no local model.
  http           session scope. A requests.Session that ignores the proxy
                 settings of the environment (everything is on loopback).
  free_ports     free_ports(n) -> n distinct free loopback TCP ports.

Environment: the test stacks take CHATFCGI_BIN from the caller's environment
(so `CHATFCGI_BIN=bin/chatfcgi-asan make test` runs them on the ASan build)
and drop every other CHATFCGI_* variable of the shell, so that settings meant
for `make run` (a real provider's URL and key, a worker count) never change
what the tests see: a module says what it needs in STACK_ENV. Other variables
(ASAN_OPTIONS, ...) pass through.

On a failed test the last lines of every service's log are attached to its
report. When a stack stops, chatfcgi's log is searched for sanitizer reports
(ASan/LSan/UBSan); one fails the module's teardown and keeps the run dir.

Helpers that are not fixtures (assert_json_error, LocalModel, new_session)
live in helpers.py, a plain module the tests import.
"""

import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "local"))

import stack as stack_mod  # noqa: E402  (deploy/local/stack.py)
from helpers import LocalModel, new_session  # noqa: E402

LOG_LINES = 30

_failed_modules = set()
_kept_dirs = []


def free_ports_list(n):
    """n distinct free TCP ports on 127.0.0.1 (held open together while
    picked, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stack_env(extra=None):
    """Settings for a test Stack: the shell's CHATFCGI_* removed (None),
    except CHATFCGI_BIN, then the module's own. No drop-in config unless a
    module asks (None brings back the bundled model's demo tools)."""
    env = {k: None for k in os.environ
           if k.startswith("CHATFCGI_") and k != "CHATFCGI_BIN"}
    env["CHATFCGI_INCLUDE"] = ""
    env.update(extra or {})
    return env


SANITIZER = re.compile(r"ERROR: \w*Sanitizer|runtime error:|"
                       r"Sanitizer has encountered")


def sanitizer_report(log_path, context=40):
    """The first sanitizer report in a log (ASan, LSan, UBSan), or ''. With
    CHATFCGI_BIN=bin/chatfcgi-asan a worker that trips one dies and the
    master replaces it, so no test would notice otherwise."""
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for i, line in enumerate(lines):
        if SANITIZER.search(line):
            return "\n".join(lines[i:i + context])
    return ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    _failed_modules.add(getattr(item.module, "__file__", None))
    st = getattr(item, "funcargs", {}).get("stack")
    if isinstance(st, stack_mod.Stack):
        for name in st.services:
            rep.sections.append((f"{name} log ({st.log_path(name)})",
                                 st.log_tail(name, LOG_LINES) or "(empty)"))


def pytest_terminal_summary(terminalreporter):
    if _kept_dirs:
        terminalreporter.section("kept stack run dirs")
        for d in _kept_dirs:
            terminalreporter.write_line(f"{d}  (logs: *.log, nginx/access.log)")


@pytest.fixture(scope="session")
def free_ports():
    return free_ports_list


@pytest.fixture(scope="session")
def http():
    s = new_session()
    yield s
    s.close()


@pytest.fixture(scope="module")
def stack_factory(request):
    made = []  # (Stack, started)

    def make(env=None):
        run_dir = tempfile.mkdtemp(prefix="cf")
        port, model_port, redis_port = free_ports_list(3)
        st = stack_mod.Stack(run_dir, port, model_port=model_port,
                             redis_port=redis_port, env=stack_env(env))
        made.append([st, False])
        st.start()  # on failure it has stopped what it started
        made[-1][1] = True
        return st

    yield make
    module_failed = request.module.__file__ in _failed_modules
    reports = []
    for st, started in reversed(made):
        st.stop()
        found = sanitizer_report(st.log_path("chatfcgi"))
        if found:
            reports.append(f"{st.log_path('chatfcgi')}:\n{found}")
        if module_failed or not started or found:
            _kept_dirs.append(str(st.run_dir))
        else:
            shutil.rmtree(st.run_dir, ignore_errors=True)
    if reports:
        pytest.fail("sanitizer reports in chatfcgi's log (a worker may have "
                    "died and been replaced unseen):\n" + "\n".join(reports),
                    pytrace=False)


@pytest.fixture(scope="module")
def stack(request, stack_factory):
    return stack_factory(getattr(request.module, "STACK_ENV", None))


@pytest.fixture
def model(stack, http):
    if stack.model_url is None:
        pytest.skip("this stack uses an external upstream, not the local "
                    "model")
    m = LocalModel(stack.model_url, http)
    m.reset()
    yield m
    try:
        m.reset()
    except requests.RequestException:
        pass  # the test may have stopped the model; the next setup resets
