-- wrk script shared by bench.submit_load and bench.reads: every connection sends requests back
-- to back, rotating through a list of paths and a list of bearer tokens (one per line in the
-- files LOAD_PATHS and LOAD_TOKENS), with an optional JSON body and session cookie. Each answer's
-- status is checked against LOAD_EXPECT; done() prints one line of JSON for the Python side.
local method = os.getenv("LOAD_METHOD") or "GET"
local body = os.getenv("LOAD_BODY")
local cookie = os.getenv("LOAD_COOKIE") or ""
local expect = tonumber(os.getenv("LOAD_EXPECT") or "200")

local function lines(name)
  local items = {}
  local file = name and name ~= "" and io.open(name)
  if file then
    for line in file:lines() do
      if line ~= "" then table.insert(items, line) end
    end
    file:close()
  end
  return items
end

local paths = lines(os.getenv("LOAD_PATHS"))
local tokens = lines(os.getenv("LOAD_TOKENS"))

local threads = {}
function setup(thread)
  thread:set("offset", #threads * 7919)
  table.insert(threads, thread)
end

local n = 0
bad = 0
non2xx = 0
first_bad = 0
function request()
  n = n + 1
  local i = n + (offset or 0)
  local headers = {}
  if body then headers["Content-Type"] = "application/json" end
  if cookie ~= "" then headers["Cookie"] = cookie end
  if #tokens > 0 then headers["Authorization"] = "Bearer " .. tokens[1 + i % #tokens] end
  return wrk.format(method, paths[1 + i % #paths], headers, body)
end

function response(status, headers, answer)
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
  if status ~= expect then
    bad = bad + 1
    if first_bad == 0 then first_bad = status end
  end
end

function done(summary, latency, requests)
  local wrong, outside, first = 0, 0, 0
  for _, thread in ipairs(threads) do
    wrong = wrong + thread:get("bad")
    outside = outside + thread:get("non2xx")
    if first == 0 then first = thread:get("first_bad") end
  end
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p90_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f, ' ..
    '"max_ms": %.3f, "socket_errors": %d, "non_2xx": %d, "unexpected": %d, "first_unexpected": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(95) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3,
    e.connect + e.read + e.write + e.timeout, outside, wrong, first))
end
