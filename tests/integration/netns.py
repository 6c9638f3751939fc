"""Network namespaces for tests/integration/test_fleet.py.

Segment makes a private Ethernet segment: a bridge in a hub namespace of
its own, and one namespace per host with a veth pair to the bridge and a
private address (10.77.0.N/24). Nothing changes in the caller's own
namespace: a thread enters a host's namespace (setns) to talk to the
fleet, and every process it starts inherits that namespace unless started
through prefix(name) (ip netns exec). A context manager: on the way out
every process still in one of its namespaces (ip netns pids: they can
only be the test's) is killed by PID and the namespaces are deleted, also
when the test failed.
"""

import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time

CLONE_NEWNET = 0x40000000
SUBNET = "10.77.0"


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True,
                   timeout=20)


def in_chroot():
    """Whether / is no mount point, as in a chroot (fresh-debian.sh's):
    namespaces made there cannot be made (unshare --mount-proc) or need
    mounts that outlive the chroot (ip netns)."""
    try:
        with open("/proc/self/mountinfo") as f:
            # The fifth field is the mount point, as this process sees it.
            return not any(line.split()[4] == "/" for line in f)
    except OSError:
        return False


def netns_available():
    """Whether this process may make network namespaces (root, ip, not in
    a chroot)."""
    return (os.geteuid() == 0 and shutil.which("ip") is not None and
            not in_chroot())


class Segment:
    def __init__(self, prefix):
        self.prefix = prefix  # unique per run: names of namespaces
        self.hub = f"{prefix}-hub"
        self.made = []        # namespaces, in order of creation
        self.addresses = {}   # host name -> address

    def __enter__(self):
        try:
            self._add_ns(self.hub)
            ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            ip("-n", self.hub, "link", "set", "br0", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc):
        self.remove()

    def _add_ns(self, ns):
        ip("netns", "add", ns)
        self.made.append(ns)

    def ns(self, name):
        return f"{self.prefix}-{name}"

    def add(self, name, number):
        """Host name at SUBNET.number; returns its address."""
        ns, veth = self.ns(name), f"h-{name}"
        address = f"{SUBNET}.{number}"
        self._add_ns(ns)
        ip("-n", self.hub, "link", "add", veth, "type", "veth", "peer",
           "name", "eth0", "netns", ns)
        ip("-n", self.hub, "link", "set", veth, "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        self.addresses[name] = address
        return address

    def prefix_of(self, name):
        """What goes before a command line to run it in host name."""
        return ["ip", "netns", "exec", self.ns(name)]

    def enter(self, name):
        """Move the calling thread into host name's namespace."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.ns(name)}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    def run_inside(self, name, fn):
        """fn() in a thread of host name's namespace; its result, or its
        exception raised here."""
        out = {}

        def body():
            try:
                self.enter(name)
                out["value"] = fn()
            except BaseException as e:  # handed to the caller
                out["error"] = e
        t = threading.Thread(target=body, daemon=True)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out.get("value")

    def pids(self, name):
        return self._pids(self.ns(name))

    @staticmethod
    def _pids(ns):
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                           text=True, timeout=20)
        return [int(p) for p in r.stdout.split()]

    def kill_all(self, name):
        """SIGKILL every process in host name's namespace, as a power cut
        would; returns the monotonic time just before."""
        at = time.monotonic()
        self._kill_ns(self.ns(name))
        return at

    def _kill_ns(self, ns, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self._pids(ns)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"processes left in {ns}: {self._pids(ns)}")

    def remove(self):
        """Kill what still runs in the namespaces and delete them."""
        for ns in reversed(self.made):
            try:
                self._kill_ns(ns)
            finally:
                subprocess.run(["ip", "netns", "del", ns],
                               capture_output=True, timeout=20)
        self.made.clear()
