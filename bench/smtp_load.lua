-- bench/smtp_load.lua: an SMTP load generator for the server benchmarks
-- that smtp-source cannot run (it has no STARTTLS and no latency
-- figures). The same script drives every server it is compared against.
--
--   lua5.4 bench/smtp_load.lua --port PORT --messages N [--sessions S]
--       [--size OCTETS] [--per-connection K] [--starttls] [--rate R]
--       [--timeout SECONDS]
--
-- S sessions send N messages of SIZE octets (default 1024) in lock step
-- (EHLO, MAIL, RCPT, DATA, the body with its final dot, one command at a
-- time, no pipelining), K messages on each connection (default 1: a new
-- connection per message), then QUIT. --starttls: STARTTLS and a full
-- handshake on every connection (no session resumption), EHLO again.
-- --rate R: the sessions together start R messages per second on a
-- fixed schedule (each session every S/R seconds); without it they go as
-- fast as the server answers.
--
-- Prints one line: messages=N seconds=T rate=N/T p50_ms=.. p99_ms=..
-- max_ms=.., the latency being the time from sending the body's final
-- dot to reading the 250 reply. A reply that is not the one expected, a
-- closed connection or a timeout stops the run with exit status 1.
local luasmtp = require "luasmtp"
local getopt = require "luasmtp.getopt"

local usage = "usage: smtp_load.lua --port PORT --messages N [--sessions S] [--size OCTETS]\n" ..
  "  [--per-connection K] [--starttls] [--rate R] [--timeout SECONDS]\n"
local opts = getopt.run(function(argv)
  return (getopt.parse(argv, { port = "number", messages = "number", sessions = "number",
    size = "number", ["per-connection"] = "number", starttls = "flag", rate = "number",
    timeout = "number" }))
end, arg, usage)
if not opts.port or not opts.messages then
  io.stderr:write(usage)
  os.exit(2)
end

local port = math.tointeger(opts.port)
local messages = math.tointeger(opts.messages)
local sessions = math.min(math.tointeger(opts.sessions or 1), messages)
local size = math.tointeger(opts.size or 1024)
local per_connection = math.tointeger(opts["per-connection"] or 1)
local timeout = opts.timeout or 30
local tls_ctx = opts.starttls and luasmtp.tls.context { mode = "client", verify = false, session_cache = false }

-- The message: a header block and 80-octet lines up to SIZE octets, no
-- line starting with a dot, ending with CRLF, then the final dot.
local head = "From: <load@bench.test>\r\nTo: <sink@bench.test>\r\nSubject: load\r\n\r\n"
local line = ("x"):rep(78) .. "\r\n"
local body = head .. line:rep(math.max(0, size - #head) // #line)
if #body < size then body = body .. ("y"):rep(math.max(0, size - #body - 2)) .. "\r\n" end
local data = body .. ".\r\n"

local function fail(what, got)
  error(("%s: %s"):format(what, tostring(got)), 0)
end

-- The last line of a (multi-line) reply; fails unless its code is CODE.
local function expect(sock, code, what)
  while true do
    local l, err = sock:receiveline(1024, timeout)
    if not l then fail(what, err) end
    if l:sub(4, 4) ~= "-" then
      if l:sub(1, 3) ~= code then fail(what, l) end
      return
    end
  end
end

local function command(sock, text, code)
  local ok, err = sock:send(text .. "\r\n", timeout)
  if not ok then fail(text, err) end
  expect(sock, code, text)
end

local latencies = {}
local started = 0        -- messages handed to a session so far
local interval = opts.rate and sessions / opts.rate

-- Session i: connections of up to per_connection messages until the
-- shared count of messages is used up.
local function session(i, t0)
  local due = t0 + (opts.rate and (i - 1) * interval / sessions or 0)
  while started < messages do
    local sock, err = luasmtp.connect("127.0.0.1", port, { timeout = timeout })
    if not sock then fail("connect", err) end
    expect(sock, "220", "greeting")
    command(sock, "EHLO load.bench.test", "250")
    if tls_ctx then
      command(sock, "STARTTLS", "220")
      local ok, terr = sock:starttls(tls_ctx, { verify_host = false, timeout = timeout })
      if not ok then fail("TLS handshake", terr) end
      command(sock, "EHLO load.bench.test", "250")
    end
    local sent = 0
    while sent < per_connection and started < messages do
      started = started + 1
      sent = sent + 1
      if interval then
        local wait = due - luasmtp.update_now()
        if wait > 0 then luasmtp.sleep(wait) end
        due = due + interval
      end
      command(sock, "MAIL FROM:<load@bench.test>", "250")
      command(sock, "RCPT TO:<sink@bench.test>", "250")
      command(sock, "DATA", "354")
      local ok, serr = sock:send(data, timeout)
      if not ok then fail("message", serr) end
      local t = luasmtp.update_now()
      expect(sock, "250", "end of data")
      latencies[#latencies + 1] = luasmtp.update_now() - t
    end
    command(sock, "QUIT", "221")
    sock:close()
  end
end

local t0 = luasmtp.update_now()
local tasks = {}
for i = 1, sessions do tasks[i] = luasmtp.spawn(session, i, t0) end
local failed
for _, t in ipairs(tasks) do
  local ok, err = t:join(timeout + messages) -- every step is bounded; this is the backstop
  if not ok then failed = failed or err end
end
local elapsed = luasmtp.update_now() - t0
if failed then
  io.stderr:write("smtp_load: ", tostring(failed), "\n")
  os.exit(1)
end

table.sort(latencies)
local function pct(p)
  return latencies[math.max(1, math.ceil(#latencies * p))] * 1000
end
print(("messages=%d seconds=%.4f rate=%.1f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f"):format(
  #latencies, elapsed, #latencies / elapsed, pct(0.5), pct(0.99), latencies[#latencies] * 1000))
