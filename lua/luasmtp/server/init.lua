--- luasmtp.server: the SMTP/LMTP server engine.
--
-- The C core parses commands, encodes replies and decodes DATA. The
-- session (server/session.lua) runs the protocol from the command table
-- (server/commands.lua); every policy decision is a plugin chain per
-- phase (server/chain.lua), with the built-in policies as ordinary
-- plugins (server/plugins/). A server is a table of options checked
-- against one schema (below); each connection runs as its own task.
local core = require "luasmtp.core"
local net = require "luasmtp.net"
local options = require "luasmtp.options"
local reply = require "luasmtp.reply"
local chain = require "luasmtp.server.chain"
local plugins = require "luasmtp.server.plugins"
local session = require "luasmtp.server.session"
local relay = require "luasmtp.relay"
local workers = require "luasmtp.workers"

local M = {}

-- Servers started in this process (for `luasmtp serve` to stop them).
local running = setmetatable({}, { __mode = "k" })

---------------------------------------------------------------------------
-- Replies and plugin verdicts (luasmtp.reply, luasmtp.server.chain)

M.reply = reply.new
M.tempfail = reply.tempfail
M.reject = reply.reject
M.disconnect = reply.disconnect
M.per_recipient = reply.per_recipient
M.is_reply = reply.is
M.CONTINUE = chain.CONTINUE
M.ACCEPT = chain.ACCEPT
M.PHASES = chain.PHASES
M.plugins = plugins

---------------------------------------------------------------------------
-- Options: one schema, documented in the README (checked by a spec)

M.schema = options.schema("server", {
  { "listen", "string|table", { "127.0.0.1:25" },
    "address specs (`\"unix:/path\"` too), or `{address=, tls=\"implicit\", mode=, owner=, group=}`" },
  { "hostname", "string", "localhost", "name in the greeting, EHLO and Received" },
  { "greeting", "string", "ESMTP", "text after the hostname in the 220 greeting" },
  { "tls", "userdata", nil, "server TLS context: STARTTLS is offered before TLS" },
  { "lmtp", "boolean", false, "LHLO and one reply per recipient" },
  { "submission", "boolean", false, "MAIL needs AUTH (530 5.7.0)" },
  { "auth", "table", nil, "`{ verifier = store, mechanisms = {...} }` (see SASL)" },
  { "allow_plaintext_auth", "boolean", false, "offer AUTH without TLS" },
  { "auth_failure_delay", "number", 1.0, "seconds before a 535" },
  { "relay", "table", nil, "the relay guard: `{ domains =, networks =, authenticated = }`" },
  { "proxy", "table", nil, "`{ trusted = {CIDR...}, timeout = }`: PROXY v1/v2 headers from these peers" },
  { "pipelining", "boolean", true, "offer PIPELINING" },
  { "smtputf8", "boolean", true, "offer SMTPUTF8" },
  { "eightbitmime", "boolean", true, "offer 8BITMIME" },
  { "chunking", "boolean", true, "offer CHUNKING (BDAT)" },
  { "dsn", "boolean", false, "offer DSN: only when the script honours NOTIFY and RET (RFC 3461)" },
  { "enhanced_status_codes", "boolean", true, "offer ENHANCEDSTATUSCODES" },
  { "requiretls", "boolean", true, "offer REQUIRETLS over TLS" },
  { "received_header", "boolean", true, "add a Received header (the default chain's `received` plugin)" },
  { "spool_threshold", "integer", 1024 * 1024,
    "bodies larger than this go to a spool file in `spool_dir` while they arrive" },
  { "spool_dir", "string", nil,
    "where spool files go; default: the first store plugin's directory, else $TMPDIR or /tmp; "
      .. "leftovers of a crashed process are removed at start" },
  { "bare_newlines", "string", "reject", "`\"reject\"` or `\"normalise\"` bare CR/LF in DATA" },
  { "strict_helo", "boolean", false, "refuse EHLO names that are not valid domains" },
  { "hooks", "table", nil, "`{ on_rcpt = fn, ... }`: a one-plugin chain" },
  { "plugins", "table", nil, "the plugin chain, in order (default: built from the options)" },
  { "phase_timeouts", "table", {}, "deadline per phase, seconds: `{ rcpt = 10, ... }`" },
  { "logger", "function", nil, "`function(level, message)`; stderr by default" },
  { "log_level", "string", "info", "`\"debug\"`, `\"info\"`, `\"warning\"` or `\"error\"`" },
  { name = "limits", doc = "limits", fields = {
    { "max_connections", "integer", 1000, "connections at once (more get 421)" },
    { "max_connections_per_ip", "integer", 50, "connections at once from one address" },
    { "connection_rate_per_ip", "number", 0, "new connections per minute from one address (0: no limit)" },
    { "max_messages_per_connection", "integer", 100, "transactions per connection" },
    { "max_recipients", "integer", 100, "recipients per message" },
    { "max_message_size", "integer", 35 * 1024 * 1024, "bytes (SIZE)" },
    { "max_invalid_commands", "integer", 10, "bad commands before 421" },
    { "max_auth_failures", "integer", 3, "failed AUTH before 421" },
    { "command_line_length", "integer", 512, "bytes per command line" },
    { "text_line_length", "integer", 1000, "bytes per message line, CRLF included" },
  } },
  { name = "timeouts", doc = "timeouts", fields = {
    { "greeting", "number", 0, "pause before the greeting to catch early talkers (0: none)" },
    { "command", "number", 300, "waiting for a command" },
    { "data_block", "number", 180, "waiting for each piece of DATA or BDAT" },
    { "data_total", "number", 600, "a whole DATA body" },
    { "tls_handshake", "number", 30, "the TLS handshake" },
    { "plugin", "number", 30, "each plugin call (per plugin: `timeout`, `timeouts[phase]`)" },
    { "shutdown", "number", 30, "`server:shutdown()`: busy sessions get this long before their 421" },
  } },
})

