#!/usr/bin/python3
"""The pool under bursts: how fast chatfcgi forks a big static pool, and
how fast a dynamic pool grows from its floor when a burst of held requests
arrives. Prints the numbers; run by hand, never by make test or make bench.

    /usr/bin/python3 tests/bench/pool_burst.py [--bin bin/chatfcgi]
        [--static 10000] [--dynamic-max 1000] [--burst 1000]
        [--skip-static] [--skip-dynamic]

Static: chatfcgi with pm = static and --static workers, started here with a
NOTIFY_SOCKET of its own. Times, from the exec: every worker forked (its
pid in the scoreboard), every worker accepting (its slot left
"starting"), and READY=1. Then the PSS of an idle worker (the mean over a
sample, /proc/PID/smaps_rollup), the master's, and the drop of MemAvailable
per worker (noisy on a shared machine).

Dynamic: pm = dynamic with workers = --dynamic-max and the shipped spare
settings (start 2, min spare 1, max spare 3). Once it is ready, --burst
connections to the FastCGI socket, opened at once and non-blocking as
nginx opens them, each sending a whole request head and part of its body,
so that the worker that takes it stays busy reading (no Redis, no model
needed). Times, from the burst: every connection accepted by a worker, and
the pool at --dynamic-max workers; counts connect()s refused with EAGAIN
(a full listen backlog: nginx's 502).

Both read the scoreboard straight from the master's memfd (read-only, so
the measurement costs chatfcgi nothing); its layout comes from the
compiler, as in tests/integration/test_pm.py. Nothing touches Redis or the
model: the configuration points at closed loopback ports, and a worker
connects only when a request needs it. Every process started here is
stopped by its pid (and its own process group) at the end.
"""

import argparse
import errno
import mmap
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))

import fcgi_client  # noqa: E402
from c_layout import compiled_values  # noqa: E402
from notify import Notify  # noqa: E402

IS_ROOT = os.geteuid() == 0
WEB_USER = "www-data"
POLL_S = 0.02  # the scans cost the CPU they measure: not more often

LAYOUT_C = r"""
#include <stddef.h>
#include <stdio.h>
#include "scoreboard.h"
int main(void)
{
    printf("%zu %zu %zu %zu %d %zu %zu %zu\n",
           offsetof(struct scoreboard, nslots),
           offsetof(struct scoreboard, slots),
           offsetof(struct scoreboard, more_slots), SCOREBOARD_SLOTS_FIRST,
           sizeof(struct scoreboard_slot),
           offsetof(struct scoreboard_slot, pid),
           offsetof(struct scoreboard_slot, state),
           offsetof(struct scoreboard_slot, role));
    return 0;
}
"""


def layout():
    return compiled_values(LAYOUT_C, ("nslots", "slots", "more_slots",
                                      "first", "slot_size", "pid", "state",
                                      "role"))


