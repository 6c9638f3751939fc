"""Helpers for tests/integration/test_deploy.py: render a shipped recipe of
deploy/ into a test configuration, start the real web servers (nginx,
Apache, lighttpd), chatfcgi pools and helper programs under a temp dir on
loopback ports, and stop every one of them by its pid.

Rendering: a recipe is the file an administrator installs, with production
values in it (/run/chatfcgi/..., port 80, /usr/sbin/chatfcgi, ...).
render() replaces each of a few of those values, listed in deploy/README.md
("What the tests change"), and fails when one is not found, so that the
tests always run the shipped text and notice when it drifts.

Processes: every program is started in a session of its own
(start_new_session), so its pid is also its process group id; stop() sends
the program's stop signal to that pid, waits a bounded time for the group to
empty, then SIGKILLs the group. Every wait here has a deadline.

Python 3.11 standard library only.
"""

import os
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

NGINX = "/usr/sbin/nginx"
APACHE = "/usr/sbin/apache2"
APACHE_MODULES = Path("/usr/lib/apache2/modules")
LIGHTTPD = "/usr/sbin/lighttpd"
SPAWN_FCGI = "/usr/bin/spawn-fcgi"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"
SETPRIV = "/usr/bin/setpriv"
STRACE = "/usr/bin/strace"
LOGROTATE = "/usr/sbin/logrotate"

WEB_USER = "www-data"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class DeployError(AssertionError):
    """A recipe or a server that does not do what the test expects."""


# ------------------------------------------------------------- rendering

def render(recipe, subs, out_path=None):
    """The text of recipe (a path under deploy/) with each (old, new) of
    subs replaced everywhere; old must occur. Written to out_path when
    given."""
    text = Path(recipe).read_text()
    for old, new in subs:
        if old not in text:
            raise DeployError(f"{recipe}: the value {old!r} that the test "
                              f"replaces is not in the recipe any more")
        text = text.replace(old, new)
    if out_path is not None:
        Path(out_path).write_text(text)
    return text


def switch_variant(text, off, on):
    """Comment out every line between '# >>> off' and '# <<< off', and
    uncomment every line between '# >>> on' and '# <<< on' (the documented
    way to change variants in deploy/lighttpd/chatfcgi.conf)."""
    out, mode, seen = [], None, set()
    for line in text.splitlines():
        if line.startswith(f"# >>> {off}") or line.startswith(f"# >>> {on}"):
            mode = off if line.startswith(f"# >>> {off}") else on
            seen.add(mode)
            out.append(line)
            continue
        if line.startswith(f"# <<< {off}") or line.startswith(f"# <<< {on}"):
            mode = None
            out.append(line)
            continue
        if mode == off:
            out.append("#" + line)
        elif mode == on:
            if line and not line.startswith("#"):
                raise DeployError(f"variant {on}: line not commented out: "
                                  f"{line!r}")
            out.append(line[1:])
        else:
            out.append(line)
    if seen != {off, on}:
        raise DeployError(f"variant markers {off}/{on} not found")
    return "\n".join(out) + "\n"


def unit_entries(path):
    """[(section, key, value)] of a systemd unit file, in order (keys may
    repeat, so no dict)."""
    entries, section = [], None
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(path, section, key):
    return [v for s, k, v in unit_entries(path) if s == section and k == key]


def unit_value(path, section, key):
    values = unit_values(path, section, key)
    if len(values) != 1:
        raise DeployError(f"{path}: expected one {section}.{key}, found "
                          f"{values}")
    return values[0]


# ------------------------------------------------------------- processes

def make_dir(path, owner=None, mode=0o755):
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    p.chmod(mode)
    if owner is not None:
        os.chown(p, *owner)
    return p


def web_ids():
    import pwd
    pw = pwd.getpwnam(WEB_USER)
    return pw.pw_uid, pw.pw_gid


