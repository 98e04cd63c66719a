--- Built-in plugin: a first command that is an HTTP request line gets
-- 554 5.7.0 and the connection is closed (cross-protocol attacks).
local reply = require "luasmtp.reply"

local HTTP_VERBS = { GET = true, POST = true, HEAD = true, PUT = true, CONNECT = true, OPTIONS = true }

return function()
  return {
    name = "http",
    unknown = function(s, line)
      if s.commands == 1 and HTTP_VERBS[line:match("^(%u+) ") or ""] and line:find(" HTTP/%d") then
        return reply.disconnect("This is an SMTP server", 554, "5.7.0")
      end
    end,
  }
end
