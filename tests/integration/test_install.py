"""make install and make uninstall, staged under a DESTDIR.

Nothing is installed on this machine: every `make install` and
`make uninstall` gets a DESTDIR in a temporary directory, and runs in a copy
of the source tree (built once, then copied with its objects), so that the
checkout's own build/ and bin/ are left alone and the tests may add the
files that are installed only when present (deploy/systemd/, app/www/).
"""

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from source_tree import REPO, clean_env, copy_source, make, run, verify_units

# What the Makefile derives from PREFIX.
LAYOUT = {
    "/usr": {"sysconf": "/etc"},
    "/usr/local": {"sysconf": "/usr/local/etc"},
}
UNITS = ("chatfcgi.service", "chatfcgi.socket", "chatfcgi-status.socket")
DOCS = ("README.md", "LICENSE")

# Where a real install would go: a test run must change none of them.
REAL_PATHS = [
    Path(p) / rel
    for p in ("/usr", "/usr/local")
    for rel in ("sbin/chatfcgi", "share/man/man8/chatfcgi.8",
                "share/doc/chatfcgi", "share/chatfcgi",
                "lib/systemd/system/chatfcgi.service",
                "lib/systemd/system/chatfcgi.socket",
                "lib/systemd/system/chatfcgi-status.socket")
] + [Path("/etc/chatfcgi"), Path("/usr/local/etc/chatfcgi")]


def conf_path(prefix):
    return f"{LAYOUT[prefix]['sysconf']}/chatfcgi/chatfcgi.conf"


def rel(path):
    return path.lstrip("/")


def web_files(tree):
    """app/www's files as install sees them (names starting with a dot
    skipped), relative to app/www."""
    www = tree / "app" / "www"
    if not www.is_dir():
        return []
    out = []
    for p in www.rglob("*"):
        r = p.relative_to(www)
        if p.is_file() and not any(part.startswith(".") for part in r.parts):
            out.append(r.as_posix())
    return sorted(out)


def expected_files(tree, prefix):
    """Every file install puts under DESTDIR, with its mode."""
    p = rel(prefix)
    files = {
        f"{p}/sbin/chatfcgi": 0o755,
        rel(conf_path(prefix)): 0o640,
        f"{p}/share/man/man8/chatfcgi.8": 0o644,
    }
    for d in DOCS:
        files[f"{p}/share/doc/chatfcgi/{d}"] = 0o644
    for u in UNITS:
        if (tree / "deploy" / "systemd" / u).is_file():
            files[f"{p}/lib/systemd/system/{u}"] = 0o644
    for w in web_files(tree):
        files[f"{p}/share/chatfcgi/www/{w}"] = 0o644
    return files


