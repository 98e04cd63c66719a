--- A server whose deliver phase is the queue, for the crash tests:
--   lua5.4 spec/queue_server_child.lua DIR PORT [LIFETIME]
-- Listens on 127.0.0.1:PORT, queues what it accepts in DIR (no Received
-- header, so a message stays as it arrived; bodies past 4 KiB are
-- spooled in the queue's tmp/), never starts the scheduler, and exits
-- after LIFETIME seconds (30) unless killed before.
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local queue = require "luasmtp.queue"

local dir, port, lifetime = arg[1], tonumber(arg[2]), tonumber(arg[3] or 30)
local q = assert(queue.open { dir = dir, log = function() end })
local srv = assert(server.new { listen = { "127.0.0.1:" .. port }, hostname = "queue.test", log_level = "error",
  relay = { networks = { "127.0.0.0/8" } }, spool_threshold = 4096, plugins = { queue.plugin(q) } })
luasmtp.spawn(function()
  luasmtp.sleep(lifetime)
  srv:close()
end)
luasmtp.run()
