#!/usr/bin/env bash
# Profile one chatfcgi worker under load (by hand; make bench does not run it):
#
#   tests/bench/profile.sh [WORKERS] [CONC] [SECONDS] [DELAY_MS]   (default 16 16 5 0)
#
# Starts the shared harness's Redis and fake upstream (ctl.sh, BENCH_RUN_DIR
# build/bench/profile-harness) and chatfcgi + nginx (deploy/local/stack.py,
# build/bench/run/profile, port BENCH_PORT or 18100), then, each during its
# own wrk run of SECONDS at CONC connections:
#   0. cpu_split.py: the CPU time of every process on the host meanwhile,
#      per request and per group (chatfcgi, its nginx, the fake model's
#      nginx, Redis, wrk)
#   1. strace -c -f -p <one worker>: syscalls per request = the calls strace
#      counted / the requests that worker served meanwhile (its counter in
#      /api/status)
#   2. perf record -e cpu-clock -g -p <the same worker> (when perf works):
#      the top 15 symbols
#   3. perf record -a (every process on the host) with -g: the top 25
#      symbols of the whole system, to see where a request's CPU goes
# Everything it started is stopped on exit. Output files: build/bench/profile/.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_DIR=${BENCH_DIR:-$REPO/../shared/bench}
WORKERS=${1:-16} CONC=${2:-16} SECS=${3:-5} DELAY=${4:-0}
PORT=${BENCH_PORT:-18100}
OUT=$REPO/build/bench/profile
export BENCH_RUN_DIR=$REPO/build/bench/profile-harness
# The same session ids in the warm-up and in every run after it (session.lua).
export BENCH_SEED=1
RUN=$REPO/build/bench/run/profile
URL=http://127.0.0.1:$PORT
mkdir -p "$OUT" "$BENCH_RUN_DIR"
[ -x "$BENCH_DIR/ctl.sh" ] || { echo "profile.sh: needs the shared harness ($BENCH_DIR)" >&2; exit 1; }

cleanup() {
    CHATFCGI_RUN_DIR=$RUN /usr/bin/python3 "$REPO/deploy/local/stack.py" stop >/dev/null 2>&1 || true
    "$BENCH_DIR/ctl.sh" stop all >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$BENCH_DIR/ctl.sh" start redis
"$BENCH_DIR/ctl.sh" start upstream "$DELAY"
rm -rf "$RUN"
CHATFCGI_RUN_DIR=$RUN CHATFCGI_PORT=$PORT CHATFCGI_WORKERS=$WORKERS \
CHATFCGI_REDIS_URL=redis://127.0.0.1:16379/0 \
CHATFCGI_UPSTREAM_URL=http://127.0.0.1:18000/v1 CHATFCGI_API_KEY=sk-fake \
CHATFCGI_MODEL=fake-1 CHATFCGI_UPSTREAM_SYSTEM_PROMPT="You are a helpful assistant." \
CHATFCGI_UPSTREAM_TIMEOUT_MS=30000 \
    /usr/bin/python3 "$REPO/deploy/local/stack.py" start >/dev/null

# pid and request count of the first chat worker
worker() {
    curl -s "$URL/api/status" | /usr/bin/python3 -c '
import json, sys
ws = [p for p in json.load(sys.stdin)["processes"] if p["role"] == "chat"]
pid = int(sys.argv[1]) if len(sys.argv) > 1 else ws[0]["pid"]
print(pid, next(p["requests"] for p in ws if p["pid"] == pid))' "$@"
}
load() {
    wrk -t2 -c"$CONC" -d"${SECS}s" --timeout 10s -s "$REPO/tests/bench/session.lua" \
        "$URL/api/chat" -- $(( CONC / 2 > 0 ? CONC / 2 : 1 )) | grep '^@@RESULT'
}

# warm up every worker's Redis and upstream connections
wrk -t2 -c"$CONC" -d2s -s "$REPO/tests/bench/session.lua" "$URL/api/chat" -- 8 >/dev/null

echo "== CPU per request by process during wrk -c$CONC -d${SECS}s"
/usr/bin/python3 "$REPO/tests/bench/cpu_split.py" \
    --label "$RUN/nginx.conf=nginx (front)" \
    --label "$BENCH_RUN_DIR=fake model (nginx)" \
    -- wrk -t2 -c"$CONC" -d"${SECS}s" --timeout 10s -s "$REPO/tests/bench/session.lua" \
    "$URL/api/chat" -- $(( CONC / 2 > 0 ? CONC / 2 : 1 )) | grep -v '^ *[0-9.]*%\|Latency\|Req/Sec\|Thread'

read -r PID N0 < <(worker)
echo "== strace -c -f -p $PID during wrk -c$CONC -d${SECS}s (model delay $DELAY ms, $WORKERS workers)"
strace -c -f -p "$PID" -o "$OUT/strace.txt" &
SPID=$!
sleep 0.5
load
sleep 0.5
kill -INT "$SPID"; wait "$SPID" || true
read -r _ N1 < <(worker "$PID")
cat "$OUT/strace.txt"
CALLS=$(awk '$NF == "total" { print $(NF-2) }' "$OUT/strace.txt")
echo "requests served by $PID meanwhile: $((N1 - N0)); syscalls: $CALLS;" \
     "per request: $(awk -v c="$CALLS" -v n="$((N1 - N0))" 'BEGIN { printf "%.1f", n ? c / n : 0 }')"

if perf record -q -e cpu-clock -o /dev/null true >/dev/null 2>&1; then
    echo "== perf record -e cpu-clock -g -p $PID during wrk -c$CONC -d${SECS}s"
    perf record -q -e cpu-clock -F 4999 -g -p "$PID" -o "$OUT/perf-worker.data" -- sleep "$SECS" &
    PPID_=$!
    load
    wait "$PPID_" || true
    perf report -i "$OUT/perf-worker.data" --stdio --no-children --sort symbol 2>/dev/null \
        | grep -E '^ +[0-9.]+%' | head -15 || true
    echo "== perf record -a -g (whole host) during wrk -c$CONC -d${SECS}s"
    perf record -q -e cpu-clock -F 999 -a -g -o "$OUT/perf-all.data" -- sleep "$SECS" &
    PPID_=$!
    load
    wait "$PPID_" || true
    perf report -i "$OUT/perf-all.data" --stdio --no-children --sort comm 2>/dev/null \
        | grep -E '^ +[0-9.]+%' | head -12 || true
    perf report -i "$OUT/perf-all.data" --stdio --no-children --comm chatfcgi --sort symbol 2>/dev/null \
        | grep -E '^ +[0-9.]+%' | head -25 || true
else
    echo "== perf does not work here (perf_event_paranoid, or no PMU): skipped"
fi
