-- wrk script for bench/serve.py: POST one pre-built JSON body on every request, then print one line of figures.
--
-- The body and the headers come through the environment (wrk has no flag for a body):
--   BENCH_BODY_FILE  path of the body (JSON, or JSON then binary tensor data)
--   BENCH_HEADERS    one `Name: value` per line; Content-Type is application/json unless it names another
-- The last line wrk prints is `BENCH_RESULT {json}`: request and error counts, latencies in microseconds.

local function read_file(path)
  local file = assert(io.open(path, "rb"))
  local body = file:read("*a")
  file:close()
  return body
end

wrk.method = "POST"
wrk.body = read_file(assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE is not set"))
wrk.headers["Content-Type"] = "application/json"
for name, value in string.gmatch(os.getenv("BENCH_HEADERS") or "", "([^:\n]+):%s*([^\n]*)") do
  wrk.headers[name] = value
end

-- summary.errors.status counts responses with a status of 400 or more.
function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "bad_status": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d}\n',
    summary.requests, summary.duration, errors.status, errors.connect, errors.read, errors.write, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
