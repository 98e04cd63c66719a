--- The luasmtp half of the relay benchmark (bench/relay.py; not a test):
--   lua5.4 bench/queue_relay.lua LISTEN_PORT SINK_PORT DIR CONNECTIONS [hold] [LIFETIME]
-- A relay as a script would write it: a server on 127.0.0.1:LISTEN_PORT
-- (relaying for 127.0.0.0/8, a Received header) whose deliver phase is
-- the queue in DIR (fsync on), and the queue's smarthost route to
-- 127.0.0.1:SINK_PORT with at most CONNECTIONS sessions there. With
-- "hold" the scheduler starts only on SIGUSR1, so mail piles up in the
-- queue first. The queue logs to DIR.log. Ends on SIGTERM or after LIFETIME seconds (default 600).
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local queue = require "luasmtp.queue"

local port, sink_port, dir = tonumber(arg[1]), tonumber(arg[2]), arg[3]
local conns, hold, lifetime = tonumber(arg[4]), arg[5] == "hold", tonumber(arg[6]) or 600
assert(port and sink_port and dir and conns, "usage: queue_relay.lua LISTEN_PORT SINK_PORT DIR CONNECTIONS [hold]")

-- one line per event, as Postfix logs (through postlogd)
local logf = assert(io.open(dir .. ".log", "a"))
logf:setvbuf("line")
local function log(level, msg)
  logf:write(os.date("%b %d %H:%M:%S "), level, " ", msg, "\n")
end
local q = assert(queue.open { dir = dir, log = log, max_connections_per_destination = conns,
  max_messages_per_connection = 1000,
  route = function() return { kind = "smarthost", host = "127.0.0.1", port = sink_port, tls = "none" } end })
local front = assert(server.new { listen = { "127.0.0.1:" .. port }, hostname = "relay.bench.test",
  log_level = "error", relay = { networks = { "127.0.0.0/8" } },
  limits = { max_connections = 2000, max_connections_per_ip = 2000, max_messages_per_connection = 100000 },
  plugins = { server.plugins.received(), queue.plugin(q) } })

luasmtp.spawn(function()
  local sig = hold and luasmtp.wait_signal("USR1", "TERM", lifetime) or "USR1"
  if sig == "USR1" then
    q:start()
    luasmtp.wait_signal("TERM", lifetime)
  end
  front:close()
  q:stop()
end)
luasmtp.run()
