-- wrk script for bench.poll_latency's flat-out pass: every connection asks for a task's live
-- partial (as htmx does, with the session cookie) again as soon as the last answer is in.
-- Each answer is checked (status 200 and the expected text), so a 302 to /login cannot pass.
local path = os.getenv("POLL_PATH")           -- e.g. /tasks/%d/live?seen=PROCESSING
local first = tonumber(os.getenv("POLL_FIRST"))
local count = tonumber(os.getenv("POLL_COUNT"))
local cookie = os.getenv("POLL_COOKIE") or ""
local expect = os.getenv("POLL_EXPECT") or ""

local threads = {}
function setup(thread)
  thread:set("offset", #threads * 7)
  table.insert(threads, thread)
end

local n = 0
bad = 0
function request()
  n = n + 1
  local headers = { ["HX-Request"] = "true" }
  if cookie ~= "" then headers["Cookie"] = cookie end
  return wrk.format("GET", string.format(path, first + (n + offset) % count), headers)
end

function response(status, headers, body)
  if status ~= 200 or not string.find(body, expect, 1, true) then bad = bad + 1 end
end

function done(summary, latency, requests)
  local wrong = 0
  for _, thread in ipairs(threads) do wrong = wrong + thread:get("bad") end
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, ' ..
    '"socket_errors": %d, "bad_answers": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, e.connect + e.read + e.write + e.timeout, wrong))
end
