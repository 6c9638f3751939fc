-- wrk script of bench.py's conn-mode rows, their warm-ups and the cpu phase:
-- the shared harness's post.lua (../shared/bench/post.lua) with the same
-- body, the same sessions and the same @@RESULT line, plus a seed, so that
-- a warm-up run and the measured run after it send the same session ids.
--
--   BENCH_SEED=7 wrk -t2 -c64 -d8s -s session.lua http://127.0.0.1:PORT/api/chat -- 32
--
-- Argument: SESSIONS_PER_THREAD, as for post.lua (bench.py passes
-- connections/threads). Environment:
--   SESSION_MODE=conn     (default) each thread round-robins over a pool of
--                         4 x SESSIONS_PER_THREAD ids: four sessions per
--                         connection, so a session's next turn is sent about
--                         four round trips after its last one, and its
--                         history grows to the trim limit
--   SESSION_MODE=request  a new id on every request (empty history)
--   BENCH_SEED            the ids come from this seed and the thread's number:
--                         the same seed and thread count give the same ids, and
--                         the pool of a smaller SESSIONS_PER_THREAD is the start
--                         of a larger one's (so one warm-up at the largest
--                         concurrency fills every smaller pool too). Unset: a
--                         random seed per run, as post.lua
--   BENCH_STOP_AFTER      stop each thread after this many responses (0: never);
--                         a thread that stops prints "@@DONE" (wrk itself runs
--                         out its -d: bench.py sends SIGINT once every thread
--                         printed it)
--   CHAT_MESSAGE          the message (default "Hello, how are you?")
-- At the end it prints the harness's line:
--   @@RESULT requests=N seconds=S rps=R p50_ms=A p99_ms=B non2xx=C sockerr=D
-- non2xx counts responses with status >= 400 (wrk's "status" errors).

local counter = 0

function setup(thread)
    counter = counter + 1
    thread:set("tid", counter)
end

local function hex32()
    local t = {}
    for i = 1, 32 do t[i] = string.format("%x", math.random(0, 15)) end
    return table.concat(t)
end

local mode, pool, n, idx, prefix, suffix, stop_after, seen

function init(args)
    local seed = tonumber(os.getenv("BENCH_SEED") or "")
    if seed then
        math.randomseed(seed * 1000 + (tid or 0))
    else
        math.randomseed(os.time() * 1000 + (tid or 0) * 7919 + math.floor(os.clock() * 1e6))
    end
    mode = os.getenv("SESSION_MODE") or "conn"
    n = tonumber(args[1] or os.getenv("SESSIONS_PER_THREAD") or "32") or 32
    if n < 1 then n = 1 end
    n = n * 4
    pool = {}
    for i = 1, n do pool[i] = hex32() end
    idx = 0
    local msg = os.getenv("CHAT_MESSAGE") or "Hello, how are you?"
    msg = msg:gsub('\\', '\\\\'):gsub('"', '\\"')
    prefix = '{"session_id":"'
    suffix = '","message":"' .. msg .. '"}'
    stop_after = tonumber(os.getenv("BENCH_STOP_AFTER") or "0") or 0
    seen = 0
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
end

function request()
    local sid
    if mode == "request" then
        sid = hex32()
    else
        idx = idx % n + 1
        sid = pool[idx]
    end
    return wrk.format(nil, nil, nil, prefix .. sid .. suffix)
end

if (tonumber(os.getenv("BENCH_STOP_AFTER") or "0") or 0) > 0 then
    -- defined only when needed: wrk calls response() for every answer
    function response(status, headers, body)
        seen = seen + 1
        if seen == stop_after then
            io.write("@@DONE\n")
            io.stdout:flush()
            wrk.thread:stop()
        end
    end
end

function done(summary, latency, requests)
    local e = summary.errors
    local secs = summary.duration / 1e6
    io.write(string.format(
        "@@RESULT requests=%d seconds=%.2f rps=%.1f p50_ms=%.2f p99_ms=%.2f non2xx=%d sockerr=%d\n",
        summary.requests, secs, summary.requests / secs,
        latency:percentile(50) / 1000, latency:percentile(99) / 1000,
        e.status, e.connect + e.read + e.write + e.timeout))
end
