-- body_server.lua: the server of the body-memory benchmark (bench/memory.py).
-- Accepts messages up to 256 MB into spool_dir and reads each back in
-- pieces (message:chunks()), the way a streaming delivery does.
--
--   luasmtp serve bench/body_server.lua --listen ADDR:PORT --spool DIR
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local getopt = require "luasmtp.getopt"

local usage = "usage: body_server.lua --listen ADDR:PORT --spool DIR [--lifetime SECONDS]\n"
local opts = getopt.run(function(argv)
  return (getopt.parse(argv, { listen = "string", spool = "string", lifetime = "number" }))
end, { ... }, usage)

local srv = assert(server.new {
  listen = opts.listen,
  hostname = "bench.localhost",
  spool_dir = opts.spool,
  received_header = false,
  log_level = "error",
  limits = { max_message_size = 256 * 1024 * 1024 },
  hooks = {
    on_data = function(_, msg)
      local n = 0
      for piece in msg:chunks() do n = n + #piece end
      if n ~= msg:size() then return "451 4.3.0 size mismatch" end
    end,
  },
})
luasmtp.spawn(function() luasmtp.sleep(opts.lifetime or 300) srv:close() end)
