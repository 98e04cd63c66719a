--- Built-in plugin: per-address connection limits and rates, messages
-- per connection, recipients per message.
--
--   plugins.limits{ max_connections_per_ip = 50, connection_rate_per_ip = 0,
--                   max_messages_per_connection = 100, max_recipients = 100,
--                   store = kv.memory() }
-- A session holds its address slot from its connect phase to its
-- disconnect phase (which always runs). The slots and rate counters live
-- in `store` (luasmtp.kv): in this process by default (in a worker of
-- `serve --workers`, the supervisor's counter service), or in a store
-- shared by several processes or machines. When the store fails, the
-- store's on_error decides: "open" lets the client in, "closed" answers
-- 421 and closes.
local kv = require "luasmtp.kv"
local reply = require "luasmtp.reply"
local workers = require "luasmtp.workers"

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
  -- under `serve --workers`: the supervisor's counter service
  local store = opts and opts.store or workers.store() or kv.memory()
  local held = setmetatable({}, { __mode = "k" }) -- session -> {key, lease}

  local plugin = { name = "limits", limits = limits, store = store }

  local function store_failed(s, what, err)
    s:log("warning", "limits: store failed (%s): %s", what, tostring(err))
    if store.on_error == "closed" then
      return reply.disconnect(s.config.hostname .. " Service busy, try again later")
    end
  end

  function plugin.connect(s)
    local ip = s.client_address
    local rate = limits.connection_rate_per_ip
    if rate and rate > 0 then
      local ok, err = store:hit("rate:" .. ip, rate, 60)
      if ok == nil then
        local r = store_failed(s, "rate", err)
        if r then return r end
      elseif not ok then
        return reply.disconnect(s.config.hostname .. " Too many connections, slow down")
      end
    end
    local lease, err = store:acquire("conn:" .. ip, limits.max_connections_per_ip)
    if lease == nil then
      return store_failed(s, "acquire", err)
    elseif not lease then
      return reply.disconnect(s.config.hostname .. " Too many connections from your address")
    end
    held[s] = { "conn:" .. ip, lease }
  end

  function plugin.disconnect(s)
    local h = held[s]
    if h then
      held[s] = nil
      local ok, err = store:release(h[1], h[2])
      if not ok then s:log("warning", "limits: store failed (release): %s", tostring(err)) end
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
