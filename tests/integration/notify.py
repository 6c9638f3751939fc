"""A NOTIFY_SOCKET, as systemd's: it collects the sd_notify datagrams of
a service started with NOTIFY_SOCKET set to its path. Used by the tests of
the units and of the pool, and by tests/bench/pool_burst.py."""

import os
import socket
import time


class Notify:
    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)  # the service may run as another user
        self.seen = []

    def _receive(self, timeout):
        """One datagram into seen, or False when none came in time."""
        self.sock.settimeout(timeout)
        try:
            self.seen.append(self.sock.recv(4096).decode())
        except (socket.timeout, BlockingIOError):
            return False
        return True

    def wait_for(self, state, timeout=10.0):
        """Until a new datagram holds the line state (READY=1, ...);
        returns that datagram."""
        deadline = time.monotonic() + timeout
        while self._receive(max(0.01, deadline - time.monotonic())):
            if state in self.seen[-1].split("\n"):
                return self.seen[-1]
            if time.monotonic() >= deadline:
                break
        raise AssertionError(f"no {state} from sd_notify; got {self.seen}")

    def has_said(self, state):
        """Whether any datagram so far held the line state; never waits."""
        while self._receive(0):
            pass
        return any(state in m.split("\n") for m in self.seen)

    def close(self):
        self.sock.close()