def _proc_stat(pid):
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes().decode("ascii",
                                                            "replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])  # state, ppid, pgrp


def alive(pid):
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _live_where(field, value):
    """Live processes whose _proc_stat()[field] (1: ppid, 2: pgrp) is
    value."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st and st[field] == value and st[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def group_members(pgid):
    """Live members of process group pgid."""
    return _live_where(2, pgid)


def children(pid):
    """Live direct children of pid."""
    return _live_where(1, pid)


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(
            b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def pids_running(marker):
    """Live processes whose command line contains marker (a path unique to
    one test's temp dir: never a broad name)."""
    me = os.getpid()
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and int(e) != me and alive(int(e))
            and marker in cmdline(int(e))]


def wait_until(fn, timeout, what, interval=0.05, proc=None, log=None):
    """fn()'s first truthy result within timeout; raises DeployError naming
    what (and the log's tail) otherwise, or when proc exits first."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"{what}: the process exited with "
                              f"{proc.returncode}\n{tail(log)}")
        if time.monotonic() > deadline:
            raise DeployError(f"{what}: not within {timeout:.0f} s\n"
                              f"{tail(log)}")
        time.sleep(interval)


def tail(path, n=25):
    if path is None:
        return ""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path})"
    return f"--- {path} ---\n" + "\n".join(lines[-n:])


class Procs:
    """The processes one test started; stop_all() in a finally."""

    def __init__(self):
        self.started = []  # (name, Popen, stop signal, log path)

    def start(self, name, argv, log, env=None, cwd=None,
              stop_signal=signal.SIGTERM):
        """env None: the test's environment without its CHATFCGI_*
        settings (CHATFCGI_BIN, ...), as a web server an administrator
        starts has none, and chatfcgi refuses variables it does not know
        in what a spawning web server passes on."""
        if env is None:
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith("CHATFCGI_")}
        with open(log, "ab") as out:
            proc = subprocess.Popen([str(a) for a in argv], env=env, cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.started.append((name, proc, stop_signal, log))
        return proc

    def stop(self, proc, timeout=STOP_TIMEOUT):
        """Stop one: its stop signal, wait for it and its process group,
        then SIGKILL the group. True when it ended in time."""
        for i, (name, p, sig, log) in enumerate(self.started):
            if p is proc:
                del self.started[i]
                return _terminate(p, sig, timeout)
        return True

    def stop_all(self):
        for name, p, sig, log in reversed(list(self.started)):
            self.stop(p)


def _terminate(proc, sig, timeout):
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None and not group_members(proc.pid):
            return True
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    return False


def kill_pids(pids, timeout=5.0):
    """SIGTERM, then SIGKILL, to exactly these pids."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)
        if not any(alive(p) for p in pids):
            return


# ------------------------------------------------------------- readiness

def tcp_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def is_socket(path):
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


# ------------------------------------------------------------- servers

def nginx_main(dir_, port, site):
    """A whole nginx.conf around a rendered site file (http context)."""
    d = Path(dir_)
    for sub in ("client_body", "fastcgi", "proxy", "uwsgi", "scgi"):
        make_dir(d / sub)
    return f"""user {WEB_USER} {WEB_USER};
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {d}/client_body;
    fastcgi_temp_path {d}/fastcgi;
    proxy_temp_path {d}/proxy;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {site};
}}
"""


def start_nginx(procs, dir_, port, site_text):
    d = make_dir(dir_)
    site = d / "site.conf"
    site.write_text(site_text)
    conf = d / "nginx.conf"
    conf.write_text(nginx_main(d, port, site))
    log = d / "error.log"
    test = subprocess.run([NGINX, "-t", "-p", f"{d}/", "-c", conf, "-e", log],
                          capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise DeployError(f"nginx -t failed:\n{test.stderr}")
    proc = procs.start("nginx", [NGINX, "-p", f"{d}/", "-c", conf, "-e", log],
                       d / "stdout.log", stop_signal=signal.SIGTERM)
    wait_until(lambda: tcp_open(port), START_TIMEOUT, "nginx listening",
               proc=proc, log=log)
    return proc


APACHE_BASE_MODULES = ("mpm_event", "authz_core", "authz_host", "headers",
                       "env")


def apache_main(dir_, port, modules, extra=""):
    d = Path(dir_)
    loads = "\n".join(
        f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so"
        for m in APACHE_BASE_MODULES + tuple(modules))
    return f"""# Generated by the deploy tests: only what the site needs.
Define APACHE_LOG_DIR {d}/log
ServerRoot {d}
PidFile {d}/httpd.pid
DefaultRuntimeDir {d}/rt
Mutex file:{d}/rt default
{loads}
User {WEB_USER}
Group {WEB_USER}
Listen 127.0.0.1:{port}
ServerName 127.0.0.1
ErrorLog {d}/log/error.log
LogLevel warn
DocumentRoot {d}/htdocs
{extra}
Include {d}/site.conf
"""


def start_apache(procs, dir_, port, site_text, modules, extra=""):
    d = make_dir(dir_)
    for sub in ("log", "rt", "htdocs"):
        make_dir(d / sub)
    (d / "site.conf").write_text(site_text)
    conf = d / "httpd.conf"
    conf.write_text(apache_main(d, port, modules, extra))
    test = subprocess.run([APACHE, "-t", "-f", conf, "-d", d],
                          capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise DeployError(f"apache2 -t failed:\n{test.stderr}")
    proc = procs.start("apache2", [APACHE, "-f", conf, "-d", d,
                                   "-DFOREGROUND"], d / "log" / "stdout.log")
    wait_until(lambda: tcp_open(port), START_TIMEOUT, "apache2 listening",
               proc=proc, log=d / "log" / "error.log")
    return proc


def start_lighttpd(procs, dir_, port, recipe_text):
    d = make_dir(dir_)
    # lighttpd opens its error log (and makes bin-path sockets) after it
    # became www-data.
    logdir = make_dir(d / "lighttpd", owner=web_ids())
    make_dir(d / "htdocs")
    (d / "chatfcgi.conf").write_text(recipe_text)
    conf = d / "lighttpd.conf"
    conf.write_text(f"""# Generated by the deploy tests.
server.document-root = "{d}/htdocs"
server.bind = "127.0.0.1"
server.port = {port}
server.username = "{WEB_USER}"
server.groupname = "{WEB_USER}"
server.errorlog = "{logdir}/error.log"
include "{d}/chatfcgi.conf"
""")
    test = subprocess.run([LIGHTTPD, "-tt", "-f", conf], capture_output=True,
                          text=True, timeout=30)
    if test.returncode != 0:
        raise DeployError(f"lighttpd -tt failed:\n{test.stdout}"
                          f"{test.stderr}")
    proc = procs.start("lighttpd", [LIGHTTPD, "-D", "-f", conf],
                       d / "stdout.log")
    wait_until(lambda: tcp_open(port), START_TIMEOUT, "lighttpd listening",
               proc=proc, log=logdir / "error.log")
    return proc


# ------------------------------------------------------------- syscalls

def syscall_groups():
    """{"@group": [names and @subgroups]} from systemd-analyze."""
    out = subprocess.run([SYSTEMD_ANALYZE, "syscall-filter"],
                         capture_output=True, text=True, timeout=30,
                         check=True).stdout
    groups, current = {}, None
    for line in out.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if not line[0].isspace() and s.startswith("@"):
            current = groups.setdefault(s, [])
        elif current is not None:
            current.append(s)
    return groups


def expand_syscalls(spec, groups):
    """The system calls of a SystemCallFilter= value (names and @groups,
    without a leading ~)."""
    names = set()
    for item in spec.split():
        if item.startswith("@"):
            names |= expand_syscalls(" ".join(groups[item]), groups)
        else:
            names.add(item)
    return names


SYSCALL_LINE = re.compile(r"^(?:\d+ +)?([a-z_0-9]+)\(")


def traced(trace_files, exe):
    """(syscall names, socket() lines, mmap/mprotect lines) that exe made,
    from strace -ff files: of the file where exe was exec'd, only what
    follows its execve; the other files whole (its children)."""
    names, sockets, maps = set(), [], []
    for f in trace_files:
        lines = Path(f).read_text(errors="replace").splitlines()
        starts = [i for i, l in enumerate(lines)
                  if l.startswith(f'execve("{exe}"') and "= 0" in l]
        if starts:
            lines = lines[starts[0]:]
        elif any(l.startswith("execve(") for l in lines):
            continue  # the tracer's helpers before chatfcgi: not ours
        for line in lines:
            m = SYSCALL_LINE.match(line)
            if not m:
                continue
            names.add(m.group(1))
            if m.group(1) == "socket":
                sockets.append(line)
            if m.group(1) in ("mmap", "mprotect", "pkey_mprotect"):
                maps.append(line)
    return names, sockets, maps
