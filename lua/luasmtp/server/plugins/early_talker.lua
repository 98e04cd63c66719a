--- Built-in plugin: pause before the greeting and refuse clients that
-- talk first (they do not speak SMTP, or pipeline illegally).
--
--   plugins.early_talker{ pause = 5 }
local reply = require "luasmtp.reply"

return function(opts)
  local pause = opts and opts.pause or 5
  return {
    name = "early_talker",
    -- the wait is the point of this plugin: its deadline must cover it
    timeouts = { connect = pause + 10 },
    connect = function(s)
      if pause > 0 and s.sock:receiveany(1, pause) then
        return reply.disconnect("Input before the greeting", 554, "5.5.0")
      end
    end,
  }
end
