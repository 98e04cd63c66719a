--- A scripted SMTP/LMTP server for the client specs, on luasmtp.serve
-- with a raw socket handler (not the project's server engine), so every
-- extension and error path can be staged.
--
--   local srv, port, log = fake.start {
--     ext = { "PIPELINING", "SIZE 1000" },   -- EHLO keywords (default: a common set)
--     rcpt = function(addr, line) return "550 5.1.1 no" end,   -- nil: 250
--     data = function(msg) return "250 ok" end,   -- msg = {from, rcpts, body, params}
--     on = { MAIL = function(line, sock, state) return "reply" | "close" | nil end },
--     tls = server_ctx,                     -- offer STARTTLS with it
--     lmtp = true,                          -- LHLO, one reply per recipient
--     greeting = "220 ...", ehlo = "550 no", idle = 5,
--   }
-- log.commands: every command line; log.buffered: bytes already waiting
-- when each arrived (pipelining); log.messages: what DATA/BDAT delivered;
-- log.connections: how many sessions.
local luasmtp = require "luasmtp"
local json = require "dkjson"
local H = require "spec.helper"

local M = {}

-- Servers and processes started and not yet stopped, for cleanup()
-- after a test (that may have failed half-way).
local started = {}
local pids = {}

local shquote = H.shquote

M.TMP = H.tmp .. "/client"

--- external(cmd [, logfile]) -> pid: start a program (it must end by
-- itself); cleanup() stops it.
function M.external(cmd, logfile)
  local pid = H.start(cmd, logfile)
  pids[#pids + 1] = pid
  return pid
end

--- aiosmtpd(args) -> port, log, pid: start spec/aiosmtpd_server.py
-- (inside a task) with the test PKI and extra arguments; log is the
-- JSON-lines file of the messages it took.
function M.aiosmtpd(args)
  H.need("python3 aiosmtpd")
  os.execute("mkdir -p " .. shquote(M.TMP))
  local d = H.certs()
  local port = H.free_port()
  local log = M.TMP .. "/aiosmtpd-" .. port .. ".jsonl"
  local out = M.TMP .. "/aiosmtpd-" .. port .. ".out"
  os.remove(log)
  os.remove(out)
  local pid = M.external(("exec timeout 60 %s %s --port %d --cert %s --key %s --log %s --lifetime 50 %s")
    :format(H.python3, shquote(H.root .. "/spec/aiosmtpd_server.py"), port, shquote(d .. "/server.pem"),
      shquote(d .. "/server.key"), shquote(log), args or ""), out)
  for _ = 1, 500 do -- at most ~10 s
    local f = io.open(out)
    local text = f and f:read("a") or ""
    if f then f:close() end
    if text:find("READY") then
      return port, log, pid
    end
    luasmtp.sleep(0.02)
  end
  error("aiosmtpd did not start: " .. H.readfile(out))
end

--- messages(log) -> the messages aiosmtpd logged
function M.messages(log)
  local f = io.open(log)
  if not f then return {} end
  local list = {}
  for line in f:lines() do list[#list + 1] = assert(json.decode(line)) end
  f:close()
  return list
end

M.DEFAULT_EXT = { "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE 10485760", "DSN", "SMTPUTF8" }

function M.start(o)
  o = o or {}
  local log = { commands = {}, buffered = {}, messages = {}, connections = 0, sessions = {} }

  local function handler(sock)
    log.connections = log.connections + 1
    local session = { commands = {} }
    log.sessions[#log.sessions + 1] = session
    local function reply(s)
      sock:send(s .. "\r\n")
    end
    if o.greeting ~= false then
      reply(o.greeting or "220 fake.test ESMTP ready")
    end
    local tls = false
    local state = { rcpts = {} }
    local function deliver(body)
      local msg = { from = state.from, rcpts = state.rcpts, body = body, mail = state.mail,
        rcpt_lines = state.rcpt_lines }
      log.messages[#log.messages + 1] = msg
      state.from, state.rcpts, state.rcpt_lines = nil, {}, {}
      if o.lmtp then
        for _, r in ipairs(msg.rcpts) do
          reply(o.data and o.data(msg, r) or "250 2.0.0 delivered to " .. r)
        end
      else
        reply(o.data and o.data(msg) or "250 2.0.0 queued as Q" .. #log.messages)
      end
    end
    while true do
      local line, bad = sock:receiveline(4096, o.idle or 5)
      if not line then return end
      log.commands[#log.commands + 1] = line
      session.commands[#session.commands + 1] = line
      log.buffered[#log.buffered + 1] = sock:buffered()
      if bad then
        reply("500 5.5.2 bare line ending")
        goto continue
      end
      do
        local verb = (line:match("^(%S+)") or ""):upper()
        local custom = o.on and o.on[verb]
        if custom then
          local r = custom(line, sock, state, session)
          if r == "close" then return end
          if r then
            reply(r)
            goto continue
          end
        end
        if verb == "EHLO" or verb == "LHLO" then
          if o.ehlo then
            reply(o.ehlo)
          else
            local lines = { "fake.test hello" }
            for _, e in ipairs(o.ext or M.DEFAULT_EXT) do lines[#lines + 1] = e end
            if o.tls and not tls then lines[#lines + 1] = "STARTTLS" end
            for _, e in ipairs(tls and o.ext_tls or {}) do lines[#lines + 1] = e end
            for i, l in ipairs(lines) do
              sock:send((i < #lines and "250-" or "250 ") .. l .. "\r\n")
            end
          end
        elseif verb == "HELO" then
          reply("250 fake.test")
        elseif verb == "STARTTLS" then
          reply("220 2.0.0 go ahead")
          if not sock:starttls(o.tls, { timeout = 5 }) then return end
          tls = true
          state = { rcpts = {} }
        elseif verb == "MAIL" then
          state.from = line:match("<(.-)>")
          state.mail = line
          state.rcpts, state.rcpt_lines = {}, {}
          reply(o.mail and o.mail(state.from, line) or "250 2.1.0 sender ok")
        elseif verb == "RCPT" then
          local addr = line:match("<(.-)>")
          local r = o.rcpt and o.rcpt(addr, line, state) or "250 2.1.5 recipient ok"
          if r:match("^2") then
            state.rcpts[#state.rcpts + 1] = addr
            state.rcpt_lines[#state.rcpt_lines + 1] = line
          end
          reply(r)
        elseif verb == "DATA" then
          if not state.from or #state.rcpts == 0 then
            reply("554 5.5.1 no valid recipients")
          else
            reply("354 go ahead")
            local lines = {}
            while true do
              local l = sock:receiveline(1 << 20, 5)
              if not l then return end
              if l == "." then break end
              if l:sub(1, 1) == "." then l = l:sub(2) end
              lines[#lines + 1] = l .. "\r\n"
            end
            deliver(table.concat(lines))
          end
        elseif verb == "BDAT" then
          local n, last = line:match("^%S+ (%d+)( ?[Ll]?[Aa]?[Ss]?[Tt]?)$")
          n = tonumber(n)
          local chunk = n > 0 and sock:receive(n, 5) or ""
          if not chunk then return end
          state.bdat = (state.bdat or "") .. chunk
          session.bdat_chunks = (session.bdat_chunks or 0) + 1
          if last ~= "" then
            local b = state.bdat
            state.bdat = nil
            deliver(b)
          else
            reply("250 2.0.0 " .. n .. " octets")
          end
        elseif verb == "RSET" then
          state = { rcpts = {} }
          reply("250 2.0.0 reset")
        elseif verb == "NOOP" then
          reply("250 2.0.0 ok")
        elseif verb == "AUTH" then
          reply("235 2.7.0 ok")
        elseif verb == "QUIT" then
          reply("221 2.0.0 bye")
          return
        else
          reply("500 5.5.1 unknown command")
        end
      end
      ::continue::
    end
  end

  local srv = assert(luasmtp.serve { listen = "127.0.0.1:0", handler = handler, tls = o.implicit })
  started[#started + 1] = srv
  return srv, srv.addresses[1].port, log
end

--- Close every server still listening and let their tasks end (after a
-- test that failed half-way), within 3 seconds.
function M.cleanup()
  for _, pid in ipairs(pids) do H.kill(pid) end
  pids = {}
  for _, srv in ipairs(started) do
    if not srv.closed then srv:close() end
  end
  started = {}
  collectgarbage("collect")
  local deadline = luasmtp.update_now() + 3
  while luasmtp.stats().tasks > 0 and luasmtp.update_now() < deadline do
    luasmtp.step(0.02)
  end
end

return M
