"""200 concurrent streams of about 5 s each, with a worker for each: every
one completes with `done`, in about the time of one, and no worker is left
stuck afterwards (status shows every chat worker idle again)."""

import threading
import time

from sse_client import stream_chat

STREAMS = 200
WORDS = 11            # the model streams one word per event ...
CHUNK_DELAY_MS = 500  # ... this far apart: about 5 s a stream
STACK_ENV = {"CHATFCGI_WORKERS": str(STREAMS + 10),
             "CHATFCGI_QUEUE_TIMEOUT_MS": "0"}


def test_200_concurrent_five_second_streams(stack, http, model):
    model.set(reply=" ".join(f"w{i}" for i in range(WORDS)),
              chunk_delay_ms=CHUNK_DELAY_MS)
    results = [None] * STREAMS

    def one(i):
        try:
            results[i] = stream_chat(stack.url, f"stream {i}",
                                     read_timeout=10, total_timeout=30)
        except Exception as e:  # reported below, with the others
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - start
    failed = [(i, r) for i, r in enumerate(results)
              if isinstance(r, Exception) or r is None or r.done is None]
    print(f"\n{STREAMS} streams of {WORDS} events {CHUNK_DELAY_MS} ms apart: "
          f"{STREAMS - len(failed)} completed in {elapsed:.1f} s")
    assert not failed, failed[:3]
    assert all(len(r.deltas) == WORDS for r in results)
    assert elapsed < 2.5 * WORDS * CHUNK_DELAY_MS / 1000

    # Nobody stuck: every chat worker is idle again, and a turn works.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status = http.get(f"{stack.url}/api/status", timeout=5).json()
        if status["active_processes"] == 0:
            break
        time.sleep(0.1)
    assert status["active_processes"] == 0, status["active_processes"]
    assert status["max_active_processes"] >= STREAMS
    model.set(chunk_delay_ms=0)
    r = http.post(f"{stack.url}/api/chat", json={"message": "after"},
                  timeout=10)
    assert r.status_code == 200, r.text
