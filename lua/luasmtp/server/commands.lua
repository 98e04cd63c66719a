--- luasmtp.server.commands: the command table of the server session.
--
-- One handler per verb. A handler checks the protocol rules (sequence,
-- syntax, advertised extensions), asks the plugin chain of its phase,
-- and sends the reply. It returns "quit" or "close" to end the session.
local core = require "luasmtp.core"
local auth = require "luasmtp.server.auth"
local message = require "luasmtp.server.message"

local M = {}
local handlers = {}
M.handlers = handlers

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
  if c.tls and not s.tls then add("STARTTLS") end
  local mechs = auth.mechanisms(s)
  if #mechs > 0 and not s.user then add("AUTH " .. table.concat(mechs, " ")) end
  if c.requiretls and s.tls then add("REQUIRETLS") end
  local limits = s.server.advertised_limits
  add(("LIMITS RCPTMAX=%d MAILMAX=%d"):format(limits.max_recipients, limits.max_messages_per_connection))
  return table.concat(lines, "\n")
end

local function greet(s, cmd, esmtp)
  if not cmd.arg or cmd.arg == "" then
    return s:send_reply(501, "5.5.4", "Syntax: " .. cmd.verb .. " hostname")
  end
  local r = s:phase("helo", cmd.arg, esmtp)
  if r and r.code >= 400 then
    local _, disc = s:answer(r)
    if disc then return "close" end
    return
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
  local r = s:phase("rset")
  local _, disc = s:answer(r, 250, "2.0.0", "OK")
  if disc then return "close" end
end

handlers.HELP = function(s)
  return s:send_reply(214, "2.0.0", "See RFC 5321")
end

