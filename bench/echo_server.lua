-- Line echo server used by bench/run.sh: replies "250 <line>" to each
-- CRLF line, stops after LIFETIME seconds.
--   lua5.4 bench/echo_server.lua PORT LIFETIME
local luasmtp = require "luasmtp"
local port = math.tointeger(tonumber(arg[1]))
local lifetime = tonumber(arg[2]) or 30

local server = assert(luasmtp.serve {
  listen = "127.0.0.1:" .. port,
  handler = function(sock)
    while true do
      local line = sock:receiveline(512, 10)
      if not line then return end
      sock:send("250 " .. line .. "\r\n")
    end
  end,
})
luasmtp.spawn(function() luasmtp.sleep(lifetime) server:close() end)
luasmtp.run()
