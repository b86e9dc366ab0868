-- wrk script for bench/ingest.py: signed single-event webhooks, every body sent once.
-- Arguments: <file of "signature<TAB>body" lines> <number of wrk threads>.
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path, nthreads = args[1], tonumber(args[2])
  sigs, bodies, counter = {}, {}, 1
  local i = 0
  for line in io.lines(path) do
    if i % nthreads == id then
      local tab = line:find("\t", 1, true)
      sigs[#sigs + 1] = line:sub(1, tab - 1)
      bodies[#bodies + 1] = line:sub(tab + 1)
    end
    i = i + 1
  end
end

function request()
  local k = counter
  counter = counter + 1
  if counter > #bodies then counter = 1 end
  return wrk.format("POST", "/webhooks/extole/production",
    {["Content-Type"] = "application/json", ["X-Extole-Signature"] = sigs[k]}, bodies[k])
end

function done(summary, latency, requests)
  io.write(string.format(
    "JSON {\"requests\": %d, \"duration_us\": %d, \"status_errors\": %d, \"connect_errors\": %d, " ..
    "\"read_errors\": %d, \"timeouts\": %d, \"p50_ms\": %.3f, \"p99_ms\": %.3f, \"max_ms\": %.3f}\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
