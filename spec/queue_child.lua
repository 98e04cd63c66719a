--- A queue process for the crash tests, run with lua5.4:
--   lua5.4 spec/queue_child.lua DIR PORT N [LIFETIME]
-- Enqueues N messages ("Message-ID: <child-K@test>", K = 1..N) unless N
-- is 0, then runs the scheduler, relaying everything to 127.0.0.1:PORT
-- (plain SMTP), and exits when the queue is empty or after LIFETIME
-- seconds (30). Prints "queued ID" per message and "empty" at the end.
-- LUASMTP_QUEUE_CRASH (store.crash_point) makes it kill itself at that point.
local luasmtp = require "luasmtp"
local queue = require "luasmtp.queue"

local dir, port, n, lifetime = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4] or 30)
local q = assert(queue.open { dir = dir, retry = { 0.2 }, jitter = 0, tick = 0.1,
  route = function() return { kind = "smarthost", host = "127.0.0.1", port = port, tls = "none" } end,
  log = function() end })
for k = 1, n do
  local id = assert(q:enqueue { from = "sender@test", rcpt = { "a@test", "b@test" },
    body = ("Message-ID: <child-%d@test>\r\nSubject: %d\r\n\r\nbody %d\r\n"):format(k, k, k) })
  io.stdout:write("queued ", id, "\n")
  io.stdout:flush()
end
q:start()
local deadline = luasmtp.update_now() + lifetime
luasmtp.spawn(function()
  while q:pending() > 0 and luasmtp.update_now() < deadline do luasmtp.sleep(0.05) end
  q:stop()
  io.stdout:write(q:pending() == 0 and "empty\n" or "not empty\n")
  io.stdout:flush()
end)
luasmtp.run()