handlers.VRFY = function(s, cmd)
  local r = s:phase("vrfy", cmd.arg)
  local _, disc = s:answer(r, 252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
  if disc then return "close" end
end

handlers.EXPN = function(s, cmd)
  local r = s:phase("expn", cmd.arg)
  local _, disc = s:answer(r, 502, "5.5.1", "EXPN not available")
  if disc then return "close" end
end

handlers.QUIT = function(s)
  s:send_reply(221, "2.0.0", "Bye")
  return "quit"
end

--- A verb without a handler: the unknown phase (HTTP rejection lives
-- there), else 500.
function M.unknown(s, line)
  local r = s:phase("unknown", line)
  if r then
    s:send_reply(r.code, r.enhanced, r.text)
    if r.disconnect then return "close" end
    if r.code >= 500 then s.invalid_commands = s.invalid_commands + 1 end
    return
  end
  s:send_reply(500, "5.5.1", "Command unrecognized")
  s.invalid_commands = s.invalid_commands + 1
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
  s:reset_envelope()
  s.helo_name, s.esmtp, s.user = nil, false, nil
  local r = s:phase("starttls", s.sock:tlsinfo())
  if r then
    s:send_reply(r.code, r.enhanced, r.text)
    if r.disconnect or r.code >= 400 then return "close" end
  end
end

local function need_helo(s)
  if not s.helo_name then
    s:send_reply(503, "5.5.1", "Send " .. (s.config.lmtp and "LHLO" or "EHLO/HELO") .. " first")
    return true
  end
end

handlers.AUTH = function(s, cmd)
  if not s.config.auth then
    return s:send_reply(502, "5.5.1", "AUTH not available")
  end
  if need_helo(s) then return end
  return auth.command(s, cmd)
end

handlers.MAIL = function(s, cmd)
  if need_helo(s) then return end
  if s.envelope then
    return s:send_reply(503, "5.5.1", "Nested MAIL command")
  end
  local c = s.config
  if cmd.unknown then
    return s:send_reply(555, "5.5.4", "Unsupported parameter " .. cmd.unknown[1])
  end
  if cmd.size and cmd.size > c.limits.max_message_size then
    return s:send_reply(552, "5.3.4", "Message size exceeds fixed limit")
  end
  if cmd.smtputf8 and not c.smtputf8 then
    return s:send_reply(555, "5.5.4", "SMTPUTF8 not supported")
  end
  if (cmd.ret or cmd.envid) and not c.dsn then
    return s:send_reply(555, "5.5.4", "DSN not supported")
  end
  if cmd.utf8 and not cmd.smtputf8 then
    return s:send_reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
  end
  if cmd.requiretls and not (s.tls and c.requiretls) then
    return s:send_reply(530, "5.7.10", "REQUIRETLS needs TLS")
  end
  if cmd.body == "BINARYMIME" and not c.chunking then
    return s:send_reply(555, "5.5.4", "BINARYMIME needs CHUNKING")
  end
  if cmd.body == "8BITMIME" and not c.eightbitmime then
    return s:send_reply(555, "5.5.4", "8BITMIME not supported")
  end
  local env = { from = cmd.path, params = cmd, rcpt = {}, rcpt_params = {} }
  s.envelope = env
  local r = s:phase("mail", cmd.path, cmd)
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
  if cmd.unknown then
    return s:send_reply(555, "5.5.4", "Unsupported parameter " .. cmd.unknown[1])
  end
  if cmd.utf8 and not env.params.smtputf8 then
    return s:send_reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
  end
  if (cmd.notify or cmd.orcpt) and not s.config.dsn then
    return s:send_reply(555, "5.5.4", "DSN not supported")
  end
  local r = s:phase("rcpt", cmd.path, cmd)
  local accepted, disc = s:answer(r, 250, "2.1.5", "Recipient OK")
  s:log("info", "rcpt to=<%s> %s", cmd.path, accepted and "accepted" or ("refused " .. r.code))
  if accepted then
    env.rcpt[#env.rcpt + 1] = cmd.path
    env.rcpt_params[#env.rcpt] = cmd
  end
  if disc then return "close" end
end

---------------------------------------------------------------------------
-- The message: DATA and BDAT feed one pipeline

-- The data phase, before the 354 or the first BDAT: nil, or the reply
-- already sent and whether to close.
local function data_phase(s)
  local r = s:phase("data")
  if r and r.code >= 400 then
    local _, disc = s:answer(r)
    return true, disc
  end
  return nil
end

-- The data ended: the header view, the remaining phases and the reply
-- (per recipient for LMTP). The body phase gets the body in the pieces
-- the sink holds it in, from memory or the spool file.
local function finish_message(s, sink, info)
  local env = s.envelope
  s.envelope = nil
  s.bdat = nil
  local function refuse(code, enh, text)
    sink:close()
    return s:send_reply(code, enh, text)
  end
  if info.too_big then
    return refuse(552, "5.3.4", "Message size exceeds fixed limit")
  end
  if info.rejected then
    s:log("info", "message refused: bare CR or LF")
    return refuse(554, "5.6.11", "Bare CR or LF in message data")
  end
  if info.long_line then
    s:log("info", "message refused: line longer than %d", s.config.limits.text_line_length)
    return refuse(554, "5.6.0", "Message line too long")
  end
  local msg = message.from_sink(env, sink)
  s.incoming = msg
  s.messages = s.messages + 1
  local r = s:phase("headers", msg)
  if not r and s.chains.body then
    for piece in msg:body_chunks() do
      r = s:phase("body", msg, piece)
      if r then break end
    end
  end
  if not r then
    r = s:phase("message", msg)
    if not r or r.code < 400 then
      r = s:phase("deliver", msg) or r
    end
  end
  if s:logs("info") then
    s:log("info", "message size=%d rcpt=%d %s", msg:size(), #env.rcpt,
      (r == nil or r.code < 400) and "accepted" or ("refused " .. r.code))
  end
  s.incoming = nil
  msg:discard()
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
  local refused, disc = data_phase(s)
  if refused then
    if disc then return "close" end
    return
  end
  s:send_reply(354, nil, "End data with <CR><LF>.<CR><LF>")
  local c = s.config
  local sink = s.server:new_sink()
  -- The body goes from the socket buffer into the sink (memory, then a
  -- spool file) in C, decoded on the way; what follows the end of data
  -- (a pipelined command) stays buffered.
  local info, err = s.sock:receivebody(sink, {
    max_size = c.limits.max_message_size,
    bare = c.bare_newlines,
    max_line = math.max(c.limits.text_line_length - 2, 0),
    idle_timeout = c.timeouts.data_block,
    total_timeout = c.timeouts.data_total,
  })
  if not info then
    sink:close()
    s:reset_envelope()
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
  local timeout = s.config.timeouts.data_block
  -- A refused BDAT still consumes its chunk (into a sink that keeps nothing).
  local function discard(code, enh, text)
    local trash <close> = core.sink { max_size = 0, threshold = 0 }
    local ok, err = s.sock:receivechunk(trash, size, timeout)
    if not ok and err ~= "limit" then return "close" end
    if code then s:send_reply(code, enh, text) end
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
    local refused, disc = data_phase(s)
    if refused then
      s.envelope = nil
      if discard() == "close" or disc then return "close" end
      return
    end
    s.bdat = { sink = s.server:new_sink(s.config.limits.max_message_size), size = 0 }
  end
  local b = s.bdat
  local ok, err = s.sock:receivechunk(b.sink, size, timeout)
  if not ok and err ~= "limit" and err ~= "io" then
    s:reset_envelope()
    return "close"
  end
  b.size = b.size + size
  if err == "io" or (err == "limit" and not last) then
    s:reset_envelope()
    if err == "io" then
      return s:send_reply(451, "4.3.0", "Local error in processing")
    end
    return s:send_reply(552, "5.3.4", "Message size exceeds fixed limit")
  end
  if not last then
    return s:send_reply(250, "2.0.0", ("%d octets received"):format(size))
  end
  return finish_message(s, b.sink, { too_big = err == "limit" })
end

return M
