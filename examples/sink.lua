-- sink.lua: accepts every message and throws it away, counting what the
-- Lua hooks see on MAIL, RCPT and DATA. Used by the benchmarks (compare
-- with Postfix's smtp-sink).
--
--   luasmtp serve examples/sink.lua --listen 127.0.0.1:2525 [--report SECONDS]
--       [--cert FILE --key FILE]   (offer STARTTLS with this certificate)
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local getopt = require "luasmtp.getopt"

local usage = "usage: sink.lua --listen ADDR:PORT [--report SECONDS] [--lifetime SECONDS]\n" ..
  "  [--cert FILE --key FILE]\n"
local opts = getopt.run(function(argv)
  local o = getopt.parse(argv, { listen = "string", report = "number", lifetime = "number",
    cert = "string", key = "string" })
  if (o.cert == nil) ~= (o.key == nil) then getopt.usage_error("--cert and --key go together") end
  return o
end, { ... }, usage)

local counts = { mail = 0, rcpt = 0, messages = 0, bytes = 0 }
local srv = assert(server.new {
  listen = opts.listen or "127.0.0.1:2525",
  hostname = "sink.localhost",
  received_header = false,
  tls = opts.cert and luasmtp.tls.context { mode = "server", certificate = opts.cert, key = opts.key },
  limits = { max_connections_per_ip = 10000, max_messages_per_connection = 1000000 },
  log_level = "error",
  hooks = {
    on_mail = function() counts.mail = counts.mail + 1 end,
    on_rcpt = function() counts.rcpt = counts.rcpt + 1 end,
    on_data = function(_, msg)
      counts.messages = counts.messages + 1
      counts.bytes = counts.bytes + msg:size()
    end,
  },
})
for _, a in ipairs(srv:addresses()) do
  io.stderr:write(("sink listening on %s\n"):format(luasmtp.format_address(a.address, a.port)))
end

if opts.report then
  luasmtp.spawn(function()
    while true do
      luasmtp.sleep(opts.report)
      io.stderr:write(("mail=%d rcpt=%d messages=%d bytes=%d\n"):format(
        counts.mail, counts.rcpt, counts.messages, counts.bytes))
    end
  end)
end
if opts.lifetime then
  luasmtp.spawn(function() luasmtp.sleep(opts.lifetime) srv:close() end)
end

return { stop = function()
  io.stderr:write(("mail=%d rcpt=%d messages=%d bytes=%d\n"):format(
    counts.mail, counts.rcpt, counts.messages, counts.bytes))
end }
