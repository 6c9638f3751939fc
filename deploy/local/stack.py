#!/usr/bin/python3
"""Local stack for chatfcgi: Redis, the local model, the chatfcgi pool and
nginx, all on 127.0.0.1 and all under one run directory, never the system
services.

As a command (the Makefile's `make run`, `make start`, `make stop`):

    /usr/bin/python3 deploy/local/stack.py run|start|stop|status

As a module (the integration tests):

    stack = Stack(run_dir, port=8080, env={"CHATFCGI_WORKERS": "2"})
    stack.start()            # redis -> model -> chatfcgi -> nginx, then healthz
    ...
    stack.stop()             # reverse order, only the processes it started

Python 3.11 standard library only.
"""

import argparse
import json
import os
import pwd
import re
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

PYTHON = "/usr/bin/python3"
REDIS_SERVER = "/usr/bin/redis-server"
NGINX = "/usr/sbin/nginx"
LOCALMODEL = REPO / "app" / "localmodel.py"
DEFAULT_BIN = REPO / "bin" / "chatfcgi"
CHATFCGI_CONF = REPO / "conf" / "chatfcgi.conf"
NGINX_TEMPLATE = HERE / "nginx.conf.in"
REDIS_TEMPLATE = HERE / "redis.conf.in"

# Start order; stop goes the other way.
SERVICES = ("redis", "model", "chatfcgi", "nginx")

# The bundled model's demo tools; an include of one's own
# (CHATFCGI_INCLUDE, even empty) replaces them.
DEMO_TOOLS = """# Written by deploy/local/stack.py for the bundled model.
[tool get_time]
url = {url}/tools/get_time
description = The current date and time in UTC.
timeout_ms = 2000

[tool calculate]
url = {url}/tools/calculate
description = Evaluate an arithmetic expression: digits, + - * / % ( ).
parameters = {{"type":"object","properties":{{"expression":{{"type":"string"}}}},"required":["expression"]}}
timeout_ms = 2000
"""

# Read by this launcher only; chatfcgi refuses CHATFCGI_ variables it does
# not know, so they never reach its environment.
LAUNCHER_ONLY = ("CHATFCGI_PORT", "CHATFCGI_RUN_DIR", "CHATFCGI_MODEL_PORT",
                 "CHATFCGI_REDIS_PORT", "CHATFCGI_BIN",
                 "CHATFCGI_NGINX_ACCESS_LOG", "CHATFCGI_NGINX_STREAMS")

# What /proc/<pid>/cmdline must contain before a pid file is trusted: a pid
# may have been reused since the file was written.
PROGRAM = {"redis": "redis-server", "model": "localmodel",
           "chatfcgi": "chatfcgi", "nginx": "nginx"}

LOG_NAME = {"redis": "redis.log", "model": "model.log",
            "chatfcgi": "chatfcgi.log", "nginx": "nginx-error.log"}

# nginx: SIGQUIT is its graceful stop (SIGTERM drops open responses, which
# would make chatfcgi's own graceful drain pointless). The others drain or
# save on SIGTERM.
STOP_SIGNAL = {"redis": signal.SIGTERM, "model": signal.SIGTERM,
               "chatfcgi": signal.SIGTERM, "nginx": signal.SIGQUIT}

# chatfcgi is ready once it says READY=1 on the NOTIFY_SOCKET given here,
# as systemd would be told: when every worker accepts connections, or 20 s
# after its start with those there are.
READY_TIMEOUT = {"redis": 10.0, "model": 10.0, "chatfcgi": 30.0,
                 "nginx": 10.0}
NOTIFY_NAME = "notify.sock"
HEALTH_TIMEOUT = 15.0
# Written by `stop` before it signals anything, so that a `run` launcher
# whose children it stops exits 0 instead of reporting a crash; that launcher
# (or the next start) removes it.
STOP_MARK = "stop-requested"
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 30

# sun_path is 108 bytes on Linux; keep a margin for the tools that copy it.
SOCKET_PATH_MAX = 100

# Characters that would need quoting in nginx or redis config files.
UNSAFE_PATH = re.compile(r"[\s\"'`;{}$#\\@]")

