-- wrk script of chatfcgi's own bench (tests/bench/bench.py): POST /api/chat
-- with a JSON body, as the shared harness's post.lua does, for when
-- ../shared/bench is absent, and for the memory runs (which stop after a
-- number of requests).
--
--   wrk -t2 -c64 -d8s -s post.lua http://127.0.0.1:PORT/api/chat -- SESSIONS_PER_THREAD
--
-- Each thread round-robins over SESSIONS_PER_THREAD random session ids
-- (bench.py passes connections/threads), so each connection keeps about one
-- session whose history grows to the trim limit (20 messages), like the
-- harness's default "conn" mode.
-- Environment:
--   CHAT_MESSAGE       the message (default "Hello, how are you?")
--   BENCH_STOP_AFTER   stop each thread after this many responses (0: never;
--                      bench.py passes total/threads)
-- At the end it prints the harness's result line:
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

local pool, n, idx, prefix, suffix, stop_after, seen

function init(args)
    math.randomseed(os.time() * 1000 + (tid or 0) * 7919 + math.floor(os.clock() * 1e6))
    n = tonumber(args[1] or "32") or 32
    if n < 1 then n = 1 end
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
    idx = idx % n + 1
    return wrk.format(nil, nil, nil, prefix .. pool[idx] .. suffix)
end

if (tonumber(os.getenv("BENCH_STOP_AFTER") or "0") or 0) > 0 then
    -- defined only when needed: wrk calls response() for every answer
    function response(status, headers, body)
        seen = seen + 1
        if seen >= stop_after then wrk.thread:stop() end
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
