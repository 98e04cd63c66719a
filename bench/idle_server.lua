-- idle_server.lua: the server that bench/idle_memory.py measures. Like
-- examples/sink.lua, with the connection limits raised for thousands of
-- idle sessions, optional STARTTLS, and a stats listener that answers
-- each connection with one line: luasmtp.stats() (after a full garbage
-- collection) as key=value pairs.
--
--   luasmtp serve bench/idle_server.lua --listen ADDR:PORT --stats ADDR:PORT
--                 [--cert FILE --key FILE] [--lifetime SECONDS]
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local getopt = require "luasmtp.getopt"

local usage = "usage: idle_server.lua --listen ADDR:PORT --stats ADDR:PORT "
  .. "[--cert FILE --key FILE] [--lifetime SECONDS]\n"
local opts = getopt.run(function(argv)
  return (getopt.parse(argv, { listen = "string", stats = "string", cert = "string", key = "string",
    lifetime = "number" }))
end, { ... }, usage)

local tls
if opts.cert then
  tls = assert(luasmtp.tls.context { mode = "server", certificate = opts.cert, key = opts.key })
end

local srv = assert(server.new {
  listen = opts.listen,
  hostname = "idle.localhost",
  tls = tls,
  received_header = false,
  limits = { max_connections = 100000, max_connections_per_ip = 100000 },
  log_level = "error",
})

local function stats_line()
  collectgarbage("collect")
  local st = luasmtp.stats()
  st.lua_kib = collectgarbage("count")
  local keys = {}
  for k in pairs(st) do keys[#keys + 1] = k end
  table.sort(keys)
  local out = {}
  for _, k in ipairs(keys) do
    out[#out + 1] = ("%s=%s"):format(k, tostring(st[k]))
  end
  return table.concat(out, " ") .. "\n"
end

local stats = assert(luasmtp.serve {
  listen = opts.stats,
  handler = function(sock)
    sock:send(stats_line())
    sock:flush(5)
  end,
})

local lifetime = opts.lifetime or 600
luasmtp.spawn(function()
  luasmtp.sleep(lifetime)
  stats:close()
  srv:shutdown(1)
end)

return { stop = function() stats:close() end }
