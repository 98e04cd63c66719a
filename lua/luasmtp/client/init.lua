--- luasmtp.client: the SMTP/LMTP client.
--
--   local client = require "luasmtp.client"
--   local conn, token, err = client.connect { host = "mail.example", port = 587,
--     tls = "starttls", auth = { user = "me", password = pw } }
--   local res, token, err = conn:send { from = "me@example", to = { "a@x", "b@y" },
--     body = "Subject: hi\r\n\r\nhello\r\n" }
--   conn:close()
--
-- A session reads like RFC 5321: greeting, EHLO (HELO when EHLO is
-- refused), STARTTLS and EHLO again, AUTH, then transactions of MAIL,
-- RCPT... and DATA or BDAT, RSET between them, QUIT at the end.
--
-- Results and errors are values. A failure returns nil, token, err:
-- token is a string ("smtp" for a 4xx/5xx reply, "auth", "unsupported",
-- "size", "invalid", "protocol", or an I/O token of the socket layer:
-- "timeout", "closed", "reset", "tls", "refused", "dns", ...), err an
-- Error table: { token, permanent, code, enhanced, command, lines,
-- text, cause, stage, message } that prints as its message. After an
-- I/O failure, a timeout, a malformed reply or a 421 the session is
-- broken: every later call returns that same error at once.
--
-- The pieces: client/config.lua (options), errors.lua (error values,
-- built on luasmtp.reply), plan.lua (the message plan), session.lua (the
-- session), body.lua (body encoding), pool.lua (connection pool).
local config = require "luasmtp.client.config"
local errors = require "luasmtp.client.errors"
local plan = require "luasmtp.client.plan"
local session = require "luasmtp.client.session"
local pool = require "luasmtp.client.pool"

local M = {
  schema = config.schema,
  DEFAULT_TIMEOUTS = config.DEFAULT_TIMEOUTS,
  MESSAGE_FIELDS = config.MESSAGE_FIELDS,
  Error = errors.Error,
  is_error = errors.is_error,
  format_reply = errors.format_reply,
  build_plan = plan.build_plan,
  Session = session.Session,
  connect = session.connect,
  connect_tls = session.connect_tls,
  tls_context = session.tls_context,
}

--- send(opts) -> result | nil, token, err
-- connect(opts), session:send(opts), close: opts holds both the
-- connection options and the message.
function M.send(opts)
  assert(type(opts) == "table", "client.send needs an options table")
  local p, t, e = plan.build_plan(opts)
  if not p then return nil, t, e end
  local conn_opts = {}
  for k, v in pairs(opts) do
    if not config.MESSAGE_FIELDS[k] then conn_opts[k] = v end
  end
  local conn
  conn, t, e = M.connect(conn_opts)
  if not conn then return nil, t, e end
  local res, token, err = conn:send_plan(p)
  conn:close()
  return res, token, err
end

--- pool(opts) -> pool (see luasmtp.client.pool)
function M.pool(opts)
  return pool.new(opts, M)
end

return M
