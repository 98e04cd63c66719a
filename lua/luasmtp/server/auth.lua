--- luasmtp.server.auth: SMTP AUTH (RFC 4954) in the server session.
--
-- The exchange is luasmtp.sasl's; this file builds the SASL policy from
-- the server options and the session, runs the command and the auth
-- phase (a plugin may still refuse an authenticated user).
local sasl = require "luasmtp.sasl"

local M = {}

function M.policy(s)
  local c = s.config
  local policy = {
    verifier = c.auth.verifier,
    allow_plaintext = c.allow_plaintext_auth,
    failure_delay = c.auth_failure_delay,
    mechanisms = c.auth.mechanisms,
    hostname = c.hostname,
  }
  if s.tls then
    return sasl.tls_policy(s.sock, policy)
  end
  policy.tls = false
  return policy
end

--- mechanisms(session) -> the mechanisms to offer (empty without AUTH).
function M.mechanisms(s)
  if not s.config.auth then
    return {}
  end
  return sasl.server_mechanisms(M.policy(s))
end

--- command(session, cmd): AUTH mechanism [initial-response]
function M.command(s, cmd)
  local c = s.config
  if s.user then
    return s:send_reply(503, "5.5.1", "Already authenticated")
  end
  if s.envelope then
    return s:send_reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
  end
  local offered = M.mechanisms(s)
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
  local io = sasl.socket_io(s.sock, c.timeouts.command)
  local res = sasl.server_exchange(io, mech, cmd.initial, M.policy(s))
  if res and res.ok then
    local hr = s:phase("auth", res.user, res)
    s:log("info", "auth %s user=%s %s", mech, tostring(res.user), (hr and hr.code >= 400) and "refused" or "ok")
    if hr and hr.code >= 400 then
      s.auth_failures = s.auth_failures + 1
      s:send_reply(hr.code, hr.enhanced, hr.text)
      if hr.disconnect then return "close" end
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
  if s.auth_failures >= c.limits.max_auth_failures then
    s:send_reply(421, "4.7.0", "Too many authentication failures")
    return "close"
  end
end

return M
