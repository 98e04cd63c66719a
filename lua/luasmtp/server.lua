--- luasmtp.server: the SMTP/LMTP server engine.
--
-- The C core parses commands, encodes replies and decodes DATA; this
-- module is the session state machine and the policy hooks. A server is
-- a table of options (see README "SMTP server"); each connection runs
-- as its own task.
local core = require "luasmtp.core"
local net = require "luasmtp.net"

local M = {}

-- Servers started in this process (for `luasmtp serve` to stop them).
local running = setmetatable({}, { __mode = "k" })

---------------------------------------------------------------------------
-- Replies

local Reply = {}
Reply.__index = Reply

--- reply(code, enhanced, text): a reply value hooks can return.
-- enhanced may be nil; text may hold several lines.
function M.reply(code, enhanced, text)
  assert(math.type(code) == "integer" and code >= 200 and code <= 599, "reply code must be 200..599")
  return setmetatable({ code = code, enhanced = enhanced, text = text }, Reply)
end

function M.tempfail(text, enhanced)
  return M.reply(451, enhanced or "4.3.0", text or "Temporary failure, try again later")
end

function M.reject(text, enhanced)
  return M.reply(550, enhanced or "5.7.1", text or "Rejected")
end

--- disconnect(text): reply 421 and close the connection.
function M.disconnect(text)
  local r = M.reply(421, "4.7.0", text or "Closing connection")
  r.disconnect = true
  return r
end

--- per_recipient{ [rcpt] = reply, ... }: an LMTP on_data result giving
-- some recipients their own reply; the others get the default 250.
function M.per_recipient(map)
  local r = M.reply(250, "2.0.0", "Delivered")
  r.per_recipient = map
  return r
end

M.is_reply = function(v) return getmetatable(v) == Reply end

---------------------------------------------------------------------------
-- Defaults, merged in one place

local DEFAULTS = {
  hostname = "localhost",
  greeting = "ESMTP",
  lmtp = false,
  submission = false,
  pipelining = true,
  smtputf8 = true,
  eightbitmime = true,
  chunking = true,
  dsn = false, -- true: advertise DSN; only when the script honours NOTIFY/RET (RFC 3461)
  enhanced_status_codes = true,
  requiretls = true,
  received_header = true,
  spool_threshold = 1024 * 1024, -- bodies larger than this go to a spool file in spool_dir
  -- spool_dir: where (default $TMPDIR or /tmp); best the store's own directory
  bare_newlines = "reject", -- or "normalise"
  log_level = "info", -- least important level passed to the logger
  strict_helo = false, -- true: EHLO/HELO must name a valid domain or address literal
  allow_plaintext_auth = false,
  auth_failure_delay = 1.0,
  limits = {
    max_connections = 1000,
    max_connections_per_ip = 50,
    connection_rate_per_ip = 0, -- new connections per minute from one address (0: no limit)
    max_messages_per_connection = 100,
    max_recipients = 100,
    max_message_size = 35 * 1024 * 1024,
    max_invalid_commands = 10,
    max_auth_failures = 3,
    command_line_length = 512,
    text_line_length = 1000,
  },
  timeouts = {
    greeting = 0, -- pause before the greeting to catch early talkers
    command = 300,
    data_block = 180,
    data_total = 600,
    tls_handshake = 30,
  },
}

local function merge(defaults, opts)
  local out = {}
  for k, v in pairs(defaults) do
    if type(v) == "table" then
      out[k] = merge(v, opts and opts[k] or {})
    elseif opts and opts[k] ~= nil then
      out[k] = opts[k]
    else
      out[k] = v
    end
  end
  for k, v in pairs(opts or {}) do
    if out[k] == nil then out[k] = v end
  end
  return out
end

---------------------------------------------------------------------------
-- Session

local Session = {}
Session.__index = Session

