-- A line echo server: one task per connection, CRLF lines capped at
-- 512 bytes, a 30 second idle timeout, and a clean shutdown after
-- `lifetime` seconds.
--
--   lua5.4 examples/echo-server.lua [ADDR:PORT] [LIFETIME]
--   printf 'hello\r\nQUIT\r\n' | nc 127.0.0.1 2525
local luasmtp = require "luasmtp"

local listen = arg[1] or "127.0.0.1:2525"
local lifetime = tonumber(arg[2]) or 60

local server = assert(luasmtp.serve {
  listen = listen,
  handler = function(sock, conn)
    io.stderr:write(("connection %d from %s\n"):format(conn.id, luasmtp.format_address(conn.peer_address,
      conn.peer_port)))
    sock:send("220 echo ready\r\n")
    while true do
      local line, err = sock:receiveline(512, 30)
      if not line then
        if err == "limit" then
          sock:send("500 line too long\r\n")
        else
          return -- timeout, closed or reset
        end
      elseif line:upper() == "QUIT" then
        sock:send("221 bye\r\n")
        return
      else
        sock:send("250 " .. line .. "\r\n")
      end
    end
  end,
})

for _, a in ipairs(server.addresses) do
  io.stderr:write(("listening on %s for %g seconds\n"):format(luasmtp.format_address(a.address, a.port), lifetime))
end
luasmtp.spawn(function()
  luasmtp.sleep(lifetime)
  server:close()
end)
luasmtp.run()
