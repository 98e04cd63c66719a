-- kv_store.lua: a sink server whose per-address limits live in a kv store,
-- for comparing the cost per connection of the stores (bench/kv_store.sh).
--
--   lua5.4 bench/kv_store.lua memory|redis [REDIS_SOCKET]
-- Prints its port, then serves until stdin closes... or SIGTERM.
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local kv = require "luasmtp.kv"

local kind, path = ...
local store = kind == "redis" and assert(kv.redis { path = path, timeout = 2 }) or kv.memory()
local messages = 0
local srv = assert(server.new {
  listen = "127.0.0.1:0",
  hostname = "sink.localhost",
  received_header = false,
  log_level = "error",
  logger = function() end,
  plugins = {
    server.plugins.limits { max_connections_per_ip = 1000, connection_rate_per_ip = 1000000,
                            max_messages_per_connection = 1000000, store = store },
  },
  hooks = { on_data = function() messages = messages + 1 end },
})
io.stdout:write(srv:addresses()[1].port, "\n")
io.stdout:flush()
luasmtp.spawn(function()
  luasmtp.wait_signal("TERM")
  io.stderr:write(("messages=%d\n"):format(messages))
  srv:close()
  if store.close then store:close() end
end)
luasmtp.run()