local LOG_LEVELS = { debug = 1, info = 2, warning = 3, error = 4 }

---------------------------------------------------------------------------
-- Server object

local Server = {}
Server.__index = Server

--- server:close(): stop accepting; sessions in progress go on.
function Server:close()
  for _, srv in ipairs(self.listeners) do
    srv:close()
  end
end

--- server:shutdown([drain]): stop accepting; sessions waiting for a
-- command get 421 4.3.2 and close now, the others when their command is
-- done or, at the latest, after drain seconds (timeouts.shutdown).
function Server:shutdown(drain)
  self:close()
  if self.shutting_down then return end
  local deadline = core.update_now() + (drain or self.config.timeouts.shutdown)
  self.shutting_down = deadline
  for s in pairs(self.sessions) do
    s:shutdown(deadline)
  end
  if next(self.sessions) then
    core.spawn(function()
      while next(self.sessions) and core.update_now() < deadline do
        core.sleep(math.min(0.5, math.max(deadline - core.update_now(), 0.01)))
      end
      for s in pairs(self.sessions) do
        s:close_for_shutdown()
      end
    end)
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

--- server:new_sink([max_size]) -> a body sink (core.sink) in spool_dir.
function Server:new_sink(max_size)
  return core.sink { dir = self.spool_dir, threshold = self.config.spool_threshold, max_size = max_size }
end

--- The directory for spool files: the option, else the first store
-- plugin's, else $TMPDIR or /tmp.
local function spool_dir_of(config, list)
  if config.spool_dir then return config.spool_dir end
  for _, p in ipairs(list) do
    if p.spool_dir then return p.spool_dir end
  end
  return os.getenv("TMPDIR") or "/tmp"
end