WEB_USER = "www-data"

# The local nginx is sized for this many streams held at once (unless
# CHATFCGI_NGINX_STREAMS says otherwise): two connections each (client and
# FastCGI) and 480 more, two descriptors per connection (see
# nginx.conf.in).
NGINX_STREAMS = 10000
# Workers nginx may take to share the connections under a low hard limit
# on open files; past this, the stack holds fewer streams.
NGINX_PROCESSES_MAX = 8


def nginx_sizing(streams=NGINX_STREAMS):
    """(worker_processes, worker_connections, worker_rlimit_nofile) for
    streams held at once: one worker, or, when the hard limit on open
    files is lower,
    enough workers under it (NGINX_PROCESSES_MAX at most) to share the
    connections, each with a quarter more than its share. Raising the limit takes CAP_SYS_RESOURCE, which
    even root may lack (in a container), and nginx would log an alert at
    every start."""
    connections = 2 * streams + 480
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= 2 * connections:
        return 1, connections, 2 * connections
    most = max(256, hard // 2)
    processes = min(NGINX_PROCESSES_MAX,
                    -(-connections * 5 // (4 * most)))
    share = -(-connections * 5 // (4 * processes))
    return processes, min(most, share), hard

ENV_HELP = """\
environment (all optional):
  CHATFCGI_PORT          nginx port on 127.0.0.1 (default 8080)
  CHATFCGI_WORKERS       number of chatfcgi workers (passed to chatfcgi)
  CHATFCGI_UPSTREAM_URL  OpenAI-compatible base URL, e.g.
                         https://api.openai.com/v1; when set, the local
                         model is not started
  CHATFCGI_API_KEY       the upstream's API key (passed to chatfcgi)
  CHATFCGI_MODEL         model name sent upstream (passed to chatfcgi)
  CHATFCGI_REDIS_URL     use this Redis (redis://host:port/db) instead of
                         starting one
  CHATFCGI_RUN_DIR       run directory: configs, sockets, logs, pid files,
                         Redis data (default <repo>/.run)
  CHATFCGI_MODEL_PORT    local model port (default CHATFCGI_PORT+1)
  CHATFCGI_REDIS_PORT    local Redis port (default CHATFCGI_PORT+2)
  CHATFCGI_BIN           chatfcgi binary (default bin/chatfcgi; e.g.
                         bin/chatfcgi-asan)
  CHATFCGI_NGINX_ACCESS_LOG  off: no nginx access log
  CHATFCGI_NGINX_STREAMS     streams nginx is sized to hold (default 10000)
  CHATFCGI_INCLUDE       drop-in config files or globs (passed to chatfcgi);
                         unset with the bundled model: its demo tools
                         get_time and calculate
Any other CHATFCGI_* variable is passed to chatfcgi unchanged.

commands:
  run     start everything, stay in the foreground until Ctrl-C, stop it all
  start   start everything in the background (pid files in the run dir)
  stop    stop a stack started by `start` (or `run`); exit 0 if none runs
  status  show which parts run (exit 0 when all do, 3 otherwise)
"""


class StackError(Exception):
    """An expected failure (port in use, binary missing, a part that did not
    come up): its text is meant for the user, without a traceback."""


class _Interrupted(BaseException):
    """SIGINT/SIGTERM received by the command-line launcher."""


# ---------------------------------------------------------------- helpers

def _exit_text(rc):
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def _say(msg):
    print(msg, flush=True)


def _short(path):
    """path relative to the repository when inside it, for messages."""
    try:
        return str(Path(path).relative_to(REPO))
    except ValueError:
        return str(path)


def tail(path, n=LOG_TAIL_LINES):
    """The last n lines of a file, as text ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-n:])


def _port_free(port):
    """True when 127.0.0.1:port can be bound (SO_REUSEADDR, as the servers
    do, so that TIME_WAIT leftovers of a previous run do not count)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _proc_stat(pid):
    """(state, pgrp) of a process from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(")") + 2:].split()
    return fields[0], int(fields[2])


def pid_alive(pid):
    """True while pid is a process that has not exited (zombies count as
    gone: PID 1 of a container does not always reap orphans)."""
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _group_members(pgid):
    """Live processes in process group pgid. Every service is started in its
    own session, so its group is exactly the service and its children (the
    chatfcgi workers, the nginx worker)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _proc_stat(int(entry))
        if st and st[1] == pgid and st[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def is_service_pid(name, pid):
    """True when pid is alive and still runs the expected program."""
    return pid_alive(pid) and PROGRAM[name] in _cmdline(pid)


def _kill(pid, sig, group=False):
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(pid, sig=signal.SIGTERM, timeout=STOP_TIMEOUT, alive=None):
    """Send sig to pid, wait up to timeout for it and its process group to
    end, then SIGKILL the group. alive() tells whether the leader still runs
    (for a child of ours it also reaps it). Returns True when it ended in
    time, False when it had to be killed."""
    alive = alive or (lambda: pid_alive(pid))
    _kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Wait for the leader first, then for what it leaves behind: a
        # master that exits before its workers must not hide them.
        if not alive() and not _group_members(pid):
            return True
        time.sleep(0.05)
    # A live member keeps the group id from being reused, so this reaches
    # only the service's own processes.
    _kill(pid, signal.SIGKILL, group=True)
    if alive():
        _kill(pid, signal.SIGKILL)
    end = time.monotonic() + 5
    while time.monotonic() < end and (alive() or _group_members(pid)):
        time.sleep(0.05)
    return False


def read_pid_file(path):
    try:
        text = Path(path).read_text().strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def _http_get(url, timeout=2.0):
    """(status, body bytes) of a GET, ignoring any proxy settings; raises
    OSError when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _redis_ping(port, timeout=1.0):
    """True when Redis on 127.0.0.1:port answers PONG (not LOADING)."""
    try:
        with socket.create_connection(("127.0.0.1", port),
                                      timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _tcp_open(port, timeout=0.5):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _render(template, values):
    text = Path(template).read_text()
    text = re.sub(r"@([A-Z_]+)@",
                  lambda m: values.get(m.group(1), m.group(0)), text)
    code = "\n".join(line for line in text.splitlines()
                     if not line.lstrip().startswith("#"))
    left = sorted(set(re.findall(r"@[A-Z_]+@", code)))
    if left:
        raise StackError(f"{_short(template)}: unknown placeholders "
                         f"{', '.join(left)}")
    return text


def _write_atomic(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_bin(value):
    """The chatfcgi binary: CHATFCGI_BIN (relative to the current directory,
    else to the repository) or bin/chatfcgi."""
    if not value:
        return DEFAULT_BIN
    p = Path(value)
    if p.is_absolute():
        return p
    if p.exists():
        return p.absolute()
    return REPO / p


def running_pids(run_dir):
    """{name: pid} of the services whose pid files in run_dir name a live
    process of the expected program."""
    found = {}
    for name in SERVICES:
        pid = read_pid_file(Path(run_dir) / f"{name}.pid")
        if pid and is_service_pid(name, pid):
            found[name] = pid
    return found


# ------------------------------------------------------------------ Stack

class Stack:
    """One local stack in one run directory.

    env: extra settings for chatfcgi ({"CHATFCGI_X": "value"}), laid over
    the caller's environment; a value of None removes a variable (tests use
    that to drop a CHATFCGI_UPSTREAM_URL of the developer's shell).
    CHATFCGI_UPSTREAM_URL / CHATFCGI_REDIS_URL there (or in the environment)
    mean: use that upstream / that Redis, do not start one. CHATFCGI_BIN
    picks the binary.
    """

    def __init__(self, run_dir, port, model_port=None, redis_port=None,
                 env=None, progress=_say):
        self.run_dir = Path(run_dir).absolute()
        self.port = int(port)
        self._model_port = int(model_port or self.port + 1)
        self._redis_port = int(redis_port or self.port + 2)
        self._progress = progress or (lambda msg: None)
        self.child_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                self.child_env.pop(key, None)
            else:
                self.child_env[key] = str(value)
        self.redis_url = self.child_env.get("CHATFCGI_REDIS_URL") or None
        self.upstream_url = self.child_env.get("CHATFCGI_UPSTREAM_URL") or None
        self.bin = resolve_bin(self.child_env.get("CHATFCGI_BIN"))
        self.services = [s for s in SERVICES
                         if not (s == "redis" and self.redis_url)
                         and not (s == "model" and self.upstream_url)]
        self.procs = {}
        self._notify = None        # chatfcgi's NOTIFY_SOCKET while it starts
        self._notified = False     # READY=1 came on it
        self.chatfcgi_status = ""  # its last STATUS= line

    # -- properties

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def model_url(self):
        """Base of the local model (its control API is under /control, the
        OpenAI API under /v1); None when an upstream URL was given."""
        if self.upstream_url:
            return None
        return f"http://127.0.0.1:{self._model_port}"

    @property
    def model_port(self):
        return self._model_port

    @property
    def redis_port(self):
        if self.redis_url:
            # redis-cluster:// lists its nodes: the first one's port.
            first = self.redis_url.split(",")[0]
            return urllib.parse.urlparse(first).port or 6379
        return self._redis_port

    @property
    def socket_path(self):
        return self.run_dir / "chatfcgi.sock"

    @property
    def status_socket_path(self):
        """The control worker's socket: healthz, status and metrics answer
        there even when every chat worker is busy."""
        return self.run_dir / "status.sock"

    def log_path(self, name):
        return self.run_dir / LOG_NAME[name]

    def pid_path(self, name):
        return self.run_dir / f"{name}.pid"

    def pid(self, name):
        """Pid of a service this Stack started and that still runs, or None."""
        p = self.procs.get(name)
        return p.pid if p and p.poll() is None else None

    def log_tail(self, name, n=LOG_TAIL_LINES):
        return tail(self.log_path(name), n)

    # -- whole stack

    def start(self):
        """Start every part in order and wait until GET /api/healthz through
        nginx answers 200. On failure, stop what was started and raise
        StackError naming the part, with the end of its log."""
        self._preflight()
        self._prepare()
        try:
            for name in self.services:
                self.start_service(name)
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def stop(self):
        """Stop, in reverse order, every process this Stack started.
        Idempotent."""
        for name in reversed(SERVICES):
            self.stop_service(name)

    def dead(self):
        """[(name, exit status)] of started services that exited."""
        return [(n, p.returncode) for n, p in self.procs.items()
                if p.poll() is not None]

    # -- one service

    def start_service(self, name):
        """Start one part (again), on the same port and data, and wait until
        it is ready. Does nothing when it already runs."""
        if name not in self.services:
            raise StackError(f"{name} is not part of this stack")
        if self.pid(name):
            return
        self.stop_service(name)  # one that died: clear what it left behind
        argv, env, port = self._command(name)
        if port is not None and not _port_free(port):
            raise StackError(f"{name}: port {port} on 127.0.0.1 is already "
                             f"in use (pick other ports with CHATFCGI_PORT)")
        if name == "chatfcgi":
            self._remove_stale_socket()
            self._open_notify()
        where = f"127.0.0.1:{port}" if port else _short(self.socket_path)
        self._progress(f"starting {name} on {where} ...")
        with open(self.log_path(name), "ab") as log:
            proc = subprocess.Popen(argv, env=env, cwd=self.run_dir,
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs[name] = proc
        try:
            self._wait_ready(name, proc)
        finally:
            if name == "chatfcgi":
                self._close_notify()
        if name == "chatfcgi":
            self._progress(f"chatfcgi is ready: {self.chatfcgi_status}")
        pid_file = self.pid_path(name)
        # chatfcgi writes the same file (CHATFCGI_PID_FILE) with the same pid.
        if read_pid_file(pid_file) != proc.pid:
            _write_atomic(pid_file, f"{proc.pid}\n")

    def stop_service(self, name):
        """Stop one part this Stack started: its stop signal, up to 10 s,
        then SIGKILL to its process group. Does nothing when not running."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            self._progress(f"stopping {name} (pid {proc.pid}) ...")
            if not terminate(proc.pid, STOP_SIGNAL[name],
                             alive=lambda: proc.poll() is None):
                self._progress(f"{name} did not stop in {STOP_TIMEOUT:.0f} s:"
                               f" killed")
        elif _group_members(proc.pid):
            # It exited on its own and left children (workers) behind. The
            # live group keeps its id from being reused: this is still ours.
            _kill(proc.pid, signal.SIGKILL, group=True)
        if read_pid_file(self.pid_path(name)) in (proc.pid, None):
            self.pid_path(name).unlink(missing_ok=True)

    # -- internals

    def _command(self, name):
        """(argv, environment, tcp port or None) of one service."""
        run = self.run_dir
        if name == "redis":
            return ([REDIS_SERVER, str(run / "redis.conf")],
                    self._plain_env(), self._redis_port)
        if name == "model":
            return ([PYTHON, str(LOCALMODEL), "--host", "127.0.0.1",
                     "--port", str(self._model_port)],
                    self._plain_env(), self._model_port)
        if name == "chatfcgi":
            return ([str(self.bin), "-c", str(CHATFCGI_CONF)],
                    self._chatfcgi_env(), None)
        return ([NGINX, "-p", f"{run}/nginx/", "-c", str(run / "nginx.conf"),
                 "-e", str(self.log_path("nginx"))],
                self._plain_env(), self.port)

    def _plain_env(self):
        return {k: v for k, v in self.child_env.items()
                if not k.startswith("CHATFCGI_")}

    def _demo_tools(self):
        """A drop-in config with the bundled model's demo tools (get_time,
        calculate, served by the model itself), so that `make run` shows
        tools offline. Returns its path."""
        path = self.run_dir / "demo-tools.conf"
        _write_atomic(path, DEMO_TOOLS.format(url=self.model_url))
        return str(path)

    def _chatfcgi_env(self):
        env = {k: v for k, v in self.child_env.items()
               if k not in LAUNCHER_ONLY}
        env["CHATFCGI_LISTEN"] = str(self.socket_path)
        env["NOTIFY_SOCKET"] = str(self.run_dir / NOTIFY_NAME)
        env["CHATFCGI_STATUS_LISTEN"] = str(self.status_socket_path)
        env["CHATFCGI_PID_FILE"] = str(self.pid_path("chatfcgi"))
        env["CHATFCGI_REDIS_URL"] = (self.redis_url or
                                     f"redis://127.0.0.1:{self._redis_port}/0")
        env["CHATFCGI_UPSTREAM_URL"] = (self.upstream_url or
                                        f"{self.model_url}/v1")
        if not self.upstream_url and "CHATFCGI_MODEL" not in env:
            env["CHATFCGI_MODEL"] = "local-eliza"  # the bundled model's name
        if not self.upstream_url and "CHATFCGI_INCLUDE" not in env:
            env["CHATFCGI_INCLUDE"] = self._demo_tools()
        if os.geteuid() == 0:
            # chatfcgi refuses to serve as root: its workers become www-data,
            # which also owns the socket (0660) so nginx's workers connect.
            env["CHATFCGI_USER"] = WEB_USER
            env["CHATFCGI_GROUP"] = WEB_USER
        return env

    def _preflight(self):
        """Everything that can be checked before a process starts."""
        running = running_pids(self.run_dir)
        if running:
            pids = ", ".join(f"{n} {p}" for n, p in running.items())
            raise StackError(f"a stack already runs in {self.run_dir} "
                             f"({pids}): run make stop first")
        if UNSAFE_PATH.search(str(self.run_dir)):
            raise StackError(f"run directory {self.run_dir} has characters "
                             f"the generated configs cannot hold (spaces, "
                             f"quotes, ;{{}}$#@\\): set CHATFCGI_RUN_DIR")
        n = len(str(self.socket_path).encode())
        if n >= SOCKET_PATH_MAX:
            raise StackError(f"socket path {self.socket_path} is {n} bytes, "
                             f"over the {SOCKET_PATH_MAX - 1}-byte limit of "
                             f"unix sockets: set CHATFCGI_RUN_DIR to a "
                             f"shorter directory")
        if not (self.bin.is_file() and os.access(self.bin, os.X_OK)):
            raise StackError(f"{_short(self.bin)} is missing: run make")
        if not CHATFCGI_CONF.is_file():
            raise StackError(f"{_short(CHATFCGI_CONF)} is missing")
        needs = [(NGINX, "make deps installs nginx")]
        if "redis" in self.services:
            needs.append((REDIS_SERVER, "make deps installs redis-server"))
        if "model" in self.services:
            needs.append((LOCALMODEL, "the local model"))
        for path, what in needs:
            if not Path(path).is_file():
                raise StackError(f"{_short(path)} is missing: {what}")
        ports = {"nginx": self.port}
        if "model" in self.services:
            ports["model"] = self._model_port
        if "redis" in self.services:
            ports["redis"] = self._redis_port
        for name, port in ports.items():
            if not 0 < port < 65536:
                raise StackError(f"{name}: {port} is not a port number")
        if len(set(ports.values())) != len(ports):
            raise StackError(f"ports must differ: {ports}")
        for name, port in ports.items():
            if not _port_free(port):
                raise StackError(f"{name}: port {port} on 127.0.0.1 is "
                                 f"already in use (another stack? `make "
                                 f"stop`, or pick ports with CHATFCGI_PORT)")
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(WEB_USER)
            except KeyError:
                raise StackError(f"user {WEB_USER} does not exist: nginx and "
                                 f"the chatfcgi workers run as {WEB_USER} "
                                 f"when started as root") from None

    def _prepare(self):
        """Run directory, fresh logs, configs."""
        run = self.run_dir
        for d in (run, run / "nginx", run / "redis"):
            d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._open_path_for_web_user()
        (run / STOP_MARK).unlink(missing_ok=True)
        for name in SERVICES:
            self.pid_path(name).unlink(missing_ok=True)  # stale: checked above
            if name in self.services:
                self.log_path(name).write_bytes(b"")
        _write_atomic(run / "nginx.conf", self._nginx_conf())
        _write_atomic(run / "redis.conf", _render(REDIS_TEMPLATE, {
            "REDIS_PORT": str(self._redis_port),
            "REDIS_DIR": str(run / "redis"),
            "REDIS_LOG": str(self.log_path("redis"))}))
        _write_atomic(run / "stack.json", json.dumps({
            "url": self.url, "services": self.services,
            "model_url": self.model_url, "redis_port": self.redis_port,
            "socket": str(self.socket_path)}, indent=1) + "\n")

    def _nginx_conf(self):
        user_line = f"user {WEB_USER} {WEB_USER};" if os.geteuid() == 0 else ""
        processes, connections, files = nginx_sizing(int(
            self.child_env.get("CHATFCGI_NGINX_STREAMS", NGINX_STREAMS)))
        return _render(NGINX_TEMPLATE, {
            "WORKER_PROCESSES": str(processes),
            "REUSEPORT": " reuseport" if processes > 1 else "",
            "WORKER_CONNECTIONS": str(connections),
            "WORKER_RLIMIT_NOFILE": str(files),
            "USER_LINE": user_line, "PORT": str(self.port),
            "NGINX_DIR": str(self.run_dir / "nginx"),
            "ACCESS_LOG": self._nginx_access_log(),
            "ERROR_LOG": str(self.log_path("nginx")),
            "SOCKET": str(self.socket_path),
            "STATUS_SOCKET": str(self.status_socket_path),
            "WWW_DIR": str(REPO / "app" / "www")})

    def _nginx_access_log(self):
        """nginx's access_log argument: its own file, or off (for the
        benchmark, whose peers log nothing)."""
        if self.child_env.get("CHATFCGI_NGINX_ACCESS_LOG") == "off":
            return "off"
        return f"{self.run_dir / 'nginx' / 'access.log'} chatfcgi"

    def _open_path_for_web_user(self):
        """nginx's workers (www-data) must reach the socket: the run dir is
        ours to open (mkdtemp makes it 0700); its parents must already let
        others through."""
        mode = self.run_dir.stat().st_mode
        if not mode & stat.S_IXOTH:
            self.run_dir.chmod(stat.S_IMODE(mode) | 0o755)
        for parent in self.run_dir.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                raise StackError(f"{WEB_USER} cannot enter {parent}, so nginx "
                                 f"could not reach {self.socket_path}: "
                                 f"chmod o+x {parent} or set CHATFCGI_RUN_DIR")

    def _remove_stale_socket(self):
        try:
            if stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                self.socket_path.unlink()
        except FileNotFoundError:
            pass

    def _failure(self, name, reason, logs=None):
        parts = [f"{name} failed: {reason}"]
        for log_name in logs or [name]:
            path = self.log_path(log_name)
            text = tail(path)
            parts.append(f"--- last {LOG_TAIL_LINES} lines of {path} ---\n"
                         + (text or "(empty)"))
        return StackError("\n".join(parts))

    def _open_notify(self):
        """A NOTIFY_SOCKET for chatfcgi, as systemd's: its master says
        READY=1 there once its pool is whole."""
        path = self.run_dir / NOTIFY_NAME
        path.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(path))
        s.setblocking(False)
        self._notify = s
        self._notified = False
        self.chatfcgi_status = ""

    def _close_notify(self):
        """Once started: the socket goes, so that the master's later
        states (RELOADING=1, STOPPING=1) find no one, which it takes
        quietly, as outside systemd."""
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        (self.run_dir / NOTIFY_NAME).unlink(missing_ok=True)

    def _notified_ready(self):
        """Whether READY=1 came (reading what the master said so far)."""
        while self._notify is not None:
            try:
                msg = self._notify.recv(4096).decode("utf-8", "replace")
            except BlockingIOError:
                break
            for line in msg.split("\n"):
                if line.startswith("STATUS="):
                    self.chatfcgi_status = line[len("STATUS="):]
                self._notified = self._notified or line == "READY=1"
        return self._notified

    def _ready(self, name):
        if name == "redis":
            return _redis_ping(self._redis_port)
        if name == "model":
            try:
                return _http_get(f"{self.model_url}/v1/models")[0] == 200
            except OSError:
                return False
        if name == "chatfcgi":
            try:
                made = stat.S_ISSOCK(self.socket_path.stat().st_mode)
            except OSError:
                made = False
            return self._notified_ready() and made
        return _tcp_open(self.port)

    def _wait_ready(self, name, proc):
        timeout = READY_TIMEOUT[name]
        deadline = time.monotonic() + timeout
        while True:
            rc = proc.poll()
            if rc is not None:
                raise self._failure(name, f"{_exit_text(rc)} while "
                                          f"starting")
            if self._ready(name):
                return
            if time.monotonic() > deadline:
                raise self._failure(name, f"not ready after {timeout:.0f} s")
            time.sleep(0.05)

    def _wait_healthy(self):
        url = f"{self.url}/api/healthz"
        self._progress(f"waiting for {url} ...")
        deadline = time.monotonic() + HEALTH_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            for name, rc in self.dead():
                raise self._failure(name, _exit_text(rc))
            try:
                status, body = _http_get(url)
                if status == 200:
                    return
                last = f"{status} {body[:200].decode('utf-8', 'replace')}"
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise self._failure("chatfcgi", f"{url} did not answer 200 within "
                                        f"{HEALTH_TIMEOUT:.0f} s (last: {last})",
                            logs=["chatfcgi", "nginx"])


# ------------------------------------------------------------ command line

def _config_from_env():
    env = os.environ

    def port(name, default):
        value = env.get(name)
        if not value:
            return default
        try:
            p = int(value)
        except ValueError:
            p = 0
        if not 0 < p < 65536:
            raise StackError(f"{name}={value} is not a port number")
        return p

    base = port("CHATFCGI_PORT", 8080)
    return dict(run_dir=Path(env.get("CHATFCGI_RUN_DIR") or REPO / ".run"),
                port=base,
                model_port=port("CHATFCGI_MODEL_PORT", base + 1),
                redis_port=port("CHATFCGI_REDIS_PORT", base + 2))


def _banner(stack, foreground):
    logs = ", ".join(_short(stack.log_path(n)) for n in stack.services)
    stop = "Ctrl-C (or make stop)" if foreground else "make stop"
    body = '{"message":"Hello! Who are you?"}'
    _say(f"chatfcgi is up: {stack.url}/ (the chat page; API: "
         f"{stack.url}/api/chat)\n"
         f"  try:    curl -sS {stack.url}/api/chat "
         f"-H 'Content-Type: application/json' -d '{body}'\n"
         f"  health: {stack.url}/api/healthz\n"
         f"  logs:   {logs}, {_short(stack.run_dir / 'nginx/access.log')}\n"
         f"  stop:   {stop}")


def _on_signal(signum, frame):
    # Once: a second Ctrl-C must not cut the stop that follows short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Interrupted(signum)


def _cmd_run(stack, foreground):
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    up = False
    try:
        stack.start()  # a StackError reaches main(), which prints it
        up = True
        _banner(stack, foreground)
        if not foreground:
            return 0
        while True:
            dead = stack.dead()
            mark = stack.run_dir / STOP_MARK
            if mark.exists():
                # `make stop` from another terminal: not a crash.
                _say("stop requested (make stop): stopping ...")
                stack.stop()
                mark.unlink(missing_ok=True)
                return 0
            for name, rc in dead:
                print(stack._failure(name, f"{_exit_text(rc)} unexpectedly"),
                      file=sys.stderr)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                stack.stop()
                return 1
            time.sleep(0.5)
    except _Interrupted:
        _say("\nstopping ...")
        stack.stop()
        _say("stopped")
        return 0 if up else 1


def _cmd_stop(run_dir):
    stopped = 0
    if run_dir.is_dir():
        (run_dir / STOP_MARK).touch()  # before any signal; see STOP_MARK
    stopped = _stop_pid_files(run_dir)
    _say("stopped" if stopped else f"nothing runs in {run_dir}")
    return 0


def _stop_pid_files(run_dir):
    """Stop the services named by the pid files; returns how many ran."""
    stopped = 0
    for name in reversed(SERVICES):
        pid_file = run_dir / f"{name}.pid"
        pid = read_pid_file(pid_file)
        if pid is None:
            pid_file.unlink(missing_ok=True)
            continue
        if not is_service_pid(name, pid):
            _say(f"{name}: pid {pid} is not running {PROGRAM[name]}: "
                 f"removing the stale pid file")
        else:
            _say(f"stopping {name} (pid {pid}) ...")
            if not terminate(pid, STOP_SIGNAL[name]):
                _say(f"{name} did not stop in {STOP_TIMEOUT:.0f} s: killed")
            stopped += 1
        pid_file.unlink(missing_ok=True)
    return stopped


def _cmd_status(run_dir):
    try:
        info = json.loads((run_dir / "stack.json").read_text())
    except (OSError, ValueError):
        info = {}
    expected = info.get("services", SERVICES)
    running = running_pids(run_dir)
    for name in SERVICES:
        if name in running:
            _say(f"{name:9} running (pid {running[name]})")
        elif name in expected:
            _say(f"{name:9} stopped")
        else:
            _say(f"{name:9} not part of this stack")
    all_up = bool(running) and all(n in running for n in expected)
    if running and info.get("url"):
        try:
            status, body = _http_get(f"{info['url']}/api/healthz")
            health = f"{status} {body.decode('utf-8', 'replace').strip()}"
        except OSError as e:
            health = f"no answer ({e})"
        _say(f"{info['url']}/api/healthz: {health}")
    return 0 if all_up else 3


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="stack.py", description=__doc__.split("\n\n")[0],
        epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "start", "stop", "status"))
    args = parser.parse_args(argv)
    try:
        cfg = _config_from_env()
        if args.command == "stop":
            return _cmd_stop(cfg["run_dir"])
        if args.command == "status":
            return _cmd_status(cfg["run_dir"])
        stack = Stack(**cfg)
        return _cmd_run(stack, foreground=args.command == "run")
    except StackError as e:
        print(f"stack.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
