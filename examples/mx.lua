-- mx.lua: an inbound MX. Accepts mail for the listed domains into a
-- Maildir, refuses to relay anywhere else (554 5.7.1) unless the client
-- is in one of the relay networks, and offers STARTTLS when given a
-- certificate. The policy is a plugin chain: the built-in limits and
-- HTTP rejection, the relay guard, the Received header, a plugin of its
-- own (each of its calls has a deadline of 5 s) and the Maildir.
--
--   luasmtp serve examples/mx.lua --listen 127.0.0.1:2525 \
--       --domains a.example,b.example --maildir var/mx \
--       [--relay-nets 127.0.0.0/8,::1/128] [--tls-cert F --tls-key F] [--hostname NAME]
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
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
local plugins = server.plugins

-- Our own plugin: log each message's subject from the header view, and
-- refuse a message with neither From nor Date (RFC 5322 wants both).
local hygiene = {
  name = "hygiene",
  timeout = 5,
  headers = function(session, message)
    session:log("info", "subject: %s", message.header:get("Subject") or "(none)")
    if not message.header:get("Date") and not message.header:get("From") then
      return server.reply(550, "5.6.0", "Message lacks From and Date")
    end
  end,
}

local srv = assert(server.new {
  listen = opts.listen,
  hostname = opts.hostname or "mx.localhost",
  tls = tls,
  plugins = {
    plugins.limits(),
    plugins.http(),
    plugins.relay { domains = opts.domains, networks = opts["relay-nets"] or {}, authenticated = false },
    plugins.received(),
    hygiene,
    plugins.maildir(opts.maildir),
  },
})
for _, a in ipairs(srv:addresses()) do
  io.stderr:write(("mx listening on %s for %s\n"):format(luasmtp.format_address(a.address, a.port),
    table.concat(opts.domains, ",")))
end
