--- Built-in plugin: the relay guard (luasmtp.relay), in the rcpt phase.
--
--   plugins.relay{ domains = {...}, networks = {CIDR...}, authenticated = true }
local relay = require "luasmtp.relay"

return function(opts)
  local check = relay.checker(opts)
  return {
    name = "relay",
    rcpt = function(s, address)
      return check(s, address)
    end,
  }
end
