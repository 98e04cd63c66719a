--- luasmtp.server.session: one SMTP/LMTP connection.
--
-- The session reads commands and runs them from the command table
-- (luasmtp.server.commands); every decision that is policy goes through
-- the plugin chain of its phase (luasmtp.server.chain). The session
-- table is what plugins get: client_address, client_port, helo_name,
-- esmtp, tls, tls_info(), user, envelope, messages, state (the
-- script's own data), log().
local core = require "luasmtp.core"
local net = require "luasmtp.net"
local chain = require "luasmtp.server.chain"
local commands = require "luasmtp.server.commands"

local M = {}

local Session = {}
Session.__index = Session
M.Session = Session

local LOG_LEVELS = { debug = 1, info = 2, warning = 3, error = 4 }

-- What the sessions of one server share (server, config, chains) and
-- the starting values of the per-session fields, kept once per server
-- in the metatable of its sessions rather than in every session table:
-- a session table holds only what differs (an idle session is small).
local prototypes = setmetatable({}, { __mode = "k" }) -- server -> metatable

local function prototype(server)
  local proto = prototypes[server]
  if not proto then
    proto = setmetatable({
      server = server,
      config = server.config,
      chains = server.chains,
      esmtp = false,
      tls = false,
      messages = 0,
      commands = 0,
      invalid_commands = 0,
      auth_failures = 0,
      idle = false,
    }, Session)
    proto.__index = proto
    prototypes[server] = proto
  end
  return proto
end

function M.new(server, sock, conn)
  -- At most 16 fields (the fields an idle session sets are named here,
  -- so the table is sized once); helo_name, user, envelope: nil until set.
  return setmetatable({
    sock = sock,
    id = conn.id,
    client_address = conn.peer_address,
    client_port = conn.peer_port,
    client_credentials = conn.peer_credentials, -- UNIX socket: {pid, uid, gid}
    local_address = conn.local_address,
    local_port = conn.local_port,
    tls = sock:istls() or nil,
    state = {}, -- the script's own per-session data
    helo_name = nil,
    esmtp = nil,
    commands = nil,
    idle = nil,
    thread = nil,
    opened = nil,
  }, prototype(server))
end

--- session:send_reply(code, enhanced, text): queue a reply.
function Session:send_reply(code, enhanced, text)
  if self.closing then
    return nil, "closed" -- the 421 of the shutdown is the last word
  end
  if not self.config.enhanced_status_codes then
    enhanced = nil
  end
  return self.sock:send(core.format_reply(code, enhanced, text or ""))
end

function Session:log(level, fmt, ...)
  local logger = self.server.logger
  if logger and LOG_LEVELS[level] >= self.server.log_level then
    logger(level, ("[%s] " .. fmt):format(self.id, ...))
  end
end

function Session:tls_info()
  return self.sock:tlsinfo()
end

function Session:reset_envelope()
  if self.incoming then
    self.incoming:discard()
    self.incoming = nil
  end
  if self.bdat then
    self.bdat.sink:close()
    self.bdat = nil
  end
  self.envelope = nil
end

--- session:phase(name, ...) -> nil | reply: run the plugin chain of a
-- phase (nil: the default reply applies).
function Session:phase(name, ...)
  local list = self.chains[name]
  if not list then return nil end -- no plugin in this phase: nothing to call
  return chain.run_list(list, name, self, ...)
end

--- session:logs(level) -> whether a line of this level would be logged
-- (to skip computing what only the log line needs).
function Session:logs(level)
  return self.server.logger ~= nil and LOG_LEVELS[level] >= self.server.log_level
end

--- session:answer(r, code, enhanced, text) -> accepted, disconnect
-- Send a chain's reply (or the default when it is nil).
function Session:answer(r, code, enhanced, text)
  if r == nil then
    self:send_reply(code, enhanced, text)
    return true, false
  end
  self:send_reply(r.code, r.enhanced, r.text)
  return r.code < 400, r.disconnect or false
end

--- session:shutdown(deadline): the server is stopping. A session waiting
-- for a command gets 421 4.3.2 now; a busy one when its command is done,
-- or at the deadline.
function Session:shutdown(deadline)
  self.shutdown_deadline = deadline
  if self.idle then
    self:close_for_shutdown()
  end
end

function Session:close_for_shutdown()
  if self.closing then return end
  local sock = self.sock
  sock:send(core.format_reply(421, "4.3.2", self.config.hostname .. " Service shutting down"))
  self.closing = true
  -- a plugin call in progress is ended as if its deadline had passed
  if self.thread then core.interrupt_guarded(self.thread) end
  core.spawn(function()
    sock:flush(2)
    sock:close() -- the session's wait ends with "closed"
  end)
end

-- Read a PROXY protocol v1 or v2 header (HAProxy) from a trusted peer.
-- Returns info or nil, reason.
local function read_proxy_header(sock, timeout)
  local head, err = sock:receive(5, timeout)
  if not head then return nil, err end
  local raw
  if head == "PROXY" then
    local rest, lerr = sock:receiveline(102, timeout)
    if not rest then return nil, lerr end
    raw = head .. rest .. "\r\n"
  elseif head == "\r\n\r\n\0" then
    local fixed, ferr = sock:receive(11, timeout)
    if not fixed then return nil, ferr end
    local len = fixed:byte(10) * 256 + fixed:byte(11)
    local body, berr = sock:receive(len, timeout)
    if not body then return nil, berr end
    raw = head .. fixed .. body
  else
    return nil, "no PROXY header"
  end
  local info, perr, detail = core.parse_proxy(raw)
  if not info then return nil, detail or perr end
  return info
end

local handlers = commands.handlers
local PARSE_ASCII, PARSE_UTF8 = { utf8 = false }, { utf8 = true }

function Session:run()
  self.thread = coroutine.running()
  -- sockets plugins open with luasmtp.connect (closed when a call fails)
  self.opened = {}
  net.track(self.opened)
  local c = self.config
  local sock = self.sock
  sock:settimeouts(nil, c.timeouts.command, c.timeouts.command)
  if self.server.proxy_trusted and self.server.proxy_trusted(self.client_address) then
    local info, why = read_proxy_header(sock, c.proxy.timeout or 10)
    if not info then
      self:log("info", "bad PROXY header from %s: %s", self.client_address, tostring(why))
      return
    end
    if info.command == "proxy" and info.src_address then
      self.proxy_address, self.proxy_port = info.src_address, info.src_port
      self.client_address, self.client_port = info.src_address, info.src_port
    end
  end
  -- The connect phase sees the real client: the PROXY-reported address
  -- behind a load balancer (the per-address limits are a plugin).
  local r = self:phase("connect")
  if r and (r.code >= 400 or r.disconnect) then
    self:send_reply(r.code, r.enhanced, r.text)
    return
  end
  if r then
    self:send_reply(r.code, r.enhanced, r.text)
  else
    self:send_reply(220, nil, c.hostname .. " " .. (c.lmtp and "LMTP" or c.greeting))
  end
  while true do
    if self.shutdown_deadline then
      self:send_reply(421, "4.3.2", c.hostname .. " Service shutting down")
      return
    end
    -- Non-ASCII paths only inside a transaction that asked for SMTPUTF8.
    local parse_opts = (c.smtputf8 and self.envelope and self.envelope.params.smtputf8)
      and PARSE_UTF8 or PARSE_ASCII
    self.idle = true
    local line, bad = sock:receiveline(c.limits.command_line_length)
    self.idle = false
    if self.closing then return end
    if not line then
      if bad == "limit" then
        self:send_reply(500, "5.5.6", "Line too long")
        self.invalid_commands = self.invalid_commands + 1
      elseif bad == "timeout" then
        self:send_reply(421, "4.4.2", c.hostname .. " Timeout, closing connection")
        return
      else
        return -- closed, reset
      end
    elseif bad then
      -- Bare CR or LF in a command line: smuggling attempt or a broken
      -- client. Refuse it.
      self:send_reply(500, "5.5.2", "Bare CR or LF in command")
      self.invalid_commands = self.invalid_commands + 1
    else
      self.commands = self.commands + 1
      local cmd, code, enh, reason = core.parse_command(line, parse_opts)
      if not cmd and not c.strict_helo then
        -- Real clients send names like "DESKTOP_1A2B" or bare words:
        -- accept any printable single word; the helo phase can be stricter.
        local verb, name = line:match("^(%a%a%a%a) +([%g]+)$")
        verb = verb and verb:upper()
        if verb == "EHLO" or verb == "HELO" or verb == "LHLO" then
          cmd = { verb = verb, arg = name, domain = name, lax = true }
        end
      end
      local outcome
      if not cmd then
        self:send_reply(code, enh, reason)
        self.invalid_commands = self.invalid_commands + 1
      elseif handlers[cmd.verb] then
        outcome = handlers[cmd.verb](self, cmd)
      else
        outcome = commands.unknown(self, line)
      end
      if outcome == "quit" or outcome == "close" then
        return
      end
    end
    if self.invalid_commands >= c.limits.max_invalid_commands then
      self:send_reply(421, "4.7.0", "Too many errors, closing connection")
      return
    end
  end
end

--- serve(server, sock, conn): the connection handler. The disconnect
-- phase always runs, so plugins release what they hold.
function M.serve(server, sock, conn)
  server.active = server.active + 1
  -- a command read right after a reply is queued waits for the client
  -- instead of trying a read that would fail (the client waits for the
  -- reply); pipelined commands already there wake the wait at once
  sock:setoption("waitreply", true)
  local s = M.new(server, sock, conn)
  server.sessions[s] = true
  s:log("info", "connect from %s", net.format_address(conn.peer_address, conn.peer_port))
  if server.shutting_down then s.shutdown_deadline = server.shutting_down end
  local ok, err = xpcall(s.run, debug.traceback, s)
  if not ok then
    s:log("error", "session failed: %s", tostring(err))
    sock:send(core.format_reply(421, "4.3.0", "Internal error"))
  end
  s:reset_envelope()
  s:phase("disconnect")
  net.track(nil)
  s:log("info", "disconnect")
  server.sessions[s] = nil
  server.active = server.active - 1
  sock:flush(1)
end

return M
