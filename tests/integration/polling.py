"""Bounded waiting, shared by the integration tests."""

import time


def wait_for(fn, timeout, interval=0.05):
    """fn()'s first truthy result within timeout seconds, else its last."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)