local function new_session(server, sock, conn)
  return setmetatable({
    server = server,
    config = server.config,
    sock = sock,
    id = conn.id,
    client_address = conn.peer_address,
    client_port = conn.peer_port,
    client_credentials = conn.peer_credentials, -- UNIX socket: {pid, uid, gid}
    local_address = conn.local_address,
    local_port = conn.local_port,
    helo_name = nil,
    esmtp = false,
    tls = sock:istls(),
    user = nil,
    envelope = nil,
    messages = 0,
    invalid_commands = 0,
    auth_failures = 0,
    state = {}, -- the script's own per-session data
  }, Session)
end

--- session:send_reply(code, enhanced, text): queue a reply.
function Session:send_reply(code, enhanced, text)
  if not self.config.enhanced_status_codes then
    enhanced = nil
  end
  return self.sock:send(core.format_reply(code, enhanced, text or ""))
end

local LOG_LEVELS = { debug = 1, info = 2, warning = 3, error = 4 }

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
  self.envelope = nil
end

-- Call a hook; returns nil (accept) or a Reply. An error in a hook is
-- logged with its traceback and becomes 451 4.3.0.
function Session:hook(name, ...)
  local fn = self.config.hooks and self.config.hooks[name]
  if not fn then
    return nil
  end
  local ok, res = xpcall(fn, debug.traceback, self, ...)
  if not ok then
    self:log("error", "hook %s failed: %s", name, tostring(res))
    return M.reply(451, "4.3.0", "Internal error, try again later")
  end
  if res == nil or res == true then
    return nil
  end
  if res == false then
    return M.reply(550, "5.7.1", "Rejected by policy")
  end
  if type(res) == "string" then
    local code, rest = res:match("^([2-5]%d%d)[ %-]?(.*)$")
    assert(code, "hook " .. name .. " returned a string that is not a reply")
    local enh, text = rest:match("^([245]%.%d%d?%d?%.%d%d?%d?) (.*)$")
    return M.reply(math.tointeger(tonumber(code)), enh, text or rest)
  end
  assert(M.is_reply(res), "hook " .. name .. " must return nil, true, false, a reply or a reply string")
  return res
end

-- Send a hook's reply (or the default) and say whether it accepted.
-- Returns accepted (bool), disconnect (bool).
function Session:answer(r, code, enhanced, text)
  if r == nil then
    self:send_reply(code, enhanced, text)
    return true, false
  end
  self:send_reply(r.code, r.enhanced, r.text)
  return r.code < 400, r.disconnect or false
end

---------------------------------------------------------------------------
-- Commands

local handlers = {}

