-- null-client.lua: a local, outbound-only relay (what Postfix calls a
-- null client): it listens on 127.0.0.1 only, takes mail from the
-- machine's own users and cron jobs (`luasmtp send` or any sendmail
-- that speaks SMTP to localhost), delivers nothing locally, queues every
-- message and relays it to a smarthost or to the recipients' MX hosts.
-- Recipients need a domain (a bare "root" gets 501 5.1.3): point cron's
-- MAILTO and the aliases of local accounts at full addresses.
--
--   luasmtp serve examples/null-client.lua --queue var/queue \
--       [--listen 127.0.0.1:25] [--smarthost HOST[:PORT] [--smarthost-tls starttls|none]]
--       [--hostname NAME]
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local getopt = require "luasmtp.getopt"
local queue = require "luasmtp.queue"

local usage = [=[
usage: null-client.lua --queue DIR [--listen 127.0.0.1:PORT]
                       [--smarthost HOST[:PORT] [--smarthost-tls starttls|none]] [--hostname NAME]
]=]
local opts = getopt.run(function(argv)
  local o = getopt.parse(argv, { queue = "string", listen = "string", smarthost = "string",
    ["smarthost-tls"] = "string", hostname = "string" })
  if not o.queue then error({ usage = true, message = "--queue is required" }, 0) end
  local host = require("luasmtp.net").parse_address(o.listen or "127.0.0.1:25", 25)
  if not host or not (host:match("^127%.") or host == "::1") then
    error({ usage = true, message = "--listen must be a loopback address" }, 0)
  end
  return o
end, { ... }, usage)

local hostname = opts.hostname or "localhost"

local route
if opts.smarthost then
  local host, port = require("luasmtp.net").parse_address(opts.smarthost, 25)
  assert(host, "bad --smarthost: " .. opts.smarthost)
  route = { kind = "smarthost", host = host, port = port, tls = opts["smarthost-tls"] or "starttls" }
else
  route = { kind = "mx", tls_policy = "dane" }
end

-- one process per queue directory: a second one stops here, saying which holds it
local q, _, why = queue.open { dir = opts.queue, hostname = hostname, route = function() return route end }
if not q then error(why, 0) end
q:start()

local srv = assert(server.new {
  listen = opts.listen or "127.0.0.1:25",
  hostname = hostname,
  dsn = true,
  plugins = { -- no relay guard: only this machine can connect
    server.plugins.limits(),
    server.plugins.received(),
    queue.plugin(q),
  },
})
for _, a in ipairs(srv:addresses()) do
  io.stderr:write(("null client listening on %s, relaying %s\n"):format(luasmtp.format_address(a.address, a.port),
    opts.smarthost and ("through " .. opts.smarthost) or "to MX hosts"))
end

return { stop = function() q:stop() end }
