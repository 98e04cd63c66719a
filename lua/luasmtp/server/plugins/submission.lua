--- Built-in plugin: MAIL needs AUTH (530 5.7.0), for submission servers.
local reply = require "luasmtp.reply"

return function()
  return {
    name = "submission",
    mail = function(s)
      if not s.user then
        return reply.new(530, "5.7.0", "Authentication required")
      end
    end,
  }
end
