"""The chat page (app/www) through nginx: its headers, then the browser test
(tests/browser/chat.test.mjs: Debian's Chromium driven by playwright-core)
against this module's stack.

Needs the Debian packages chromium, nodejs and npm; `npm ci` runs in
tests/browser when its node_modules is missing (registry access needed
once). Skipped only when /usr/bin/chromium is absent. Screenshots go to
tests/out/ (chat-desktop.png, chat-phone.png, chat-key.png; chat-failure.png
on failure).
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BROWSER_DIR = REPO / "tests" / "browser"
OUT_DIR = REPO / "tests" / "out"
CHROMIUM = "/usr/bin/chromium"
CLIENT_KEY = "sk-page-test-key"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; img-src 'self'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")

UNREADABLE = ("nginx could not read {path} ({status}): its workers run as "
              "www-data when the stack starts as root; app/www and every "
              "directory above it must be readable by others (chmod o+rX)")


def _get(http, stack, path):
    return http.get(stack.url + path, timeout=5)


def assert_page_headers(r, path):
    assert r.headers.get("Content-Security-Policy") == CSP, path
    assert r.headers.get("X-Content-Type-Options") == "nosniff", path
    assert r.headers.get("Referrer-Policy") == "no-referrer", path


@pytest.mark.parametrize("path, ctype", [
    ("/", "text/html"),
    ("/index.html", "text/html"),
    ("/chat.js", "text/javascript"),
    ("/style.css", "text/css"),
    ("/favicon.svg", "image/svg+xml"),
])
def test_static_files_with_security_headers(stack, http, path, ctype):
    r = _get(http, stack, path)
    assert r.status_code == 200, UNREADABLE.format(path=path,
                                                   status=r.status_code)
    assert r.headers["Content-Type"].split(";")[0].strip() == ctype
    assert_page_headers(r, path)
    if ctype == "text/html":
        assert r.headers["Content-Type"].lower().endswith("charset=utf-8")
        assert '<label for="message"' in r.text
        assert 'aria-live="polite"' in r.text
        assert 'src="/chat.js"' in r.text


@pytest.mark.parametrize("path", [
    "/nope", "/nope/", "/index.html/x", "/www/index.html",
    "/conf/chatfcgi.conf", "/app/www/index.html", "/.git/HEAD",
])
def test_unknown_paths_are_404_json(stack, http, path):
    r = _get(http, stack, path)
    assert r.status_code == 404, (path, r.status_code, r.text[:200])
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json()["error"]["code"] == "not_found"


def test_api_still_reaches_the_app(stack, http):
    r = _get(http, stack, "/api/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = _get(http, stack, "/api/chat/no-such-session")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    # The API keeps its own headers: the page's CSP is not stamped on it.
    assert "Content-Security-Policy" not in r.headers


def _run(argv, cwd, env=None, timeout=120):
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _node_modules_ready():
    return (BROWSER_DIR / "node_modules" / "playwright-core" /
            "package.json").is_file()


@pytest.fixture(scope="module")
def browser_tools():
    """node with playwright-core installed; skips without Chromium."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: the browser test needs Debian's "
                    f"chromium package (apt-get install chromium)")
    node = shutil.which("node")
    assert node, ("node is missing: the browser test needs Debian's nodejs "
                  "package (apt-get install nodejs)")
    if not _node_modules_ready():
        npm = shutil.which("npm")
        assert npm, ("npm is missing and tests/browser/node_modules is not "
                     "installed: apt-get install npm")
        p = _run([npm, "ci", "--no-audit", "--no-fund"], BROWSER_DIR,
                 timeout=300)
        assert p.returncode == 0 and _node_modules_ready(), (
            f"npm ci in {BROWSER_DIR} failed ({p.returncode}):\n"
            f"{p.stdout}\n{p.stderr}")
    return node


def _run_page_test(node, st, shots, extra_env=None):
    """tests/browser/chat.test.mjs against st; shots must be written."""
    for shot in shots:
        shot.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update({"CHAT_PAGE_URL": st.url + "/",
                "CHAT_MODEL_URL": st.model_url,
                "CHAT_OUT_DIR": str(OUT_DIR),
                "CHROMIUM_BIN": CHROMIUM})
    env.update(extra_env or {})
    p = _run([node, str(BROWSER_DIR / "chat.test.mjs")], REPO, env=env,
             timeout=90)
    print(p.stdout)
    assert p.returncode == 0, (
        f"node tests/browser/chat.test.mjs exited {p.returncode}\n"
        f"--- stdout ---\n{p.stdout}\n--- stderr ---\n{p.stderr}")
    for shot in shots:
        assert shot.is_file() and shot.stat().st_size > 0, shot


def test_chat_page_in_chromium(stack, model, browser_tools):
    """Streaming, history after reload, New chat + DELETE, phone layout,
    markup shown as text, errors in words, focus and contrast: see the
    checks listed by tests/browser/chat.test.mjs."""
    (OUT_DIR / "chat-desktop-dark.png").unlink(missing_ok=True)
    (OUT_DIR / "chat-failure.png").unlink(missing_ok=True)
    _run_page_test(browser_tools, stack, [OUT_DIR / "chat-desktop.png",
                                          OUT_DIR / "chat-phone.png"])


@pytest.fixture(scope="module")
def keyed_stack(stack_factory):
    digest = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    return stack_factory({"CHATFCGI_CLIENT_KEYS": digest})


def test_chat_page_with_client_key(keyed_stack, browser_tools):
    """With client keys on, a 401 brings up the access key field; once
    the key is entered the page chats, reloads the history and deletes
    with it, and a wrong key is explained and can be replaced."""
    (OUT_DIR / "chat-failure.png").unlink(missing_ok=True)
    _run_page_test(browser_tools, keyed_stack, [OUT_DIR / "chat-key.png"],
                   {"CHAT_CLIENT_KEY": CLIENT_KEY})
