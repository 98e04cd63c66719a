--- luasmtp.client.session: one SMTP/LMTP client session: greeting,
-- EHLO, STARTTLS, AUTH, then transactions (pipelined MAIL, RCPT, DATA or
-- BDAT), RSET between them and QUIT at the end.
local core = require "luasmtp.core"
local net = require "luasmtp.net"
local sasl = require "luasmtp.sasl"
local body = require "luasmtp.client.body"
local config = require "luasmtp.client.config"
local errors = require "luasmtp.client.errors"
local plan_mod = require "luasmtp.client.plan"

local merge = config.merge
local new_error, smtp_error, io_error, reply_text = errors.new_error, errors.smtp_error, errors.io_error,
  errors.reply_text
local invalid, unsupported = plan_mod.invalid, plan_mod.unsupported
local Error, build_plan = errors.Error, plan_mod.build_plan

local M = {}

-- Octets per BDAT command, and BDAT replies left pending at most.
local BDAT_CHUNK = 256 * 1024
local BDAT_WINDOW = 8

---------------------------------------------------------------------------
-- TLS contexts, made once per (cafile, capath, verify)

local contexts = setmetatable({}, { __mode = "v" })

local function client_context(cfg, verify)
  if cfg.tls_context then
    return cfg.tls_context
  end
  local key = table.concat({ cfg.cafile or "", cfg.capath or "", tostring(verify) }, "\0")
  local ctx = contexts[key]
  if not ctx then
    ctx = core.tls_context { mode = "client", cafile = cfg.cafile, capath = cfg.capath, verify = verify }
    contexts[key] = ctx
  end
  return ctx
end

--- tls_context(opts, verify) -> a client context for opts.cafile /
-- opts.capath (or opts.tls_context itself), verifying or not, made once.
-- Without verification, a session given verify_host still checks the
-- chain and name for tlsinfo().verified.
M.tls_context = client_context

-- Does this mode verify the server? On by default wherever TLS is
-- required; opportunistic STARTTLS does not unless asked to.
local function verifying(cfg, mode)
  if cfg.insecure or cfg.verify == false then
    return false
  end
  if mode == "opportunistic" then
    return cfg.verify == true
  end
  return true
end

---------------------------------------------------------------------------
-- Sessions

local Session = {}
Session.__index = Session
Session.__close = function(self) self:close() end

M.Session = Session

function Session:trace(direction, text)
  if self.transcript then
    self.transcript(direction, text)
  end
end

--- Mark the session broken with err (the first error sticks), close the
-- socket, and return nil, token, err.
function Session:fail(err)
  if not self.broken then
    self.broken = err
    if self.sock then
      self.sock:close()
    end
  end
  return nil, self.broken.token, self.broken
end

function Session:check()
  if self.broken then
    return nil, self.broken.token, self.broken
  end
  if not self.sock then
    return self:fail(io_error("closed", "the session is closed", "(closed)", "closed"))
  end
  return true
end

-- Queue data on the socket. shown: lines for the transcript.
function Session:write(data, timeout, command, stage)
  local ok, token, detail = self.sock:send(data, timeout)
  if not ok then
    return self:fail(io_error(token, detail, command, stage))
  end
  return true
end

--- read_reply(timeout, command, stage) -> reply | nil, token, err
-- One whole reply. A malformed one, a timeout or an I/O error breaks the
-- session; so does a 421 (the server is closing), after it is returned.
function Session:read_reply(timeout, command, stage)
  local ok, t, e = self:check()
  if not ok then return nil, t, e end
  local deadline = core.update_now() + timeout
  local parser = self.parser
  parser:reset()
  while true do
    local remaining = deadline - core.update_now()
    if remaining <= 0 then
      return self:fail(io_error("timeout", nil, command, stage))
    end
    local line, bad, detail = self.sock:receiveline(self.max_line, remaining)
    if not line then
      if bad == "limit" then
        return self:fail(new_error("protocol", { command = command, stage = stage,
          message = "reply line too long (" .. command .. ")" }))
      end
      return self:fail(io_error(bad, detail, command, stage))
    end
    self:trace("S", line)
    if bad then
      return self:fail(new_error("protocol", { command = command, stage = stage,
        message = ("reply with a bare %s (%s)"):format(bad == "barelf" and "LF" or "CR", command) }))
    end
    local reply, why = parser:feed(line)
    if reply then
      if reply.code == 421 then
        local err = smtp_error(command, reply, stage)
        self:fail(err)
      end
      return reply
    elseif why then
      return self:fail(new_error("protocol", { command = command, stage = stage,
        message = ("malformed reply to %s: %s: %q"):format(command, why, line:sub(1, 200)) }))
    end
  end
end

--- command(line [, timeout [, stage [, shown]]]) -> reply | nil, token, err
-- Send one command and read its reply (any code: 4xx/5xx are values).
-- shown: what the transcript and errors show instead of line.
function Session:command(line, timeout, stage, shown)
  local ok, t, e = self:check()
  if not ok then return nil, t, e end
  assert(type(line) == "string" and not line:find("[\r\n]"), "a command is one line without CR or LF")
  shown = shown or line
  self:trace("C", shown)
  ok, t, e = self:write(line .. "\r\n", timeout or self.timeouts.command, shown, stage)
  if not ok then return nil, t, e end
  return self:read_reply(timeout or self.timeouts.command, shown, stage)