def files_under(root):
    """Relative paths of every non-directory under root."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if not p.is_dir() or p.is_symlink()}


def mode(path):
    return stat.S_IMODE(path.lstat().st_mode)


def check_tree(tree, dest, prefix):
    want = expected_files(tree, prefix)
    assert files_under(dest) == set(want)
    for path, m in want.items():
        assert mode(dest / path) == m, f"{path}: {oct(mode(dest / path))}"
    p = rel(prefix)
    conf = dest / rel(conf_path(prefix))
    assert conf.read_bytes() == (tree / "conf" / "chatfcgi.conf").read_bytes()
    assert (dest / p / "share/man/man8/chatfcgi.8").read_bytes() == \
        (tree / "doc" / "chatfcgi.8").read_bytes()
    for d in DOCS:
        assert (dest / p / "share/doc/chatfcgi" / d).read_bytes() == \
            (tree / d).read_bytes()
    for w in web_files(tree):
        assert (dest / p / "share/chatfcgi/www" / w).read_bytes() == \
            (tree / "app/www" / w).read_bytes()
    for d in (conf.parent, dest / p / "share/doc/chatfcgi"):
        assert mode(d) == 0o755, d


def check_binary(dest, prefix):
    """The installed binary names the installed config as its default, and
    accepts it."""
    binary = dest / rel(prefix) / "sbin" / "chatfcgi"
    r = run([binary, "-h"])
    assert r.returncode == 0, r.stderr
    assert f"configuration file (default {conf_path(prefix)})" in r.stdout
    assert str(dest) not in r.stdout
    r = run([binary, "-v"])
    assert r.returncode == 0 and r.stdout.startswith("chatfcgi "), r
    conf = dest / rel(conf_path(prefix))
    r = run([binary, "-t", "-c", conf])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"configuration {conf} is valid" in r.stdout


def check_man_page(page):
    r = run(["groff", "-man", "-ww", "-z", page])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = subprocess.run(["man", "--warnings", "-l", str(page)],
                       env={**clean_env(), "MANPAGER": "cat", "PAGER": "cat",
                            "MANWIDTH": "80"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "CHATFCGI(8)" in r.stdout and "chatfcgi -" in r.stdout
    if shutil.which("mandoc"):
        r = run(["mandoc", "-T", "lint", page])
        assert r.returncode == 0 and r.stdout + r.stderr == "", \
            r.stdout + r.stderr


@pytest.fixture(scope="module", autouse=True)
def no_real_install():
    """Whatever happens, nothing outside the DESTDIRs changes."""
    def snapshot():
        return {p: (p.lstat().st_mtime_ns if p.exists() or p.is_symlink()
                    else None) for p in REAL_PATHS}
    before = snapshot()
    yield
    assert snapshot() == before


@pytest.fixture(scope="module")
def built_tree(tmp_path_factory):
    """A copy of the source tree, built once with the default PREFIX."""
    tree = copy_source(tmp_path_factory.mktemp("built") / "src")
    make(tree, "all")
    return tree


@pytest.fixture
def tree(built_tree, tmp_path):
    """A fresh copy of the built tree (objects kept up to date: copy2
    preserves modification times)."""
    t = tmp_path / "src"
    shutil.copytree(built_tree, t, symlinks=True)
    return t


@pytest.mark.parametrize("prefix", ["/usr", "/usr/local"])
def test_install_reinstall_uninstall(tree, tmp_path, prefix):
    dest = tmp_path / "dest"
    make(tree, "install", f"DESTDIR={dest}", f"PREFIX={prefix}")
    check_tree(tree, dest, prefix)
    check_binary(dest, prefix)
    check_man_page(dest / rel(prefix) / "share/man/man8/chatfcgi.8")

    # A second install keeps a changed config and puts the new default
    # beside it.
    conf = dest / rel(conf_path(prefix))
    changed = conf.read_text() + "\n# changed by the administrator\n"
    conf.write_text(changed)
    out = make(tree, "install", f"DESTDIR={dest}", f"PREFIX={prefix}")
    assert "chatfcgi.conf.dist" in out
    assert conf.read_text() == changed
    dist = conf.with_name("chatfcgi.conf.dist")
    assert dist.read_bytes() == (tree / "conf/chatfcgi.conf").read_bytes()
    assert mode(dist) == 0o640
    assert files_under(dest) == \
        set(expected_files(tree, prefix)) | {rel(str(dist)[len(str(dest)):])}
    check_binary(dest, prefix)

    # Files of others beside ours stay.
    p = dest / rel(prefix)
    others = [p / "sbin/other-daemon", p / "share/man/man8/other.8",
              p / "share/doc/other/README"]
    for o in others:
        o.parent.mkdir(parents=True, exist_ok=True)
        o.write_text("not chatfcgi's\n")

    make(tree, "uninstall", f"DESTDIR={dest}", f"PREFIX={prefix}")
    assert files_under(dest) == \
        {rel(conf_path(prefix))} | {o.relative_to(dest).as_posix()
                                    for o in others}
    assert conf.read_text() == changed
    assert not (p / "share/doc/chatfcgi").exists()
    assert not (p / "share/chatfcgi").exists()


def test_units_and_web_page_are_installed_when_present(tree, tmp_path):
    systemd = tree / "deploy" / "systemd"
    systemd.mkdir(parents=True, exist_ok=True)
    (systemd / "chatfcgi.service").write_text(
        "[Service]\nType=notify\n"
        "ExecStartPre=/usr/sbin/chatfcgi -t -c /etc/chatfcgi/chatfcgi.conf\n"
        "ExecStart=/usr/sbin/chatfcgi -c /etc/chatfcgi/chatfcgi.conf\n"
        "ExecReload=/bin/kill -HUP $MAINPID\n"
        "EnvironmentFile=-/etc/chatfcgi/env\n"
        "ReadOnlyPaths=/etc/chatfcgi /run/chatfcgi /opt/etc/chatfcgi\n")
    (systemd / "chatfcgi.socket").write_text(
        "[Socket]\nListenStream=/run/chatfcgi/chatfcgi.sock\n")
    www = tree / "app" / "www"
    (www / "js").mkdir(parents=True, exist_ok=True)
    (www / "index.html").write_text("<!doctype html><title>chat</title>\n")
    (www / "js" / "app.js").write_text("// chat client\n")
    (www / ".editor-swap").write_text("not for installing\n")

    dest = tmp_path / "local"
    make(tree, "install", f"DESTDIR={dest}", "PREFIX=/usr/local")
    check_tree(tree, dest, "/usr/local")
    units = dest / "usr/local/lib/systemd/system"
    assert (units / "chatfcgi.service").read_text() == (
        "[Service]\nType=notify\n"
        "ExecStartPre=/usr/local/sbin/chatfcgi -t -c "
        "/usr/local/etc/chatfcgi/chatfcgi.conf\n"
        "ExecStart=/usr/local/sbin/chatfcgi -c "
        "/usr/local/etc/chatfcgi/chatfcgi.conf\n"
        "ExecReload=/bin/kill -HUP $MAINPID\n"
        "EnvironmentFile=-/usr/local/etc/chatfcgi/env\n"
        "ReadOnlyPaths=/usr/local/etc/chatfcgi /run/chatfcgi "
        "/opt/etc/chatfcgi\n")
    assert (units / "chatfcgi.socket").read_bytes() == \
        (systemd / "chatfcgi.socket").read_bytes()
    assert not (dest / "usr/local/share/chatfcgi/www/.editor-swap").exists()

    # For PREFIX=/usr the units are installed as written.
    dest_usr = tmp_path / "usr"
    make(tree, "install", f"DESTDIR={dest_usr}", "PREFIX=/usr")
    check_tree(tree, dest_usr, "/usr")
    for u in UNITS:
        assert (dest_usr / "usr/lib/systemd/system" / u).read_bytes() == \
            (systemd / u).read_bytes()

    # An unchanged config goes too: nothing is left.
    for d, prefix in ((dest, "/usr/local"), (dest_usr, "/usr")):
        make(tree, "uninstall", f"DESTDIR={d}", f"PREFIX={prefix}")
        assert files_under(d) == set()
        assert not (d / rel(LAYOUT[prefix]["sysconf"]) / "chatfcgi").exists()
        assert not (d / rel(prefix) / "share/chatfcgi").exists()


def unit_values(text, key):
    """Every value of key= in a unit's text, in order."""
    return [line.split("=", 1)[1].strip() for line in text.splitlines()
            if line.startswith(key + "=")]


