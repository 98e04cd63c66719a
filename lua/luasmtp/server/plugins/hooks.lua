--- The `hooks = { on_rcpt = fn, ... }` option: sugar for a one-plugin
-- chain. on_data is the message phase (the whole message has arrived).
local M = {}

M.PHASE_OF = {
  on_connect = "connect", on_helo = "helo", on_starttls = "starttls", on_auth = "auth",
  on_mail = "mail", on_rcpt = "rcpt", on_data_start = "data", on_headers = "headers",
  on_body = "body", on_data = "message", on_message = "message", on_deliver = "deliver",
  on_rset = "rset", on_disconnect = "disconnect", on_vrfy = "vrfy", on_expn = "expn",
  on_unknown = "unknown",
}

--- plugin(hooks) -> a plugin named "hooks"
function M.plugin(hooks)
  local p = { name = "hooks" }
  for k, fn in pairs(hooks) do
    local phase = M.PHASE_OF[k]
    if not phase then error(("server: unknown hook '%s'"):format(tostring(k)), 4) end
    assert(type(fn) == "function", "hook " .. k .. " must be a function")
    assert(not p[phase], "hooks: on_data and on_message are the same phase")
    p[phase] = fn
  end
  return p
end

return M
