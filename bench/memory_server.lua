-- The server the memory benchmark measures (bench/memory.py): a Maildir
-- MX on the given port that spools into the Maildir's tmp/.
--   lua5.4 bench/memory_server.lua PORT MAILDIR
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"

local port, dir = tonumber(arg[1]), arg[2]
local srv = assert(server.new {
  listen = "127.0.0.1:" .. port,
  hostname = "memory.test",
  log_level = "error",
  limits = { max_message_size = 200 * 1024 * 1024 },
  plugins = { server.plugins.received(), server.plugins.maildir(dir) },
})
luasmtp.spawn(function() luasmtp.sleep(600) srv:close() end)
luasmtp.run()