@pytest.mark.parametrize("prefix", ["/usr", "/usr/local"])
def test_installed_units_start_the_installed_binary(tree, tmp_path, prefix):
    """The real units of deploy/systemd, as make install leaves them: every
    unit the service needs is there, its commands name the installed
    binary and configuration, and systemd-analyze verify accepts them with
    the staged binary standing in for the installed one."""
    dest = tmp_path / "dest"
    make(tree, "install", f"DESTDIR={dest}", f"PREFIX={prefix}")
    units = dest / rel(prefix) / "lib/systemd/system"
    service = (units / "chatfcgi.service").read_text()
    binary = f"{prefix}/sbin/chatfcgi"
    for needed in (unit_values(service, "Requires") +
                   unit_values(service, "Sockets")):
        for name in needed.split():
            assert (units / name).is_file(), f"{name} is not installed"
    for command in (unit_values(service, "ExecStartPre") +
                    unit_values(service, "ExecStart")):
        words = command.split()
        assert words[0] == binary, command
        assert os.access(dest / rel(binary), os.X_OK), binary
        assert words[words.index("-c") + 1] == conf_path(prefix), command
        assert (dest / rel(conf_path(prefix))).is_file()

    output = verify_units([units / n for n in UNITS], binary,
                          dest / rel(binary), tmp_path / "staged")
    assert output == "", output


