-- mx.lua: an inbound MX. Accepts mail for the listed domains into a
-- Maildir, refuses to relay anywhere else (554 5.7.1) unless the client
-- is in one of the relay networks, and offers STARTTLS when given a
-- certificate.
--
--   luasmtp serve examples/mx.lua --listen 127.0.0.1:2525 \
--       --domains a.example,b.example --maildir var/mx \
--       [--relay-nets 127.0.0.0/8,::1/128] [--tls-cert F --tls-key F] [--hostname NAME]
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local store = require "luasmtp.store"
local getopt = require "luasmtp.getopt"

local usage = [[
usage: mx.lua --listen ADDR:PORT --domains D1,D2 --maildir DIR
              [--relay-nets CIDR,...] [--tls-cert FILE --tls-key FILE] [--hostname NAME]
]]
local opts = getopt.run(function(argv)
  local o = getopt.parse(argv, { listen = "string", domains = "list", maildir = "string",
    ["relay-nets"] = "list", ["tls-cert"] = "string", ["tls-key"] = "string", hostname = "string" })
  if not (o.listen and o.domains and o.maildir) then
    error({ usage = true, message = "--listen, --domains and --maildir are required" }, 0)
  end
  return o
end, { ... }, usage)

local tls
if opts["tls-cert"] then
  tls = luasmtp.tls.context { mode = "server", certificate = opts["tls-cert"], key = opts["tls-key"] }
end
local maildir = store.maildir(opts.maildir)

local srv = assert(server.new {
  listen = opts.listen,
  hostname = opts.hostname or "mx.localhost",
  tls = tls,
  relay = { domains = opts.domains, networks = opts["relay-nets"] or {}, authenticated = false },
  hooks = {
    on_data = function(_, msg)
      local ok, reply = maildir:deliver(msg)
      if not ok then return reply end
    end,
  },
})
for _, a in ipairs(srv:addresses()) do
  io.stderr:write(("mx listening on %s for %s\n"):format(luasmtp.format_address(a.address, a.port),
    table.concat(opts.domains, ",")))
end
