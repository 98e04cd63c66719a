--- Built-in plugin: per-address connection limits and rates, messages
-- per connection, recipients per message.
--
--   plugins.limits{ max_connections_per_ip = 50, connection_rate_per_ip = 0,
--                   max_messages_per_connection = 100, max_recipients = 100 }
-- A session holds its address slot from its connect phase to its
-- disconnect phase (which always runs).
local core = require "luasmtp.core"
local reply = require "luasmtp.reply"

local DEFAULTS = {
  max_connections_per_ip = 50,
  connection_rate_per_ip = 0,
  max_messages_per_connection = 100,
  max_recipients = 100,
}

return function(opts)
  local limits = {}
  for k, v in pairs(DEFAULTS) do
    limits[k] = opts and opts[k] or v
  end
  local per_ip = {}       -- address -> sessions holding a slot
  local counted = setmetatable({}, { __mode = "k" }) -- session -> address
  local rates             -- one-minute window in two halves

  -- Connection-rate limit per client address: a window of one minute,
  -- counted in two halves so old connections age out smoothly.
  local function rate_ok(ip)
    local limit = limits.connection_rate_per_ip
    if not limit or limit <= 0 then return true end
    local now = core.now()
    local slot = math.floor(now / 30)
    local r = rates or { slot = slot, cur = {}, prev = {} }
    rates = r
    if slot ~= r.slot then
      r.prev = slot == r.slot + 1 and r.cur or {}
      r.cur, r.slot = {}, slot
    end
    local weight = 1 - (now / 30 - slot)
    local count = (r.cur[ip] or 0) + (r.prev[ip] or 0) * weight
    if count >= limit then return false end
    r.cur[ip] = (r.cur[ip] or 0) + 1
    return true
  end

  local plugin = { name = "limits", limits = limits, per_ip = per_ip }

  function plugin.connect(s)
    local ip = s.client_address
    if not rate_ok(ip) then
      return reply.disconnect(s.config.hostname .. " Too many connections, slow down")
    end
    local n = per_ip[ip] or 0
    if n >= limits.max_connections_per_ip then
      return reply.disconnect(s.config.hostname .. " Too many connections from your address")
    end
    -- check and count in one step: no other session runs in between
    per_ip[ip] = n + 1
    counted[s] = ip
  end

  function plugin.disconnect(s)
    local ip = counted[s]
    if ip then
      counted[s] = nil
      local n = per_ip[ip] - 1
      per_ip[ip] = n > 0 and n or nil
    end
  end

  function plugin.mail(s)
    if s.messages >= limits.max_messages_per_connection then
      return reply.new(452, "4.5.3", "Too many messages in this connection")
    end
  end

  function plugin.rcpt(s)
    if #s.envelope.rcpt >= limits.max_recipients then
      return reply.new(452, "4.5.3", "Too many recipients")
    end
  end

  return plugin
end
