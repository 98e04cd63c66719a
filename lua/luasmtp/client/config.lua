--- luasmtp.client.config: the client's options (one schema, luasmtp.options)
-- and the defaults that follow from them (port, TLS mode).
local net = require "luasmtp.net"
local options = require "luasmtp.options"

local M = {}

---------------------------------------------------------------------------
-- Options: one schema (luasmtp.options), documented in the README

-- Per-phase timeouts in seconds; the reply timeouts follow RFC 5321
-- section 4.5.3.2.
local TIMEOUTS = {
  { "connect", "number", 30, "TCP connect (DNS included) and implicit TLS" },
  { "greeting", "number", 300, "the 220 greeting (4.5.3.2.1)" },
  { "command", "number", 300, "EHLO, MAIL, RCPT, RSET, NOOP, AUTH steps (4.5.3.2.2, .3)" },
  { "tls", "number", 60, "the STARTTLS handshake" },
  { "data", "number", 120, "the 354 reply to DATA (4.5.3.2.4)" },
  { "data_block", "number", 180, "each block of the body to leave (4.5.3.2.5)" },
  { "data_end", "number", 600, "the reply after the end of the data (4.5.3.2.6)" },
  { "quit", "number", 10, "the reply to QUIT" },
}
M.DEFAULT_TIMEOUTS = {}
for _, t in ipairs(TIMEOUTS) do M.DEFAULT_TIMEOUTS[t[1]] = t[3] end

M.schema = options.schema("client", {
  { "server", "string", nil, "`\"host[:port]\"`" },
  { "host", "string", nil, "the server's name or address" },
  { "port", "integer", nil, "465 for implicit TLS, 24 for LMTP, else 25" },
  { "path", "string", nil, "a UNIX-domain socket instead of host and port" },
  { "sock", "userdata", nil, "an already connected socket (greeting not yet read)" },
  { "implicit_port", "integer", nil, "`tls = \"auto\"`: the port for implicit TLS (465)" },
  { "starttls_port", "integer", nil, "`tls = \"auto\"`: the port for STARTTLS (587)" },
  { "tls", "string", nil, "`\"starttls\"` (`\"implicit\"` on port 465, `\"none\"` over a UNIX socket), `\"implicit\"`, "
    .. "`\"opportunistic\"`, `\"none\"`, `\"auto\"`" },
  { "tls_context", "userdata", nil, "a client TLS context" },
  { "cafile", "string", nil, "trust store file for the TLS context" },
  { "capath", "string", nil, "trust store directory for the TLS context" },
  { "insecure", "boolean", false, "do not verify the server" },
  { "verify", "boolean", nil, "`false`: as insecure; `true`: verify opportunistic STARTTLS too" },
  { "servername", "string", nil, "name for SNI and the certificate check (default: host)" },
  { "starttls_options", "table", nil, "more fields for `sock:starttls`, such as `dane = {...}` (see \"DANE\")" },
  { "helo", "string", nil, "EHLO/LHLO name (default: our address as a literal)" },
  { "auth", "table", nil, "`{ user =, password = }` (or `token =`, `external = true`), ..." },
  { "lmtp", "boolean", false, "LHLO, and one reply per recipient after the data" },
  { "pipelining", "boolean", true, "use PIPELINING when offered" },
  { "chunking", "string|boolean", "binary", "BDAT: `\"binary\"` bodies only, `true` whenever offered, `false`" },
  { "transcript", "function", nil, "`function(direction, line)`" },
  { "family", "string", nil, "`\"inet\"` or `\"inet6\"`" },
  { "bind", "string", nil, "local address" },
  { "max_reply_lines", "integer", 100, "lines of one reply" },
  { "max_line", "integer", 2048, "bytes of a reply line, CRLF excluded" },
  { name = "timeouts", fields = TIMEOUTS },
})

-- The fields of a message (client.send takes them with the connection
-- options in one table).
M.MESSAGE_FIELDS = { from = true, to = true, body = true, message = true, size = true, body_type = true,
  smtputf8 = true, requiretls = true, dsn = true, mail_params = true, force = true }

local TLS_MODES = { implicit = true, starttls = true, opportunistic = true, none = true, auto = true }

M.TLS_MODES = TLS_MODES

--- merge(opts) -> config: the options checked against the schema, with
-- the server's port and the TLS mode filled in.
function M.merge(opts)
  local cfg = M.schema:apply(opts, 3)
  for k, v in pairs(cfg.timeouts) do
    assert(v > 0, "timeout " .. k .. " must be a positive number")
  end
  if cfg.server then
    local host, port = net.parse_address(cfg.server)
    assert(host, "server must be HOST or HOST:PORT")
    cfg.host = cfg.host or host
    if port and cfg.port == nil and cfg.server:find(":%d+$") then cfg.port = port end
  end
  if cfg.tls == nil then
    -- a UNIX socket never leaves the host
    cfg.tls = cfg.path and "none" or (cfg.port == 465) and "implicit" or "starttls"
  end
  assert(TLS_MODES[cfg.tls], "tls must be \"implicit\", \"starttls\", \"opportunistic\", \"none\" or \"auto\"")
  assert(not (cfg.path and cfg.tls == "auto"), "tls = \"auto\" needs a host and port, not a path")
  if cfg.port == nil and cfg.tls ~= "auto" and not cfg.path then
    cfg.port = cfg.tls == "implicit" and 465 or cfg.lmtp and 24 or 25
  end
  assert(cfg.sock or cfg.path or type(cfg.host) == "string", "host (or server, path or sock) is required")
  assert(cfg.helo == nil or (type(cfg.helo) == "string" and cfg.helo:find("^[%w%.%-%[%]:]+$")),
    "helo must be a domain or an address literal")
  return cfg
end


return M
