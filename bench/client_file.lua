-- bench/client_file.lua PORT FILE: send FILE as one message with
-- client.send and a file body.
local client = require "luasmtp.client"
local port, path = tonumber(arg[1]), arg[2]
local f = assert(io.open(path, "rb"))
local res, _, err = client.send { host = "127.0.0.1", port = port, tls = "none", helo = "bench.example",
  from = "bench@example.org", to = "sink@example.org", body = f }
f:close()
if not res then
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
