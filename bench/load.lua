-- Load generator: CONNS connections, each doing ROUNDS request/reply
-- round trips with PIPELINE lines in flight; prints round trips per
-- second.   lua5.4 bench/load.lua PORT CONNS ROUNDS PIPELINE
local luasmtp = require "luasmtp"
local port = math.tointeger(tonumber(arg[1]))
local conns = math.tointeger(tonumber(arg[2])) or 50
local rounds = math.tointeger(tonumber(arg[3])) or 2000
local pipeline = math.tointeger(tonumber(arg[4])) or 1

local batch = string.rep("RCPT TO:<someone@example.test>\r\n", pipeline)
local t0 = luasmtp.update_now()
local tasks = {}
for i = 1, conns do
  tasks[i] = luasmtp.spawn(function()
    local c <close> = assert(luasmtp.connect("127.0.0.1", port, { timeout = 10 }))
    for _ = 1, rounds do
      assert(c:send(batch))
      for _ = 1, pipeline do
        assert(c:receiveline(512, 10))
      end
    end
  end)
end
for _, t in ipairs(tasks) do assert(t:join()) end
local elapsed = luasmtp.update_now() - t0
print(string.format("%.0f", conns * rounds * pipeline / elapsed))