--- new(opts) -> server | nil, err, detail: start listening.
-- See README "SMTP server" for every option.
function M.new(opts)
  local config = M.schema:apply(opts, 2)
  local self = setmetatable({
    config = config,
    listeners = {},
    active = 0,
    slots = { active = 0 }, -- one max_connections for all the listeners
    sessions = setmetatable({}, { __mode = "k" }),
  }, Server)
  self.logger = config.logger or function(level, msg)
    io.stderr:write(level .. ": " .. msg .. "\n") -- one write: workers share stderr
  end
  self.log_level = assert(LOG_LEVELS[config.log_level], "log_level must be debug, info, warning or error")
  assert(config.bare_newlines == "reject" or config.bare_newlines == "normalise",
    "bare_newlines must be \"reject\" or \"normalise\"")
  for phase in pairs(config.phase_timeouts) do
    assert(chain.is_phase[phase], "phase_timeouts: unknown phase " .. tostring(phase))
  end
  local list
  if config.plugins then
    list = {}
    if config.hooks then list[1] = plugins.hooks(config.hooks) end
    for _, p in ipairs(config.plugins) do list[#list + 1] = p end
  else
    list = plugins.defaults(config)
  end
  self.plugins = list
  -- LIMITS (RFC 9422) advertises what the limits plugin enforces
  self.advertised_limits = config.limits
  for _, p in ipairs(list) do
    if p.name == "limits" and type(p.limits) == "table" then
      self.advertised_limits = p.limits
      break
    end
  end
  self.chains = chain.build(list, config.timeouts.plugin, config.phase_timeouts)
  self.spool_dir = spool_dir_of(config, list)
  core.sink_cleanup(self.spool_dir) -- what a crashed process left there
  if config.proxy then
    local nets = {}
    for i, cidr in ipairs(config.proxy.trusted or {}) do nets[i] = relay.network(cidr) end
    self.proxy_trusted = function(ip)
      for _, match in ipairs(nets) do
        if match(ip) then return true end
      end
      return false
    end
  end
  local specs = config.listen
  if type(specs) == "string" or specs.address then specs = { specs } end
  local serve_session = function(sock, conn)
    session.serve(self, sock, conn)
  end
  -- Under `serve --workers` max_connections counts the connections of
  -- every worker: one slot per connection in the supervisor's counter
  -- service, under a key naming the listen specs of this server.
  local shared = workers.store()
  if shared then
    local names = {}
    for i, spec in ipairs(specs) do
      names[i] = type(spec) == "table" and tostring(spec.address or spec[1]) or tostring(spec)
    end
    local key = "server:" .. table.concat(names, ",")
    local max = config.limits.max_connections
    serve_session = function(sock, conn)
      local lease, err, detail = shared:acquire(key, max)
      if lease == false or (lease == nil and shared.on_error == "closed") then
        self.logger("info", ("refused %s: %s"):format(conn.peer_address,
          lease == nil and "counter service failed: " .. tostring(detail or err) or "too many connections"))
        sock:send(core.format_reply(421, "4.7.0", config.hostname .. " Too many connections, try later"))
        return
      elseif lease == nil then
        self.logger("warning", "max_connections: counter service failed: " .. tostring(detail or err))
      end
      local ok, failure = xpcall(session.serve, debug.traceback, self, sock, conn)
      if lease then shared:release(key, lease) end
      if not ok then error(failure, 0) end
    end
  end
  for _, spec in ipairs(specs) do
    local addr, implicit = spec, false
    if type(spec) == "table" then
      -- { address = "unix:/path", mode =, owner = } goes to listen whole
      addr, implicit = spec.address and spec or spec[1], spec.tls == "implicit"
    end
    assert(not implicit or config.tls, "implicit TLS needs a tls context")
    local srv, err, detail = net.serve {
      listen = addr,
      tls = implicit and config.tls or nil,
      tls_timeout = config.timeouts.tls_handshake,
      max_connections = config.limits.max_connections,
      slots = self.slots,
      handler = serve_session,
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

--- shutdown_all([drain]): every server of this process shuts down (see
-- server:shutdown).
function M.shutdown_all(drain)
  for srv in pairs(running) do
    srv:shutdown(drain)
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