def test_units_and_web_page_are_skipped_when_absent(tree, tmp_path):
    shutil.rmtree(tree / "deploy" / "systemd", ignore_errors=True)
    shutil.rmtree(tree / "app" / "www", ignore_errors=True)
    dest = tmp_path / "dest"
    make(tree, "install", f"DESTDIR={dest}", "PREFIX=/usr")
    check_tree(tree, dest, "/usr")
    assert not (dest / "usr/lib").exists()
    assert not (dest / "usr/share/chatfcgi").exists()
    make(tree, "uninstall", f"DESTDIR={dest}", "PREFIX=/usr")
    assert files_under(dest) == set()


def test_prefix_change_rebuilds_the_default_config_path(tree, tmp_path):
    """The objects are shared between builds: switching PREFIX back and
    forth must never install a main.o compiled for another prefix."""
    for i, prefix in enumerate(["/usr", "/usr/local", "/usr", "/usr"]):
        dest = tmp_path / f"d{i}"
        make(tree, "install", f"DESTDIR={dest}", f"PREFIX={prefix}")
        check_binary(dest, prefix)
    # The plain build follows the default PREFIX again.
    make(tree, "all")
    r = run([tree / "bin" / "chatfcgi", "-h"])
    assert f"(default {conf_path('/usr/local')})" in r.stdout
    # Nothing is rebuilt when nothing changed.
    assert "main.o" not in make(tree, "all")


def _conf_keys():
    """(section, name, default, env alias or None) of every key in
    app/conf.c's table."""
    src = (REPO / "app" / "conf.c").read_text()
    table = re.search(r"static const struct conf_key keys\[\] = \{(.*?)\n\};",
                      src, re.S).group(1)
    entries = re.findall(r"(?:STR|INT|CHOICE)\((.*?)\),|\{(\".*?)\},", table,
                         re.S)
    keys = []
    for a, b in entries:
        strings = re.findall(r'"((?:[^"\\]|\\.)*)"', a or b)
        keys.append((strings[0], strings[1], strings[2],
                     strings[3] if len(strings) > 3 else None))
    return keys


def test_man_page_documents_every_key_option_and_section():
    page = (REPO / "doc" / "chatfcgi.8").read_text()
    text = page.replace("\\-", "-")
    sections = re.findall(r"^\.SH (.+)$", text, re.M)
    for s in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SIGNALS",
              "FILES", "ENVIRONMENT", "CONFIGURATION", '"EXIT STATUS"',
              "SEE ALSO"):
        assert s.strip('"') in [x.strip('"') for x in sections], s

    # Every option of main.c's getopt string.
    optstring = re.search(r'getopt\(argc, argv, "([^"]+)"\)',
                          (REPO / "app" / "main.c").read_text()).group(1)
    options = text.split(".SH OPTIONS", 1)[1].split(".SH ", 1)[0]
    for opt in optstring.replace(":", ""):
        assert re.search(rf"^\.BI? -{opt}\b", options, re.M), opt

    # Every key, under its section, with its default.
    config = text.split(".SH CONFIGURATION", 1)[1].split(".SH ", 1)[0]
    chunks = {}
    for chunk in config.split(".SS ")[1:]:
        title, body = chunk.split("\n", 1)
        chunks[title.strip()] = body
    keys = _conf_keys()
    assert len(keys) >= 40
    for section, name, default, alias in keys:
        title = f"[{section}]" if section else "Keys outside any section"
        assert title in chunks, title
        line = f".B {name} = {default}".rstrip()
        assert line in chunks[title].splitlines(), (section, name, default)
        if alias:
            assert alias in text.split(".SH ENVIRONMENT", 1)[1], alias
    for var in ("LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                "CHATFCGI_API_KEY", "CHATFCGI_MODEL"):
        assert var in text.split(".SH ENVIRONMENT", 1)[1], var
    for sig in ("SIGTERM", "SIGQUIT", "SIGINT", "SIGHUP", "SIGUSR1"):
        assert sig in text.split(".SH SIGNALS", 1)[1].split(".SH ", 1)[0]
