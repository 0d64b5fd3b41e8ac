-- wrk -s bench/unique.lua URL -- BODYFILE NONCE
-- Every request is a different notification: "__N__" in the body becomes a fresh number, so the
-- receiver's replay detection never takes a shortcut.
local body, nonce, counter = nil, "0", 0

function init(args)
  local f = assert(io.open(args[1], "r"))
  body = f:read("*a")
  f:close()
  nonce = args[2] or "0"
end

function request()
  counter = counter + 1
  local n = nonce .. string.format("%09d", counter)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, (body:gsub("__N__", n)))
end

function done(summary, latency, requests)
  io.write(string.format("BENCH requests=%d errors_status=%d errors_connect=%d errors_timeout=%d duration_us=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.errors.status, summary.errors.connect, summary.errors.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
