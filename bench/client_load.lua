-- bench/client_load.lua PORT CONNS MESSAGES SIZE
-- CONNS sessions, each sending its share of MESSAGES messages of SIZE
-- octets with luasmtp.client (the same load as smtp-source -d -s CONNS).
local luasmtp = require "luasmtp"
local client = require "luasmtp.client"

local port, conns, messages, size = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4])
local line = ("x"):rep(78) .. "\r\n"
local body = "From: <bench@example.org>\r\nTo: <sink@example.org>\r\nSubject: bench\r\n\r\n"
body = body .. line:rep((size - #body) // #line)
body = body .. ("y"):rep(size - #body - 2) .. "\r\n"

local failed = 0
local per = messages // conns
local tasks = {}
for i = 1, conns do
  local count = per + (i <= messages % conns and 1 or 0)
  tasks[i] = luasmtp.spawn(function()
    local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none", helo = "bench.example" })
    for _ = 1, count do
      local res = conn:send { from = "bench@example.org", to = "sink@example.org", body = body }
      if not res then failed = failed + 1 end
    end
    conn:close()
  end)
end
for _, t in ipairs(tasks) do assert(t:join(600)) end
if failed > 0 then
  io.stderr:write(failed, " messages failed\n")
  os.exit(1)
end
