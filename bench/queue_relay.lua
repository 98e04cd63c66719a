--- Relay throughput through the queue, fsync on (not a test):
--   lua5.4 bench/queue_relay.lua SINK_PORT DIR MESSAGES CONCURRENCY [DEPTH]
-- Submits MESSAGES over SMTP (CONCURRENCY sessions at once) to a server
-- whose on_data is the queue's plugin; the queue relays to 127.0.0.1:
-- SINK_PORT (smtp-sink). With DEPTH, that many messages are queued
-- first, with the scheduler stopped, then all are relayed (the time
-- counts both). Prints
-- "messages/s cpu_ms_per_message".
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local client = require "luasmtp.client"
local queue = require "luasmtp.queue"

local sink_port, dir, n, conc, depth = tonumber(arg[1]), arg[2], tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5])
os.execute("rm -rf '" .. dir .. "'")
local q = assert(queue.open { dir = dir, log = function() end, max_connections_per_destination = 8,
  route = function() return { kind = "smarthost", host = "127.0.0.1", port = sink_port, tls = "none" } end })
local front = assert(server.new { listen = { "127.0.0.1:0" }, hostname = "bench.test", log_level = "error",
  received_header = false, relay = { networks = { "127.0.0.0/8" } },
  limits = { max_messages_per_connection = 1000000 }, hooks = { on_data = queue.plugin(q).on_data } })
local port = front:addresses()[1].port
local body = "Subject: bench\r\nMessage-ID: <x@bench>\r\n\r\n" .. (("0123456789abcdef"):rep(4) .. "\r\n"):rep(64)

local function submit(count)
  local pool = client.pool { max_connections = conc }
  local left = count
  local tasks = {}
  for i = 1, conc do
    tasks[i] = luasmtp.spawn(function()
      while left > 0 do
        left = left - 1
        local res, _, err = pool:send({ from = "a@bench.test", to = { "b@sink.test" }, body = body },
          { host = "127.0.0.1", port = port, tls = "none" })
        if not res then error(tostring(err)) end
      end
    end)
  end
  for _, t in ipairs(tasks) do assert(t:join(600)) end
  pool:close()
end

luasmtp.spawn(function()
  local c0, t0 = os.clock(), luasmtp.update_now()
  if depth then
    submit(n)
    q:start()
  else
    q:start()
    submit(n)
  end
  while q:pending() > 0 do luasmtp.sleep(0.01) end
  local dt = luasmtp.update_now() - t0
  print(("%.1f %.2f"):format(n / dt, (os.clock() - c0) * 1000 / n))
  q:stop()
  front:close()
end)
luasmtp.run()