class Scoreboard:
    """The master's scoreboard, mapped read-only through its memfd."""

    def __init__(self, master_pid, at):
        self.at = at
        fd_dir = Path(f"/proc/{master_pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                if "memfd:chatfcgi-scoreboard" in os.readlink(fd):
                    break
            except OSError:
                continue
        else:
            raise RuntimeError("no scoreboard memfd in the master")
        # pid, state and role, then the rest of the slot.
        assert (at["pid"], at["state"], at["role"]) == (0, 4, 8)
        self.fields = struct.Struct(f"<iii{at['slot_size'] - 12}x")
        f = os.open(str(fd), os.O_RDONLY)
        try:
            self.mem = mmap.mmap(f, 0, prot=mmap.PROT_READ)
        finally:
            os.close(f)

    def counts(self):
        """(chat workers forked, chat workers accepting, chat workers
        busy): slots with a pid, those past "starting", those past
        "idle" (states as in include/scoreboard.h)."""
        at, mem = self.at, self.mem
        nslots = struct.unpack_from("<I", mem, at["nslots"])[0]
        size, first = at["slot_size"], at["first"]
        forked = accepting = busy = 0
        for base, n in ((at["slots"], min(nslots, first)),
                        (at["more_slots"], max(0, nslots - first))):
            if n == 0:
                continue
            view = memoryview(mem)[base:base + n * size]
            for pid, state, role in self.fields.iter_unpack(view):
                if pid == 0 or role != 0:
                    continue
                forked += 1
                accepting += state != 0
                busy += state > 1
            view.release()
        return forked, accepting, busy

    def close(self):
        self.mem.close()


def write_conf(d, **keys):
    top = {"listen": d / "c.sock", "listen_mode": "0666",
           "status_listen": d / "s.sock", "error_log": d / "chatfcgi.log",
           "access_log": "off", "request_timeout_s": 600,
           "queue_timeout_ms": 0,
           "user": WEB_USER if IS_ROOT else None}
    top.update(keys)
    text = "".join(f"{k} = {v}\n" for k, v in top.items() if v is not None)
    # Closed ports: nothing here makes a worker connect.
    text += ("[redis]\nurl = redis://127.0.0.1:1/0\n"
             "[upstream]\nurl = http://127.0.0.1:1/v1\nmodel = none\n")
    conf = d / "c.conf"
    conf.write_text(text)
    return conf


class Master:
    def __init__(self, binary, d, conf):
        self.d = d
        self.notify = Notify(d / "notify.sock")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CHATFCGI_") and k != "_CHATFCGI_REEXEC"}
        env["NOTIFY_SOCKET"] = self.notify.path
        self.t0 = time.monotonic()
        with open(d / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [str(binary), "-c", str(conf)], env=env,
                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                start_new_session=True)

    def scoreboard(self, at, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return Scoreboard(self.proc.pid, at)
            except (RuntimeError, OSError, ValueError):  # not sized yet
                if self.proc.poll() is not None or \
                        time.monotonic() > deadline:
                    raise RuntimeError(f"chatfcgi did not come up: "
                                       f"{self.log_tail()}") from None
                time.sleep(0.001)

    def log_tail(self, n=15):
        out = []
        for name in ("chatfcgi.log", "stderr"):
            p = self.d / name
            if p.exists():
                out += p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(out)

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftover workers
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.notify.close()


def mem_available_kib():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def pss_kib(pid):
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def cpu_ms(pid):
    """CPU time of a process so far (/proc/PID/schedstat, ns), or 0."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e6
    except (OSError, ValueError, IndexError):
        return 0.0


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def fmt(t):
    return "never" if t is None else f"{t:.3f} s"


def run_static(args, at):
    n = args.static
    with tempfile.TemporaryDirectory(prefix="cfburst") as d:
        d = Path(d)
        os.chmod(d, 0o755)
        conf = write_conf(d, pm="static", workers=n)
        avail0 = mem_available_kib()
        m = Master(args.bin, d, conf)
        t_forked = t_whole = t_ready = None
        try:
            sb = m.scoreboard(at)
            deadline = m.t0 + args.timeout
            while time.monotonic() < deadline and m.proc.poll() is None:
                forked, accepting, _ = sb.counts()
                now = time.monotonic() - m.t0
                if t_forked is None and forked >= n:
                    t_forked = now
                if t_whole is None and accepting >= n:
                    t_whole = now
                if t_ready is None and m.notify.has_said("READY=1"):
                    t_ready = now
                if t_whole is not None and t_ready is not None:
                    break
                time.sleep(POLL_S)
            forked, accepting, _ = sb.counts()
            sb.close()
            time.sleep(1)  # let the page cache and the workers settle
            avail1 = mem_available_kib()
            kids = children(m.proc.pid)
            step = max(1, len(kids) // args.pss_sample)
            sample = [p for p in (pss_kib(k) for k in kids[::step])
                      if p is not None]
            master_pss = pss_kib(m.proc.pid)
            master_cpu = cpu_ms(m.proc.pid)
            kids_cpu = sum(cpu_ms(k) for k in kids)
            print(f"static pool of {n}: forked {forked}, accepting "
                  f"{accepting}")
            print(f"  all forked:     {fmt(t_forked)}")
            print(f"  all accepting:  {fmt(t_whole)}")
            print(f"  READY=1:        {fmt(t_ready)}")
            if kids:
                print(f"  CPU: master {master_cpu:.0f} ms, workers "
                      f"{kids_cpu:.0f} ms ({kids_cpu / len(kids) * 1000:.0f}"
                      f" us each)")
            if sample:
                print(f"  PSS per idle worker: {sum(sample) / len(sample):.0f}"
                      f" KiB (mean of {len(sample)}); master "
                      f"{master_pss} KiB")
            if kids:
                print(f"  MemAvailable drop per worker: "
                      f"{(avail0 - avail1) / len(kids):.0f} KiB")
            warn = [line for line in m.log_tail(200).splitlines()
                    if " warn " in line or " error " in line
                    or "WARN" in line or "ERROR" in line]
            for line in warn[:10]:
                print(f"  log: {line}")
            t_stop = time.monotonic()
        finally:
            m.stop()
        print(f"  stop took {time.monotonic() - t_stop:.2f} s")
        for line in (d / "chatfcgi.log").read_text().splitlines():
            if " M " in line and ("stop" in line or "whole" in line):
                print(f"  log: {line}")


def run_dynamic(args, at):
    top = args.dynamic_max
    with tempfile.TemporaryDirectory(prefix="cfburst") as d:
        d = Path(d)
        os.chmod(d, 0o755)
        conf = write_conf(d, pm="dynamic", workers=top, start_workers=2,
                          min_spare_workers=1, max_spare_workers=3)
        m = Master(args.bin, d, conf)
        socks = []
        try:
            sb = m.scoreboard(at)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                forked, accepting, _ = sb.counts()
                if accepting >= 2:
                    break
                time.sleep(0.01)
            time.sleep(1.5)  # a quiet pool at its floor
            floor = sb.counts()[0]
            payload = fcgi_client.partial_request()
            refused = other = 0
            t0 = time.monotonic()
            for _ in range(args.burst):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect(str(d / "c.sock"))
                except BlockingIOError as e:
                    s.close()
                    if e.errno == errno.EAGAIN:
                        refused += 1
                    else:
                        other += 1
                    continue
                except OSError:
                    s.close()
                    other += 1
                    continue
                s.send(payload)
                socks.append(s)
            t_sent = time.monotonic() - t0
            want = len(socks)
            t_all_busy = t_top = None
            peak = 0
            while time.monotonic() - t0 < args.timeout:
                forked, _, busy = sb.counts()
                now = time.monotonic() - t0
                peak = max(peak, forked)
                if t_all_busy is None and busy >= want:
                    t_all_busy = now
                if t_top is None and forked >= top:
                    t_top = now
                if t_all_busy is not None and (t_top is not None or
                                               want < top):
                    break
                time.sleep(POLL_S)
            sb.close()
            print(f"dynamic pool, floor {floor}, workers {top}: burst of "
                  f"{args.burst} held requests (opened in {t_sent:.3f} s)")
            print(f"  refused (EAGAIN, full backlog): {refused}"
                  + (f", other errors {other}" if other else ""))
            print(f"  every accepted connection in a worker: "
                  f"{fmt(t_all_busy)} ({want} connections)")
            print(f"  pool at {top} workers: {fmt(t_top)} (peak {peak})")
        finally:
            for s in socks:
                s.close()
            m.stop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=str(REPO / "bin" / "chatfcgi"))
    p.add_argument("--static", type=int, default=10000)
    p.add_argument("--dynamic-max", type=int, default=1000)
    p.add_argument("--burst", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--pss-sample", type=int, default=200)
    p.add_argument("--skip-static", action="store_true")
    p.add_argument("--skip-dynamic", action="store_true")
    args = p.parse_args(argv)
    at = layout()
    print(f"net.core.somaxconn = "
          f"{Path('/proc/sys/net/core/somaxconn').read_text().strip()}, "
          f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)}, "
          f"{os.cpu_count()} CPUs")
    if not args.skip_static:
        run_static(args, at)
    if not args.skip_dynamic:
        run_dynamic(args, at)
    return 0


if __name__ == "__main__":
    sys.exit(main())