local function ehlo_lines(s)
  local c = s.config
  local lines = { c.hostname .. (s.client_address and (" greets " .. s.client_address) or "") }
  local function add(l) lines[#lines + 1] = l end
  if c.pipelining then add("PIPELINING") end
  if c.eightbitmime then add("8BITMIME") end
  if c.smtputf8 then add("SMTPUTF8") end
  add("SIZE " .. math.tointeger(c.limits.max_message_size))
  if c.chunking then add("CHUNKING") end
  if c.enhanced_status_codes then add("ENHANCEDSTATUSCODES") end
  if c.dsn then add("DSN") end
  if c.tls and not s.tls and not c.lmtp_no_tls then add("STARTTLS") end
  local mechs = s.server:auth_mechanisms(s)
  if #mechs > 0 and not s.user then add("AUTH " .. table.concat(mechs, " ")) end
  if c.requiretls and s.tls then add("REQUIRETLS") end
  add(("LIMITS RCPTMAX=%d MAILMAX=%d"):format(c.limits.max_recipients, c.limits.max_messages_per_connection))
  return table.concat(lines, "\n")
end

local function greet(s, cmd, esmtp)
  if not cmd.arg or cmd.arg == "" then
    return s:send_reply(501, "5.5.4", "Syntax: " .. cmd.verb .. " hostname")
  end
  local r = s:hook("on_helo", cmd.arg, esmtp)
  if r and r.code >= 400 then
    return s:answer(r)
  end
  s.helo_name = cmd.arg
  s.esmtp = esmtp
  s:reset_envelope()
  if esmtp then
    return s:answer(r, 250, nil, ehlo_lines(s))
  end
  return s:answer(r, 250, nil, s.config.hostname)
end

handlers.EHLO = function(s, cmd)
  if s.config.lmtp then
    return s:send_reply(500, "5.5.1", "This is an LMTP server: use LHLO")
  end
  return greet(s, cmd, true)
end

handlers.HELO = function(s, cmd)
  if s.config.lmtp then
    return s:send_reply(500, "5.5.1", "This is an LMTP server: use LHLO")
  end
  return greet(s, cmd, false)
end

handlers.LHLO = function(s, cmd)
  if not s.config.lmtp then
    return s:send_reply(500, "5.5.1", "Command unrecognized")
  end
  return greet(s, cmd, true)
end

handlers.NOOP = function(s)
  return s:send_reply(250, "2.0.0", "OK")
end

handlers.RSET = function(s)
  s:reset_envelope()
  local r = s:hook("on_rset")
  return s:answer(r, 250, "2.0.0", "OK")
end

handlers.HELP = function(s)
  return s:send_reply(214, "2.0.0", "See RFC 5321")
end

handlers.VRFY = function(s, cmd)
  local r = s:hook("on_vrfy", cmd.arg)
  return s:answer(r, 252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
end

handlers.EXPN = function(s, cmd)
  if s.config.hooks and s.config.hooks.on_expn then
    local r = s:hook("on_expn", cmd.arg)
    return s:answer(r, 502, "5.5.1", "EXPN not available")
  end
  return s:send_reply(502, "5.5.1", "EXPN not available")
end

handlers.QUIT = function(s)
  s:send_reply(221, "2.0.0", "Bye")
  return "quit"
end

handlers.STARTTLS = function(s, cmd)
  if not s.config.tls or s.tls then
    return s:send_reply(502, "5.5.1", "STARTTLS not available")
  end
  if cmd.arg and cmd.arg ~= "" then
    return s:send_reply(501, "5.5.4", "Syntax: STARTTLS")
  end
  s:send_reply(220, "2.0.0", "Ready to start TLS")
  -- starttls flushes the reply, then discards any plaintext that came
  -- after the command (STARTTLS injection) before the handshake.
  local ok, err, detail = s.sock:starttls(s.config.tls, { timeout = s.config.timeouts.tls_handshake })
  if not ok then
    s:log("info", "TLS handshake failed: %s %s", err, tostring(detail))
    return "close"
  end
  -- RFC 3207: forget everything learnt before TLS.
  s.tls = true
  s.helo_name, s.esmtp, s.user, s.envelope = nil, false, nil, nil
  local r = s:hook("on_starttls", s.sock:tlsinfo())
  if r then
    s:send_reply(r.code, r.enhanced, r.text)
    if r.disconnect or r.code >= 400 then return "close" end
  end
end

handlers.AUTH = function(s, cmd)
  return s.server:auth_command(s, cmd)
end

local function need_helo(s)
  if not s.helo_name then
    s:send_reply(503, "5.5.1", "Send " .. (s.config.lmtp and "LHLO" or "EHLO/HELO") .. " first")
    return true
  end
end

handlers.MAIL = function(s, cmd)
  if need_helo(s) then return end
  if s.envelope then
    return s:send_reply(503, "5.5.1", "Nested MAIL command")
  end
  if s.config.submission and not s.user then
    return s:send_reply(530, "5.7.0", "Authentication required")
  end
  if s.messages >= s.config.limits.max_messages_per_connection then
    return s:send_reply(452, "4.5.3", "Too many messages in this connection")
  end
  if cmd.unknown then
    return s:send_reply(555, "5.5.4", "Unsupported parameter " .. cmd.unknown[1])
  end
  if cmd.size and cmd.size > s.config.limits.max_message_size then
    return s:send_reply(552, "5.3.4", "Message size exceeds fixed limit")
  end
  if cmd.smtputf8 and not s.config.smtputf8 then
    return s:send_reply(555, "5.5.4", "SMTPUTF8 not supported")
  end
  if (cmd.ret or cmd.envid) and not s.config.dsn then
    return s:send_reply(555, "5.5.4", "DSN not supported")
  end
  if cmd.utf8 and not cmd.smtputf8 then
    return s:send_reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
  end
  if cmd.requiretls and not (s.tls and s.config.requiretls) then
    return s:send_reply(530, "5.7.10", "REQUIRETLS needs TLS")
  end
  if cmd.body == "BINARYMIME" and not s.config.chunking then
    return s:send_reply(555, "5.5.4", "BINARYMIME needs CHUNKING")
  end
  if cmd.body == "8BITMIME" and not s.config.eightbitmime then
    return s:send_reply(555, "5.5.4", "8BITMIME not supported")
  end
  local p = cmd
  local env = { from = cmd.path, params = p, rcpt = {}, rcpt_params = {} }
  s.envelope = env
  local r = s:hook("on_mail", cmd.path, p)
  local accepted, disc = s:answer(r, 250, "2.1.0", "Sender OK")
  s:log("info", "mail from=<%s> %s", cmd.path, accepted and "accepted" or ("refused " .. r.code))
  if not accepted then
    s.envelope = nil
  end
  if disc then return "close" end
end

handlers.RCPT = function(s, cmd)
  if need_helo(s) then return end
  local env = s.envelope
  if not env then
    return s:send_reply(503, "5.5.1", "Need MAIL before RCPT")
  end
  if #env.rcpt >= s.config.limits.max_recipients then
    return s:send_reply(452, "4.5.3", "Too many recipients")
  end
  if cmd.unknown then
    return s:send_reply(555, "5.5.4", "Unsupported parameter " .. cmd.unknown[1])
  end
  if cmd.utf8 and not env.params.smtputf8 then
    return s:send_reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
  end
  if (cmd.notify or cmd.orcpt) and not s.config.dsn then
    return s:send_reply(555, "5.5.4", "DSN not supported")
  end
  local p = cmd
  local r = s:hook("on_rcpt", cmd.path, p)
  if r == nil and s.server.relay_check then
    r = s.server.relay_check(s, cmd.path)
  end
  local accepted, disc = s:answer(r, 250, "2.1.5", "Recipient OK")
  s:log("info", "rcpt to=<%s> %s", cmd.path, accepted and "accepted" or ("refused " .. r.code))
  if accepted then
    env.rcpt[#env.rcpt + 1] = cmd.path
    env.rcpt_params[#env.rcpt] = p
  end
  if disc then return "close" end
end

---------------------------------------------------------------------------
-- Messages

local Message = {}
Message.__index = Message

--- message:read() -> the whole message as a string (Received header first).
function Message:read()
  local parts = { self.header }
  for piece in self.sink:chunks() do parts[#parts + 1] = piece end
  return table.concat(parts)
end

--- message:chunks([size]) -> iterator over the message in pieces: the
-- header first, then the body from wherever the sink holds it.
function Message:chunks(size)
  local header_done = #self.header == 0
  local body = self.sink:chunks(size)
  return function()
    if not header_done then
      header_done = true
      return self.header
    end
    return body()
  end
end

--- message.sink: the body (core.sink: in memory, or in a spool file in
-- spool_dir past spool_threshold). A spooled body is discarded after
-- on_data returns; one in memory stays readable like a string would.
function Message:discard()
  if self.sink:spooled() then self.sink:close() end
end

local function received_header(s)
  local with = s.config.lmtp and "LMTP" or (s.esmtp and "ESMTP" or "SMTP")
  if s.tls then with = with .. "S" end
  if s.user then with = with .. "A" end
  local info = s.tls and s.sock:tlsinfo()
  local tlsnote = info and (" (%s %s)"):format(info.version, info.cipher) or ""
  local rcpt = #s.envelope.rcpt == 1 and ("\r\n\tfor <%s>"):format(s.envelope.rcpt[1]) or ""
  -- TCP-info only for a TCP client (RFC 5321 4.4), not over a UNIX socket
  local tcp_info = s.client_port and (" ([%s])"):format(s.client_address) or ""
  return ("Received: from %s%s\r\n\tby %s with %s id %s%s%s;\r\n\t%s\r\n"):format(
    s.helo_name or "unknown", tcp_info, s.config.hostname, with,
    s.server:message_id(s), tlsnote, rcpt, os.date("!%a, %d %b %Y %H:%M:%S +0000"))
end

-- Deliver the collected message to on_data; reply per LMTP or SMTP.
-- sink: the body (core.sink).
local function finish_message(s, sink, info)
  local env = s.envelope
  s.envelope = nil
  local function drop()
    sink:close()
  end
  if info.too_big then
    drop()
    return s:send_reply(552, "5.3.4", "Message size exceeds fixed limit")
  end
  if info.rejected then
    drop()
    s:log("info", "message refused: bare CR or LF")
    return s:send_reply(554, "5.6.11", "Bare CR or LF in message data")
  end
  if info.long_line then
    drop()
    s:log("info", "message refused: line longer than %d", s.config.limits.text_line_length)
    return s:send_reply(554, "5.6.0", "Message line too long")
  end
  s.envelope = env
  local header = s.config.received_header and received_header(s) or ""
  s.envelope = nil
  local msg = setmetatable({
    header = header,
    sink = sink,
    size = #header + sink:size(),
    envelope = env,
    from = env.from,
    rcpt = env.rcpt,
  }, Message)
  s.messages = s.messages + 1
  local r = s:hook("on_data", msg)
  msg:discard()
  s:log("info", "message size=%d rcpt=%d %s", msg.size, #env.rcpt,
    (r == nil or r.code < 400) and "accepted" or ("refused " .. r.code))
  if s.config.lmtp then
    -- one reply per accepted recipient
    for _, rcpt in ipairs(env.rcpt) do
      local pr = r and r.per_recipient and r.per_recipient[rcpt]
      if pr then
        s:send_reply(pr.code, pr.enhanced, pr.text)
      elseif r and r.per_recipient then
        s:send_reply(250, "2.0.0", "Delivered to <" .. rcpt .. ">")
      else
        s:answer(r, 250, "2.0.0", "Delivered to <" .. rcpt .. ">")
      end
    end
    return
  end
  local _, disc = s:answer(r, 250, "2.0.0", "Message accepted")
  if disc then return "close" end
end

handlers.DATA = function(s, cmd)
  if need_helo(s) then return end
  local env = s.envelope
  if cmd.arg and cmd.arg ~= "" then
    return s:send_reply(501, "5.5.4", "Syntax: DATA")
  end
  if not env then
    return s:send_reply(503, "5.5.1", "Need MAIL command")
  end
  if #env.rcpt == 0 then
    return s:send_reply(554, "5.5.1", "No valid recipients")
  end
  if s.bdat then
    return s:send_reply(503, "5.5.1", "DATA after BDAT")
  end
  s:send_reply(354, nil, "End data with <CR><LF>.<CR><LF>")
  local sink = s.server:new_sink()
  -- The body goes from the socket buffer into the sink (memory, then a
  -- spool file); what follows the end of data (a pipelined command)
  -- stays buffered.
  local info, err = s.sock:receivebody(sink, {
    max_size = s.config.limits.max_message_size,
    bare = s.config.bare_newlines,
    max_line = math.max(s.config.limits.text_line_length - 2, 0),
    idle_timeout = s.config.timeouts.data_block,
    total_timeout = s.config.timeouts.data_total,
  })
  if not info then
    sink:close()
    if err == "timeout" then
      s:send_reply(421, "4.4.2", "Timeout during DATA")
    end
    return "close" -- timeout, closed or reset mid-message
  end
  if info.error == "io" then
    sink:close()
    s.envelope = nil
    s:log("error", "spool: %s", tostring(info.detail))
    return s:send_reply(451, "4.3.0", "Local error in processing")
  end
  return finish_message(s, sink, info)
end

handlers.BDAT = function(s, cmd)
  if need_helo(s) then return end
  local size, last = cmd.chunk_size, cmd.last
  if not size then
    return s:send_reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
  end
  -- A rejected BDAT still consumes its chunk.
  local function discard(code, enh, text)
    local trash <close> = core.sink { max_size = 0, threshold = 0 }
    local ok, err = s.sock:receivechunk(trash, size, s.config.timeouts.data_block)
    if not ok and err ~= "limit" then return "close" end
    s:send_reply(code, enh, text)
  end
  local env = s.envelope
  if not s.config.chunking then
    return discard(502, "5.5.1", "CHUNKING not available")
  end
  if not env then
    return discard(503, "5.5.1", "Need MAIL command")
  end
  if #env.rcpt == 0 then
    return discard(554, "5.5.1", "No valid recipients")
  end
  if not s.bdat then
    s.bdat = { sink = s.server:new_sink(s.config.limits.max_message_size), size = 0 }
  end
  local b = s.bdat
  local ok, err = s.sock:receivechunk(b.sink, size, s.config.timeouts.data_block)
  if not ok and err ~= "limit" and err ~= "io" then
    b.sink:close()
    s.bdat = nil
    return "close"
  end
  b.size = b.size + size
  if err == "io" or (err == "limit" and not last) then
    b.sink:close()
    s.bdat = nil
    s.envelope = nil
    if err == "io" then
      return s:send_reply(451, "4.3.0", "Local error in processing")
    end
    return s:send_reply(552, "5.3.4", "Message size exceeds fixed limit")
  end
  if not last then
    return s:send_reply(250, "2.0.0", ("%d octets received"):format(size))
  end
  s.bdat = nil
  return finish_message(s, b.sink, { too_big = err == "limit" })
end

---------------------------------------------------------------------------
-- The session loop

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

local HTTP_VERBS = { GET = true, POST = true, HEAD = true, PUT = true, CONNECT = true, OPTIONS = true }

function Session:run()
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
  -- Per-address limits apply to the real client: the PROXY-reported
  -- address behind a load balancer.
  local ip = self.client_address
  if not self.server:rate_ok(ip) then
    self:send_reply(421, "4.7.0", c.hostname .. " Too many connections, slow down")
    return
  end
  local n = self.server.per_ip[ip] or 0
  if n >= c.limits.max_connections_per_ip then
    self:send_reply(421, "4.7.0", c.hostname .. " Too many connections from your address")
    return
  end
  self.server.per_ip[ip] = n + 1
  self.counted_ip = ip
  local r = self:hook("on_connect")
  if r and r.code >= 400 then
    self:send_reply(r.code, r.enhanced, r.text)
    return
  end
  -- Early talkers: a client that sends before the greeting is not
  -- speaking SMTP (or is pipelining illegally).
  if c.timeouts.greeting > 0 then
    local early = sock:receiveany(1, c.timeouts.greeting)
    if early then
      self:send_reply(554, "5.5.0", "Input before the greeting")
      return
    end
  end
  if r then
    self:send_reply(r.code, r.enhanced, r.text)
  else
    self:send_reply(220, nil, c.hostname .. " " .. (c.lmtp and "LMTP" or c.greeting))
  end
  local first = true
  local parse_opts = { utf8 = false }
  while true do
    -- Non-ASCII paths only inside a transaction that asked for SMTPUTF8.
    parse_opts.utf8 = (c.smtputf8 and self.envelope and self.envelope.params.smtputf8) or false
    local line, bad = sock:receiveline(c.limits.command_line_length)
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
      if first and HTTP_VERBS[line:match("^(%u+) ") or ""] and line:find(" HTTP/%d") then
        self:send_reply(554, "5.7.0", "This is an SMTP server")
        return
      end
      first = false
      local cmd, code, enh, reason = core.parse_command(line, parse_opts)
      if not cmd and not c.strict_helo then
        -- Real clients send names like "DESKTOP_1A2B" or bare words:
        -- accept any printable single word; on_helo can be stricter.
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
        local hr = self:hook("on_unknown", line)
        if hr then
          self:send_reply(hr.code, hr.enhanced, hr.text)
          if hr.disconnect then return end
        else
          self:send_reply(500, "5.5.1", "Command unrecognized")
          self.invalid_commands = self.invalid_commands + 1
        end
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

---------------------------------------------------------------------------
-- Server object

local Server = {}
Server.__index = Server

local next_message = 0

function Server.message_id(_, s)
  next_message = next_message + 1
  return ("%x%04x.%d"):format(math.floor(core.time()), next_message % 0x10000, s.id)
end

--- Mechanisms offered to this session (empty when AUTH is not set up).
function Server:auth_mechanisms(s)
  local auth = self.config.auth
  if not auth or not self.sasl then
    return {}
  end
  return self.sasl.server_mechanisms(self:sasl_policy(s))
end

function Server:sasl_policy(s)
  local auth = self.config.auth
  local policy = {
    verifier = auth.verifier,
    allow_plaintext = self.config.allow_plaintext_auth,
    failure_delay = self.config.auth_failure_delay,
    mechanisms = auth.mechanisms,
    hostname = self.config.hostname,
  }
  if s.tls then
    return self.sasl.tls_policy(s.sock, policy)
  end
  policy.tls = false
  return policy
end

function Server:auth_command(s, cmd)
  if not self.config.auth or not self.sasl then
    return s:send_reply(502, "5.5.1", "AUTH not available")
  end
  if need_helo(s) then return end
  if s.user then
    return s:send_reply(503, "5.5.1", "Already authenticated")
  end
  if s.envelope then
    return s:send_reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
  end
  local offered = self:auth_mechanisms(s)
  local mech = cmd.mechanism or ""
  local ok_mech = false
  for _, m in ipairs(offered) do
    if m == mech then ok_mech = true end
  end
  if not ok_mech then
    if #offered == 0 and not s.tls then
      return s:send_reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
    end
    return s:send_reply(504, "5.5.4", "Unrecognized authentication type")
  end
  local io = self.sasl.socket_io(s.sock, self.config.timeouts.command)
  local res = self.sasl.server_exchange(io, mech, cmd.initial, self:sasl_policy(s))
  if res and res.ok then
    local hr = s:hook("on_auth", res.user, res)
    s:log("info", "auth %s user=%s %s", mech, tostring(res.user), (hr and hr.code >= 400) and "refused" or "ok")
    if hr and hr.code >= 400 then
      s.auth_failures = s.auth_failures + 1
      s:send_reply(hr.code, hr.enhanced, hr.text)
    else
      s.user = res.user
      s.auth = res
      s:send_reply(235, "2.7.0", "Authentication successful")
    end
  elseif res then
    s:log("info", "auth %s failed: %d", mech, res.code)
    if res.code == 535 then
      s.auth_failures = s.auth_failures + 1
    end
    s:send_reply(res.code, res.enhanced, res.text)
  else
    return "close"
  end
  if s.auth_failures >= self.config.limits.max_auth_failures then
    s:send_reply(421, "4.7.0", "Too many authentication failures")
    return "close"
  end
end

--- Connection-rate limit per client address: a window of one minute,
-- counted in two halves so old connections age out smoothly.
function Server:rate_ok(ip)
  local limit = self.config.limits.connection_rate_per_ip
  if not limit or limit <= 0 then return true end
  local now = core.now()
  local slot = math.floor(now / 30)
  local r = self.rates or { slot = slot, cur = {}, prev = {} }
  self.rates = r
  if slot ~= r.slot then
    r.prev = slot == r.slot + 1 and r.cur or {}
    r.cur, r.slot = {}, slot
  end
  local weight = 1 - (now / 30 - slot)
  local count = (r.cur[ip] or 0) + (r.prev[ip] or 0) * weight
  if count >= limit then return false end
  r.cur[ip] = (r.cur[ip] or 0) + 1
  return true
end

--- server:new_sink([max_size]) -> a body sink in spool_dir.
function Server:new_sink(max_size)
  return core.sink { dir = self.spool_dir, threshold = self.config.spool_threshold, max_size = max_size }
end

--- server:close(): stop accepting; sessions in progress go on.
function Server:close()
  for _, srv in ipairs(self.listeners) do
    srv:close()
  end
end

--- server:addresses() -> list of {address=, port=, tls=}
function Server:addresses()
  local out = {}
  for _, srv in ipairs(self.listeners) do
    for _, a in ipairs(srv.addresses) do
      out[#out + 1] = { address = a.address, port = a.port, tls = srv.implicit_tls }
    end
  end
  return out
end

function Server:connections()
  return self.active
end

--- new(opts) -> server | nil, err, detail: start listening.
-- See README "SMTP server" for every option.
function M.new(opts)
  assert(type(opts) == "table", "server options table expected")
  local config = merge(DEFAULTS, opts)
  local self = setmetatable({ config = config, listeners = {}, active = 0, per_ip = {},
    slots = { active = 0 } }, Server)
  if config.auth then
    local ok, sasl = pcall(require, "luasmtp.sasl")
    assert(ok, "AUTH needs luasmtp.sasl: " .. tostring(sasl))
    self.sasl = sasl
  end
  self.logger = config.logger or function(level, msg)
    io.stderr:write(level, ": ", msg, "\n")
  end
  self.log_level = assert(LOG_LEVELS[config.log_level], "log_level must be debug, info, warning or error")
  self.spool_dir = config.spool_dir or os.getenv("TMPDIR") or "/tmp"
  core.sink_cleanup(self.spool_dir) -- what a crashed process left there
  if config.proxy then
    local relay = require "luasmtp.relay"
    local nets = {}
    for i, cidr in ipairs(config.proxy.trusted or {}) do nets[i] = relay.network(cidr) end
    self.proxy_trusted = function(ip)
      for _, match in ipairs(nets) do
        if match(ip) then return true end
      end
      return false
    end
  end
  if config.relay then
    self.relay_check = require("luasmtp.relay").checker(config.relay)
  end
  local specs = config.listen or { "127.0.0.1:25" }
  if type(specs) == "string" or specs.address then specs = { specs } end
  for _, spec in ipairs(specs) do
    local addr, implicit = spec, false
    if type(spec) == "table" then
      addr, implicit = spec.address and spec or spec[1], spec.tls == "implicit"
    end
    assert(not implicit or config.tls, "implicit TLS needs a tls context")
    local srv, err, detail = net.serve {
      listen = addr,
      tls = implicit and config.tls or nil,
      tls_timeout = config.timeouts.tls_handshake,
      max_connections = config.limits.max_connections,
      slots = self.slots, -- one limit for all the listeners
      handler = function(sock, conn)
        self.active = self.active + 1
        local s = new_session(self, sock, conn)
        s:log("info", "connect from %s", net.format_address(conn.peer_address, conn.peer_port))
        local ok, err2 = xpcall(s.run, debug.traceback, s)
        if not ok then
          s:log("error", "session failed: %s", tostring(err2))
          sock:send(core.format_reply(421, "4.3.0", "Internal error"))
        end
        if s.counted_ip then
          local ip = s.counted_ip
          self.per_ip[ip] = self.per_ip[ip] - 1
          if self.per_ip[ip] == 0 then self.per_ip[ip] = nil end
        end
        s:hook("on_disconnect")
        s:log("info", "disconnect")
        self.active = self.active - 1
        sock:flush(1)
      end,
      on_refused = function(conn, reason, sock)
        self.logger("info", ("refused %s: %s"):format(conn.peer_address, reason))
        if sock then
          sock:send(core.format_reply(421, "4.7.0", config.hostname .. " Too many connections, try later"))
        end
      end,
    }
    if not srv then
      self:close()
      return nil, err, detail
    end
    srv.implicit_tls = implicit
    self.listeners[#self.listeners + 1] = srv
  end
  running[self] = true
  return self
end

--- stop_all(): every server of this process stops accepting.
function M.stop_all()
  for srv in pairs(running) do
    srv:close()
  end
end

--- sessions() -> number of sessions in progress in this process.
function M.sessions()
  local n = 0
  for srv in pairs(running) do
    n = n + srv.active
  end
  return n
end

return M
