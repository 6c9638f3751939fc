#!/usr/bin/python3
"""What a worker's first call to an HTTPS provider costs it: CPU time and
memory (PSS, private dirty) of one chat worker before its first turn,
after it, and after a second, against the local model serving HTTPS
behind a private CA. One line per binary, so that two builds compare:

    tls_first_call.py [--runs N] [--pki DIR] [--system-cas] BINARY...

--system-cas trusts the system's CAs (no ca_file), for a binary without
ca_file or to measure what the system bundle costs: run it where the
bundle holds the test CA, e.g. in a mount namespace of its own:

    unshare -m sh -c 'cat /etc/ssl/certs/ca-certificates.crt DIR/ca.crt \
        >/tmp/bundle && mount --bind /tmp/bundle \
        /etc/ssl/certs/ca-certificates.crt && tls_first_call.py --pki DIR \
        --system-cas OLD NEW'

CPU is the worker's own (/proc/PID/schedstat, in ns), memory its
smaps_rollup. Each run starts a fresh stack and model; --workers chat
workers (default 2) each take one turn of a burst, then one of a second
burst; with ca_file, tls_handshakes = 1, so that one worker makes the
full handshake and the others resume its session. Rows are sorted by
the first call's CPU; figures are medians over the runs. Run by hand, not by make
bench or make test.
"""

import argparse
import concurrent.futures
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "deploy/local"), str(REPO / "tests/integration")]

import requests  # noqa: E402
import stack as stack_mod  # noqa: E402
from pki import make_pki, start_tls_model  # noqa: E402


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cpu_ms(pid):
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e6


def memory_kib(pid):
    """(PSS, private dirty) in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            fields[name] = int(rest.split()[0])
    return fields["Pss"], fields["Private_Dirty"]


def chat_workers(http, st):
    status = http.get(f"{st.url}/api/status?full", timeout=5).json()
    return [p["pid"] for p in status["processes"] if p["role"] == "chat"]


def sample(pid):
    return (cpu_ms(pid),) + memory_kib(pid)


def turns_at_once(http, st, n):
    """n turns side by side, so that each of n workers takes one."""
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        for r in pool.map(lambda i: http.post(
                f"{st.url}/api/chat", json={"message": f"hi {i}"},
                timeout=10), range(n)):
            r.raise_for_status()


def one_run(binary, pki, system_cas, workers):
    """Per worker, sorted by its first call's CPU: (first-call CPU ms,
    second-call CPU ms, PSS and private dirty KiB before, after the first
    call, after the second)."""
    port, model_port, redis_port = free_ports(3)
    model, model_url = start_tls_model(pki, model_port)
    run_dir = tempfile.mkdtemp(prefix="tlsfirst")
    env = {"CHATFCGI_BIN": binary, "CHATFCGI_WORKERS": str(workers),
           "CHATFCGI_UPSTREAM_URL": f"{model_url}/v1"}
    if not system_cas:
        env["CHATFCGI_UPSTREAM_CA_FILE"] = str(pki / "ca.crt")
        env["CHATFCGI_UPSTREAM_TLS_HANDSHAKES"] = "1"
    st = stack_mod.Stack(run_dir, port, redis_port=redis_port,
                         env={**os.environ, **env})
    http = requests.Session()
    http.trust_env = False
    control = requests.Session()
    control.trust_env = False
    control.verify = str(pki / "ca.crt")
    try:
        st.start()
        pids = chat_workers(http, st)
        control.post(f"{model_url}/control", json={"delay_ms": 300},
                     timeout=5).raise_for_status()
        samples = [[sample(pid) for pid in pids]]
        for _ in range(2):
            turns_at_once(http, st, workers)
            samples.append([sample(pid) for pid in pids])
    finally:
        st.stop()
        model.terminate()
        model.wait(timeout=10)
    rows = []
    for (c0, p0, d0), (c1, p1, d1), (c2, p2, d2) in zip(*samples):
        rows.append((c1 - c0, c2 - c1, p0, d0, p1, d1, p2, d2))
    return sorted(rows)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pki", type=Path, help="a directory made by "
                        "tests/integration/pki.py (default: a new one)")
    parser.add_argument("--system-cas", action="store_true")
    parser.add_argument("--workers", type=int, default=2,
                        help="each takes one turn of a burst (default 2: "
                        "one full handshake, one resumed)")
    parser.add_argument("binaries", nargs="+")
    args = parser.parse_args(argv)
    pki = args.pki or make_pki(Path(tempfile.mkdtemp(prefix="tlspki")))
    print("binary\tfirst call CPU ms\tsecond call CPU ms\tPSS KiB "
          "before/after 1st/after 2nd\tprivate dirty KiB before/after "
          "1st/after 2nd")
    for binary in args.binaries:
        runs = [one_run(str(Path(binary).resolve()), pki, args.system_cas,
                        args.workers) for _ in range(args.runs)]
        for w in range(args.workers):
            m = [statistics.median(col) for col in zip(*(r[w] for r in runs))]
            print(f"{binary} worker {w + 1}\t{m[0]:.1f}\t{m[1]:.1f}\t"
                  f"{m[2]:.0f}/{m[4]:.0f}/{m[6]:.0f}\t"
                  f"{m[3]:.0f}/{m[5]:.0f}/{m[7]:.0f}")

if __name__ == "__main__":
    main(sys.argv[1:])