end

function Session:set_capabilities(reply)
  local parsed = core.parse_ehlo(reply.lines)
  local ext = parsed.ext
  -- the pre-standard "AUTH=PLAIN LOGIN" line some servers still send
  for _, line in ipairs(parsed.invalid) do
    local mechs = line:match("^[Aa][Uu][Tt][Hh]=(.*)$")
    if mechs then
      ext.AUTH = ext.AUTH or {}
      for m in mechs:gmatch("%S+") do ext.AUTH[#ext.AUTH + 1] = m end
    end
  end
  if ext.AUTH then
    for i, m in ipairs(ext.AUTH) do ext.AUTH[i] = m:upper() end
  end
  self.extensions = ext
  self.keywords = parsed.keywords
  self.server_name = parsed.domain
  local size = ext.SIZE and math.tointeger(tonumber(ext.SIZE[1] or ""))
  self.max_size = size and size > 0 and size or nil
  self.limits = {}
  for _, p in ipairs(ext.LIMITS or {}) do
    local k, v = p:match("^([%w%-]+)=(%d+)$")
    if k then self.limits[k:upper()] = math.tointeger(tonumber(v)) end
  end
end

--- has(keyword) -> the extension's parameters (a list) | nil
function Session:has(keyword)
  return self.extensions[keyword:upper()]
end

-- EHLO (LHLO for LMTP), HELO when EHLO gets a 5xx.
function Session:hello()
  local verb = self.lmtp and "LHLO" or "EHLO"
  local line = verb .. " " .. self.helo_name
  local reply, t, e = self:command(line, self.timeouts.command, "ehlo")
  if not reply then return nil, t, e end
  self.extensions, self.keywords, self.limits, self.max_size = {}, {}, {}, nil
  if reply.code == 250 then
    self.esmtp = true
    self.ehlo = reply
    self:set_capabilities(reply)
    return true
  end
  if reply.code >= 500 and not self.lmtp then
    local helo = "HELO " .. self.helo_name
    local r2
    r2, t, e = self:command(helo, self.timeouts.command, "helo")
    if not r2 then return nil, t, e end
    if r2.code == 250 then
      self.esmtp = false
      self.ehlo = r2
      self.server_name = r2.text:match("^(%S+)")
      return true
    end
    return nil, "smtp", smtp_error(helo, r2, "helo")
  end
  return nil, "smtp", smtp_error(line, reply, "ehlo")
end

-- STARTTLS, the handshake, and EHLO again (RFC 3207 4.2: forget what
-- the server said before). Any byte the server sent after its 220 and
-- before the handshake makes sock:starttls fail (response injection).
function Session:starttls(mode)
  local reply, t, e = self:command("STARTTLS", self.timeouts.command, "starttls")
  if not reply then return nil, t, e end
  if reply.code ~= 220 then
    if mode == "opportunistic" and reply.code ~= 421 then
      self.starttls_refused = reply
      return true
    end
    return nil, "smtp", smtp_error("STARTTLS", reply, "starttls")
  end
  local verify = verifying(self.config, mode)
  local topts = { servername = self.servername, verify_host = verify, timeout = self.timeouts.tls }
  for k, v in pairs(self.config.starttls_options or {}) do topts[k] = v end
  local ok, token, detail = self.sock:starttls(client_context(self.config, verify), topts)
  if not ok then
    local sock = self.sock
    self.sock = nil
    sock:close() -- a failed handshake has closed it already; be sure
    local err = io_error(token, detail, "STARTTLS", "starttls")
    err.message = "STARTTLS: " .. (type(detail) == "string" and detail or token)
    self.broken = err
    return nil, err.token, err
  end
  self:trace("-", "TLS " .. (self.sock:tlsinfo().version or "") .. " established")
  self.tls = true
  return self:hello()
end

-- The io object for sasl.client_exchange: traced with the credentials
-- masked, bounded by the command timeout, strict line endings.
function Session:sasl_io()
  local session = self
  local cap = (sasl.MAX_MESSAGE + 2) // 3 * 4 + 16
  return {
    send_line = function(_, line)
      local shown = line:match("^(AUTH %S+) ") and (line:match("^(AUTH %S+) ") .. " <credentials hidden>")
        or line:match("^AUTH %S+$") or "<credentials hidden>"
      session:trace("C", shown)
      return session:write(line .. "\r\n", session.timeouts.command, "AUTH", "auth")
    end,
    receive_line = function()
      local ok, t, e = session:check()
      if not ok then return nil, t, e end
      local line, bad, detail = session.sock:receiveline(cap, session.timeouts.command)
      if not line then
        return session:fail(io_error(bad, detail, "AUTH", "auth"))
      end
      session:trace("S", line)
      if bad then
        return session:fail(new_error("protocol", { command = "AUTH", stage = "auth",
          message = "AUTH reply with a bare CR or LF" }))
      end
      return line
    end,
  }
end

-- Mechanisms that check the same secret the same way: after a 535 to
-- one, the other would fail too.
local SAME_CHECK = { PLAIN = "LOGIN", LOGIN = "PLAIN" }

--- login(auth) -> true | nil, token, err
-- auth: { user=, password=, token= (OAuth), authzid=, mechanism= or
-- mechanisms= {...} (restrict the choice), allow_plaintext= (PLAIN and
-- LOGIN without TLS) }. The strongest mechanism both sides know is used
-- (luasmtp.sasl). Over TLS, a 535 to one mechanism makes the client try
-- the next one both sides know and the caller allows (a store may hold a
-- hash that cannot serve SCRAM for this user); without TLS the first 535
-- is the answer. err.tried lists the mechanisms refused.
function Session:login(auth)
  local ok, t, e = self:check()
  if not ok then return nil, t, e end
  assert(type(auth) == "table", "auth must be a table")
  local offered = self.extensions.AUTH
  if not offered then
    return nil, "auth", new_error("auth", { permanent = true, stage = "auth", command = "AUTH",
      message = "the server does not offer AUTH" .. (self.tls and "" or " (before TLS)") })
  end
  local creds = { user = auth.user, password = auth.password, token = auth.token, authzid = auth.authzid,
    external = auth.external }
  local mechs = auth.mechanisms or (auth.mechanism and { auth.mechanism }) or nil
  local sopts = {
    tls = self.sock:istls(),
    allow_plaintext = auth.allow_plaintext,
    mechanisms = mechs,
    channel_binding = sasl.tls_binding(self.sock),
    host = self.host,
    port = self.port,
    exclude = {},
  }
  local refused -- the errors of the mechanisms refused so far
  while true do
    local mech, why, detail = sasl.choose(offered, creds, sopts)
    if not mech then
      if refused then return nil, "auth", refused[#refused] end
      return nil, "auth", new_error("auth", { permanent = true, stage = "auth", command = "AUTH",
        cause = why, message = "AUTH: " .. tostring(detail or why) })
    end
    local res, token, err = sasl.client_exchange(self:sasl_io(), mech)
    if not res then
      if self.broken then return nil, self.broken.token, self.broken end
      return self:fail(new_error(token == "protocol" and "protocol" or token, { stage = "auth", command = "AUTH",
        cause = err, message = "AUTH " .. mech.name .. ": " .. tostring(err) }))
    end
    if res.code == 421 then
      return self:fail(smtp_error("AUTH " .. mech.name, { code = 421, enhanced = res.enhanced, text = res.text,
        lines = { res.text } }, "auth"))
    end
    if res.ok then
      self.authenticated = auth.user or true
      self.auth_mechanism = mech.name
      return true
    end
    local e2 = new_error("auth", {
      permanent = res.code >= 500 and not res.client_error,
      code = res.code, enhanced = res.enhanced, text = res.text, lines = { res.text },
      command = "AUTH " .. mech.name, stage = "auth", cause = res.client_error,
      message = ("AUTH %s: %s%s"):format(mech.name, reply_text(res),
        res.client_error and (" (" .. res.client_error .. ")") or ""),
    })
    refused = refused or {}
    refused[#refused + 1] = e2
    e2.tried = {}
    for i, r in ipairs(refused) do e2.tried[i] = r.command:match("^AUTH (%S+)") end
    if #refused > 1 then
      local parts = {}
      for i, r in ipairs(refused) do parts[i] = r.message end
      e2.message = table.concat(parts, "; ")
    end
    -- Only wrong credentials, only over TLS, and only when the server
    -- itself refused (not when this side gave up on a server that did
    -- not prove itself): then the next mechanism may still work.
    if res.code ~= 535 or res.cancelled or not self.sock:istls() then
      return nil, "auth", e2
    end
    self:trace("-", "AUTH " .. mech.name .. " refused; trying the next mechanism")
    sopts.exclude[#sopts.exclude + 1] = mech.name
    sopts.exclude[#sopts.exclude + 1] = SAME_CHECK[mech.name]
  end
end

-- Greeting, EHLO, STARTTLS, AUTH.
function Session:open()
  local cfg = self.config
  -- a client reads the reply to what it has just queued: no read first
  self.sock:setoption("waitreply", true)
  local greeting, t, e = self:read_reply(self.timeouts.greeting, "the greeting", "greeting")
  if not greeting then return nil, t, e end
  self.greeting = greeting
  if greeting.code ~= 220 then
    return nil, "smtp", smtp_error("greeting", greeting, "greeting")
  end
  local ok
  ok, t, e = self:hello()
  if not ok then return nil, t, e end
  local mode = self.tls_mode
  if (mode == "starttls" or mode == "opportunistic") and not self.sock:istls() then
    if self.extensions.STARTTLS then
      ok, t, e = self:starttls(mode)
      if not ok then return nil, t, e end
    elseif mode == "starttls" then
      return unsupported("STARTTLS", ("%s does not offer STARTTLS%s; refusing to go on without TLS"):format(
        self.host or "the server", self.esmtp and "" or " (it refused EHLO)"))
    end
  end
  if cfg.auth then
    ok, t, e = self:login(cfg.auth)
    if not ok then return nil, t, e end
  end
  return true
end

local function local_literal(sock)
  local addr = sock:getsockname()
  if not addr then return "[127.0.0.1]" end
  if addr:find("^unix:") then return "localhost" end
  if addr:find(":", 1, true) then
    return "[IPv6:" .. addr .. "]"
  end
  return "[" .. addr .. "]"
end

--- connect(opts) -> session | nil, token, err
-- opts: host and port (or server = "host[:port]", or sock = a connected
-- socket), tls ("implicit", "starttls", "opportunistic", "none", "auto"),
-- tls_context or cafile / capath, insecure (no verification), verify,
-- servername, starttls_options (more fields for sock:starttls, such as
-- dane), helo, auth (see login), lmtp, pipelining, chunking,
-- timeouts = {connect, greeting, command, tls, data, data_block,
-- data_end, quit}, transcript = function(direction, line), family, bind.
function M.connect(opts)
  assert(type(opts) == "table", "client.connect needs an options table")
  local cfg = merge(opts)
  if cfg.tls == "auto" then
    return M.connect_tls(opts)
  end
  local self = setmetatable({
    config = cfg,
    host = cfg.host,
    port = cfg.port,
    lmtp = cfg.lmtp and true or false,
    tls_mode = cfg.tls,
    timeouts = cfg.timeouts,
    transcript = cfg.transcript,
    max_line = cfg.max_line,
    parser = core.reply_parser { max_lines = cfg.max_reply_lines, max_line = cfg.max_line },
    extensions = {},
    keywords = {},
    limits = {},
    esmtp = false,
    tls = false,
    messages = 0,
    transactions = 0,
  }, Session)
  local host = cfg.host
  local bare = host and (host:match("^%[(.*)%]$") or host)
  self.servername = cfg.servername or bare
  assert(self.servername or cfg.tls == "none" or not verifying(cfg, cfg.tls),
    "servername is needed to verify the server's certificate (no host name)")
  if cfg.sock then
    self.sock = cfg.sock
    if cfg.tls == "implicit" and not self.sock:istls() then
      local verify = verifying(cfg, "implicit")
      local ok, token, detail = self.sock:starttls(client_context(cfg, verify), {
        servername = self.servername, verify_host = verify, timeout = cfg.timeouts.connect })
      if not ok then
        return nil, token, io_error(token, detail, "TLS handshake", "connect")
      end
    end
  else
    local tls_ctx, verify
    if cfg.tls == "implicit" then
      verify = verifying(cfg, "implicit")
      tls_ctx = client_context(cfg, verify)
    end
    local where = cfg.path or ("%s port %d"):format(host, cfg.port)
    self:trace("-", ("connecting to %s%s"):format(where, tls_ctx and " (TLS)" or ""))
    local sock, token, detail
    if cfg.path then
      sock, token, detail = net.connect_unix(cfg.path, { timeout = cfg.timeouts.connect, tls = tls_ctx,
        servername = self.servername, verify_host = verify })
    else
      sock, token, detail = net.connect(host, cfg.port, {
        timeout = cfg.timeouts.connect,
        tls = tls_ctx,
        servername = self.servername,
        verify_host = verify,
        family = cfg.family,
        bind = cfg.bind,
      })
    end
    if not sock then
      local err = io_error(token, detail, "connect", "connect")
      err.message = ("connect to %s: %s"):format(where, type(detail) == "string" and detail or token)
      return nil, token, err
    end
    self.sock = sock
  end
  self.tls = self.sock:istls()
  self.helo_name = cfg.helo or local_literal(self.sock)
  local ok, token, err = self:open()
  if not ok then
    self:close()
    return nil, token, err
  end
  return self
end

-- The TLS mode a well-known port implies (RFC 8314): implicit TLS on
-- 465, STARTTLS on the submission port and on 25.
local PORT_TLS_MODE = { [465] = "implicit", [587] = "starttls", [25] = "starttls" }

--- connect_tls(opts) -> session | nil, token, err
-- Implicit TLS (opts.implicit_port, else opts.port, else 465) and
-- required STARTTLS (opts.starttls_port, else opts.port, else 587), the
-- second when the first cannot connect, gets no greeting or fails its
-- TLS handshake. Implicit TLS goes first, except when opts.port is 587 or
-- 25: a STARTTLS port, where a TLS ClientHello before the greeting is
-- improper pipelining (a postscreen with greet_action=enforce blocks the
-- client for it). Never plaintext; a certificate that does not verify is
-- not retried.
function M.connect_tls(opts)
  local modes = { "implicit", "starttls" }
  if PORT_TLS_MODE[opts.port] == "starttls" then
    modes = { "starttls", "implicit" }
  end
  local function attempt(mode)
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.tls = mode
    if mode == "implicit" then
      o.port = opts.implicit_port or opts.port or 465
    else
      o.port = opts.starttls_port or opts.port or 587
    end
    return M.connect(o)
  end
  local conn, token, err = attempt(modes[1])
  if conn then
    return conn
  end
  local why = err and err.cause or ""
  local retry = err and (err.stage == "connect" or err.stage == "greeting")
    and (token == "refused" or token == "timeout" or token == "closed" or token == "reset" or token == "tls")
    and not why:find("verif") and not why:find("certificate") and not why:find("mismatch")
  if not retry then
    return nil, token, err
  end
  local conn2, token2, err2 = attempt(modes[2])
  if not conn2 then
    err2.first_error = err -- what the first mode ran into
    return nil, token2, err2
  end
  return conn2
end

---------------------------------------------------------------------------
-- Simple commands

--- noop() -> reply | nil, token, err
function Session:noop()
  return self:command("NOOP", self.timeouts.command, "noop")
end

--- rset() -> reply | nil, token, err
function Session:rset()
  return self:command("RSET", self.timeouts.command, "rset")
end

--- close(): QUIT (when the session is sound) and close the socket.
-- Idempotent; returns true.
function Session:close()
  if self.sock and not self.broken then
    self:trace("C", "QUIT")
    local sock = self.sock
    if sock:send("QUIT\r\n", self.timeouts.quit) then
      local deadline = core.update_now() + self.timeouts.quit
      self.parser:reset()
      while true do
        local remaining = deadline - core.update_now()
        if remaining <= 0 then break end
        local line = sock:receiveline(self.max_line, remaining)
        if not line then break end
        self:trace("S", line)
        if not line:find("^%d%d%d%-") then break end
      end
    end
  end
  if self.sock then
    self.sock:close()
    self.sock = nil
  end
  if not self.broken then
    self.broken = io_error("closed", "the session is closed", "QUIT", "closed")
    self.broken.message = "the session is closed"
  end
  return true
end

--- tlsinfo() -> the socket's TLS details | nil
function Session:tlsinfo()
  return self.sock and self.sock:tlsinfo()
end

---------------------------------------------------------------------------
-- Sending

-- What MAIL FROM carries for this plan on this session, and whether the
-- body goes with BDAT. -> mail params, use_bdat | nil, token, err
function Session:check_plan(plan)
  local ext = self.extensions
  local params = {}
  local src = plan.source
  if self.max_size and src.size and src.size > self.max_size then
    return nil, "size", new_error("size", { permanent = true, stage = "prepare",
      size = src.size, max_size = self.max_size,
      message = ("message of %d octets is larger than the server's limit of %d"):format(src.size, self.max_size) })
  end
  if ext.SIZE and src.size then
    params[#params + 1] = "SIZE=" .. math.tointeger(src.size)
  end
  local use_bdat = false
  local chunking = plan.chunking
  if chunking == nil then chunking = self.config.chunking end
  local kind = src.body_type
  if kind == "binarymime" then
    if ext.BINARYMIME and ext.CHUNKING and chunking ~= false then
      params[#params + 1] = "BODY=BINARYMIME"
      use_bdat = true
    elseif not plan.force then
      return unsupported("BINARYMIME", "the message is binary (NUL bytes) and the server does not offer "
        .. "BINARYMIME with CHUNKING")
    else
      kind = "8bitmime"
    end
  end
  if kind == "8bitmime" then
    if ext["8BITMIME"] then
      params[#params + 1] = "BODY=8BITMIME"
    elseif not plan.force then
      return unsupported("8BITMIME", "the message has 8-bit content and the server does not offer 8BITMIME")
    end
  end
  if chunking == true and ext.CHUNKING then
    use_bdat = true
  end
  if plan.smtputf8 then
    if ext.SMTPUTF8 then
      params[#params + 1] = "SMTPUTF8"
    elseif not plan.force then
      return unsupported("SMTPUTF8", "the message needs SMTPUTF8 (non-ASCII addresses) and the server "
        .. "does not offer it")
    end
  end
  if plan.requiretls then
    if not (ext.REQUIRETLS and self.sock and self.sock:istls()) then
      return unsupported("REQUIRETLS", "REQUIRETLS was asked for and the server does not offer it"
        .. (self.tls and "" or " (no TLS)"))
    end
    params[#params + 1] = "REQUIRETLS"
  end
  if ext.DSN then
    if plan.ret then params[#params + 1] = "RET=" .. plan.ret end
    if plan.envid then params[#params + 1] = "ENVID=" .. plan.envid end
  end
  -- extra parameters: one that repeats what is there already goes once
  -- (a server may refuse the repeat), one that contradicts it not at all
  local have = {}
  for _, p in ipairs(params) do have[p:match("^[^=]+")] = p end
  for _, p in ipairs(plan.mail_params) do
    local key = p:match("^[^=]+")
    if have[key] == nil then
      params[#params + 1] = p
      have[key] = p
    elseif have[key] ~= p then
      return invalid(("mail_params: %s contradicts %s"):format(p, have[key]))
    end
  end
  return params, use_bdat
end

local function rcpt_line(self, rcpt)
  local parts = { "RCPT TO:<" .. rcpt.address .. ">" }
  if self.extensions.DSN then
    if rcpt.notify then parts[#parts + 1] = "NOTIFY=" .. rcpt.notify end
    if rcpt.orcpt then parts[#parts + 1] = "ORCPT=" .. rcpt.orcpt end
  end
  for _, p in ipairs(rcpt.params) do parts[#parts + 1] = p end
  return table.concat(parts, " ")
end

-- 452 "too many recipients" (and 552 5.5.3, RFC 5321 4.5.3.1.10): try
-- the recipient again in another transaction.
local function too_many(reply)
  if reply.code == 452 or reply.code == 552 then
    return reply.enhanced == "4.5.3" or reply.enhanced == "5.5.3"
      or (reply.text or ""):lower():find("too many recipients") ~= nil
  end
  return false
end

-- Send the body with DATA's dot-stuffing. -> true | nil, token, err
function Session:send_data_body(read, t)
  local enc = self.encoder
  if not enc then
    enc = body.dot_stuffer()
    self.encoder = enc
  end
  enc:reset()
  local size = 0
  while true do
    local piece, why = read()
    if piece == nil and why then
      -- The body could not be read: never send the final dot, so the
      -- server drops the partial message.
      return self:fail(new_error("io", { stage = "body", command = "DATA", cause = why,
        message = "reading the message body failed: " .. why }))
    end
    if piece == nil then break end
    size = size + #piece
    local out = enc:feed(piece)
    if #out > 0 then
      local ok, tk, e = self:write(out, t.data_block, "DATA", "body")
      if not ok then return nil, tk, e end
    end
  end
  if self.transcript then
    self:trace("C", ("<message body: %d octets>"):format(size))
    self:trace("C", ".")
  end
  return self:write(enc:finish(), t.data_block, "DATA", "body")
end

-- Read the replies after the end of the data: one, or one per accepted
-- recipient in LMTP. Records them in the entries.
function Session:read_final(accepted, command, count)
  local replies = {}
  for i = 1, count do
    local reply, tk, e = self:read_reply(self.timeouts.data_end, command, "end")
    if not reply then return nil, tk, e end
    replies[i] = reply
  end
  if self.lmtp and count == #accepted then
    for i, entry in ipairs(accepted) do
      entry.reply = replies[i]
      entry.ok = replies[i].code >= 200 and replies[i].code < 300
    end
  else
    for _, entry in ipairs(accepted) do
      entry.reply = replies[count]
      entry.ok = replies[count].code >= 200 and replies[count].code < 300
    end
  end
  return replies
end

-- Send the body in BDAT chunks; -> final replies | nil, token, err, and
-- the failing reply of an earlier chunk if there is one.
function Session:send_bdat_body(read, binary, accepted)
  local t = self.timeouts
  local normalise = not binary and body.crlf_normaliser() or nil
  local pending, failed, total = 0, nil, 0
  local pipelining = self.config.pipelining and self.extensions.PIPELINING
  local function collect(n)
    for _ = 1, n do
      local reply, tk, e = self:read_reply(t.data_end, "BDAT", "body")
      if not reply then return nil, tk, e end
      pending = pending - 1
      if reply.code ~= 250 and not failed then failed = reply end
    end
    return true
  end
  local buf, buffered = {}, 0
  local function ship(last)
    local data = table.concat(buf)
    buf, buffered = {}, 0
    total = total + #data
    local cmd = ("BDAT %d%s"):format(#data, last and " LAST" or "")
    self:trace("C", cmd .. (#data > 0 and (" <%d octets>"):format(#data) or ""))
    local ok, tk, e = self:write(cmd .. "\r\n" .. data, t.data_block, cmd, "body")
    if not ok then return nil, tk, e end
    if last then return true end
    pending = pending + 1
    if not pipelining then
      return collect(pending)
    elseif pending >= BDAT_WINDOW then
      return collect(1)
    end
    return true
  end
  while not failed do
    local piece, why = read()
    if piece == nil and why then
      return self:fail(new_error("io", { stage = "body", command = "BDAT", cause = why,
        message = "reading the message body failed: " .. why }))
    end
    if piece == nil then break end
    if normalise then piece = normalise(piece) end
    buf[#buf + 1] = piece
    buffered = buffered + #piece
    if buffered >= BDAT_CHUNK then
      local ok, tk, e = ship(false)
      if not ok then return nil, tk, e end
    end
  end
  if failed then
    -- RFC 3030: no more chunks after a refused one; end the transaction.
    local ok, tk, e = collect(pending)
    if not ok then return nil, tk, e end
    local reply
    reply, tk, e = self:rset()
    if not reply then return nil, tk, e end
    return nil, "smtp", failed
  end
  if normalise then
    local tail = normalise(nil)
    if #tail > 0 then buf[#buf + 1] = tail end
  end
  local ok, tk, e = ship(true)
  if not ok then return nil, tk, e end
  ok, tk, e = collect(pending)
  if not ok then return nil, tk, e end
  local count = (self.lmtp and not failed) and #accepted or 1
  local replies
  replies, tk, e = self:read_final(accepted, "BDAT LAST", count)
  if not replies then return nil, tk, e end
  if failed then return nil, "smtp", failed end
  return replies
end

-- One transaction for a batch of recipient entries.
-- -> { deferred = {entries}, error = Error | nil } | nil, token, err
-- (nil for a failure that leaves the session broken). Every entry gets
-- rcpt_reply, reply and ok as far as the transaction got.
function Session:transaction(plan, params, use_bdat, batch, more)
  local t = self.timeouts
  local pipelining = self.config.pipelining and self.extensions.PIPELINING
  local group = {}
  if self.transactions > 0 then
    group[#group + 1] = { line = "RSET", kind = "rset", timeout = t.command }
  end
  local mail = "MAIL FROM:<" .. plan.from .. ">" .. (#params > 0 and (" " .. table.concat(params, " ")) or "")
  group[#group + 1] = { line = mail, kind = "mail", timeout = t.command }
  for _, entry in ipairs(batch) do
    group[#group + 1] = { line = rcpt_line(self, entry.rcpt), kind = "rcpt", entry = entry, timeout = t.command }
  end
  if pipelining and not use_bdat then
    group[#group + 1] = { line = "DATA", kind = "data", timeout = t.data }
  end
  self.transactions = self.transactions + 1

  if pipelining then
    local out = {}
    for i, g in ipairs(group) do
      self:trace("C", g.line)
      out[i] = g.line .. "\r\n"
    end
    local ok, tk, e = self:write(table.concat(out), t.command, group[1].line, group[1].kind)
    if not ok then return nil, tk, e end
  end
  local function reply_for(g)
    if pipelining then
      return self:read_reply(g.timeout, g.line, g.kind)
    end
    return self:command(g.line, g.timeout, g.kind)
  end

  local tx = { deferred = {} }
  local failure -- the Error that ends the transaction
  local accepted = {}
  local data_reply
  for _, g in ipairs(group) do
    if failure and not pipelining then
      break
    end
    local reply, tk, e = reply_for(g)
    if not reply then return nil, tk, e end
    if g.kind == "rset" or g.kind == "mail" then
      if reply.code ~= 250 and not failure then
        failure = smtp_error(g.line, reply, g.kind)
      end
    elseif g.kind == "rcpt" then
      local entry = g.entry
      entry.rcpt_reply = reply
      if failure then
        entry.reply, entry.ok = reply, false
      elseif reply.code >= 200 and reply.code < 300 then
        accepted[#accepted + 1] = entry
      else
        entry.reply, entry.ok = reply, false
        if too_many(reply) then
          tx.deferred[#tx.deferred + 1] = entry
        end
      end
    elseif g.kind == "data" then
      data_reply = reply
    end
  end

  if failure or #accepted == 0 then
    if data_reply and data_reply.code == 354 then
      -- RFC 2920: the server took DATA although nothing can be sent;
      -- end it with an empty message and ignore the reply.
      self:trace("C", ".")
      local ok, tk, e = self:write(".\r\n", t.data_block, "DATA", "data")
      if not ok then return nil, tk, e end
      local r
      r, tk, e = self:read_reply(t.data_end, "DATA", "end")
      if not r then return nil, tk, e end
    end
    if failure then
      -- MAIL (or RSET) refused: nobody in the batch gets the message
      for _, entry in ipairs(batch) do
        entry.ok = false
        entry.error = failure
        if entry.reply and entry.reply.code < 300 then entry.reply = nil end
      end
    end
    -- recipients refused as "too many" with nothing accepted: refused
    tx.deferred = {}
    tx.error = failure
    return tx
  end

  local read, why = plan.source:reader(more or #tx.deferred > 0)
  if not read then
    return self:fail(new_error("invalid", { stage = "body", message = why }))
  end
  if use_bdat then
    local replies, tk, e = self:send_bdat_body(read, plan.source.body_type == "binarymime" and not plan.force,
      accepted)
    if not replies then
      if tk == "smtp" and getmetatable(e) ~= Error then
        -- a refused chunk: e is its reply
        local err = smtp_error("BDAT", e, "body")
        for _, entry in ipairs(accepted) do entry.reply, entry.ok = e, false end
        tx.error = err
        return tx
      end
      return nil, tk, e
    end
    tx.final = replies
  else
    if not data_reply then
      local tk, e
      data_reply, tk, e = self:command("DATA", t.data, "data")
      if not data_reply then return nil, tk, e end
    end
    if data_reply.code ~= 354 then
      for _, entry in ipairs(accepted) do entry.reply, entry.ok = data_reply, false end
      tx.error = smtp_error("DATA", data_reply, "data")
      return tx
    end
    local ok, tk, e = self:send_data_body(read, t)
    if not ok then return nil, tk, e end
    local replies
    replies, tk, e = self:read_final(accepted, "end of data", self.lmtp and #accepted or 1)
    if not replies then return nil, tk, e end
    tx.final = replies
  end
  local last = tx.final[#tx.final]
  if not self.lmtp and last.code ~= 250 then
    tx.error = smtp_error("end of data", last, "end")
  end
  return tx
end

local Result = {}
Result.__index = Result

--- result:recipient(address) -> entry | nil
function Result:recipient(address)
  for _, entry in ipairs(self.recipients) do
    if entry.address == address then return entry end
  end
  return nil
end

local function finish_result(result)
  result.accepted, result.rejected = {}, {}
  for _, entry in ipairs(result.recipients) do
    entry.rcpt = nil
    if entry.ok then
      result.accepted[#result.accepted + 1] = entry.address
    else
      entry.ok = false
      local r = entry.reply
      entry.permanent = (r and r.code >= 500) or (not r and entry.error and entry.error.permanent) or false
      result.rejected[#result.rejected + 1] = entry.address
    end
  end
  result.ok = #result.rejected == 0
  return result
end

--- send(msg) -> result | nil, token, err
-- msg: from ("" for the null sender), to (an address, or a list of
-- addresses or {address=, notify=, orcpt=, params=}), body (string, file,
-- or function returning chunks; message = an alias), size (a hint for
-- function bodies), body_type ("7bit", "8bitmime", "binarymime";
-- detected for strings and seekable files), smtputf8, requiretls,
-- dsn = {ret=, envid=, notify=, orcpt=true}, mail_params = {KEY=value},
-- force (send although the server lacks 8BITMIME/SMTPUTF8/BINARYMIME),
-- chunking (overrides the session's option for this message).
--
-- result: { ok (every recipient accepted), accepted = {addresses},
-- rejected = {addresses}, recipients = { {address=, ok=, reply=,
-- rcpt_reply=, permanent=, error=}, ... } in the order given,
-- replies = final replies, transactions = n, dsn (the server advertises
-- DSN: NOTIFY, ORCPT, RET and ENVID went with the message),
-- recipient(addr) }.
-- When no recipient was accepted: nil, token, err with err.result.
function Session:send(msg)
  local ok, t, e = self:check()
  if not ok then return nil, t, e end
  local plan
  plan, t, e = build_plan(msg)
  if not plan then return nil, t, e end
  return self:send_plan(plan)
end

function Session:send_plan(plan)
  local ok, t, e = self:check()
  if not ok then return nil, t, e end
  local params, use_bdat, err0 = self:check_plan(plan)
  if not params then return nil, use_bdat, err0 end

  -- dsn: whether the server took the DSN parameters (it advertises DSN)
  local result = setmetatable({ recipients = {}, replies = {}, transactions = 0,
    dsn = self.extensions.DSN ~= nil }, Result)
  for i, rcpt in ipairs(plan.recipients) do
    result.recipients[i] = { address = rcpt.address, rcpt = rcpt, ok = false }
  end
  -- batches of at most RCPTMAX (LIMITS, RFC 9422)
  local max = self.limits.RCPTMAX
  local queue = {}
  local batch = {}
  for _, entry in ipairs(result.recipients) do
    batch[#batch + 1] = entry
    if max and #batch >= max then
      queue[#queue + 1] = batch
      batch = {}
    end
  end
  if #batch > 0 then queue[#queue + 1] = batch end

  local last_error
  self.messages = self.messages + 1
  while #queue > 0 do
    local current = table.remove(queue, 1)
    local tx, _, err = self:transaction(plan, params, use_bdat, current, #queue > 0)
    result.transactions = result.transactions + 1
    if not tx then
      -- broken session: everything not yet accepted fails with err
      for _, q in ipairs({ current, table.unpack(queue) }) do
        for _, entry in ipairs(q) do
          if not entry.ok then
            entry.error = entry.error or err
            if entry.rcpt_reply and entry.rcpt_reply.code < 300 then entry.reply = nil end
          end
        end
      end
      last_error = err
      result.error = err
      break
    end
    for _, r in ipairs(tx.final or {}) do result.replies[#result.replies + 1] = r end
    result.reply = tx.final and tx.final[#tx.final] or result.reply
    if tx.error then
      last_error = tx.error
      for _, entry in ipairs(current) do
        if not entry.ok and not entry.reply then entry.error = tx.error end
      end
    end
    if #tx.deferred > 0 then
      for _, entry in ipairs(tx.deferred) do entry.reply, entry.rcpt_reply = nil, nil end
      table.insert(queue, 1, tx.deferred)
    end
    if tx.error and tx.error.stage ~= "end" and tx.error.stage ~= "data" and tx.error.stage ~= "body" then
      -- MAIL or RSET refused: the other batches would fare no better
      for _, q in ipairs(queue) do
        for _, entry in ipairs(q) do entry.error = tx.error end
      end
      break
    end
  end
  finish_result(result)
  if #result.accepted > 0 then
    return result
  end
  local err = last_error
  if not err then
    -- every recipient was refused at RCPT
    local first = result.recipients[1].reply
    local permanent = true
    for _, entry in ipairs(result.recipients) do
      if not entry.permanent then permanent = false end
    end
    err = smtp_error("RCPT TO", first, "rcpt")
    err.permanent = permanent
    err.message = "every recipient was refused; " .. (#result.recipients == 1 and ("RCPT TO:<"
      .. result.recipients[1].address .. ">: " .. reply_text(first)) or ("first: <" .. result.recipients[1].address
      .. ">: " .. reply_text(first)))
  end
  err.result = result
  return nil, err.token, err
end


return M
