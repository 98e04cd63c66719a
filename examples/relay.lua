-- relay.lua: a submission server (RFC 6409) that queues what it accepts
-- and relays it, to a smarthost or straight to the recipients' MX hosts
-- with DANE and MTA-STS. STARTTLS on --listen, implicit TLS on
-- --listen-tls; AUTH is required before MAIL and offered only over TLS;
-- users come from a Dovecot passwd-file. A message gets its 250 only
-- once it is in the queue; failures come back to the sender as delivery
-- status notifications.
--
--   luasmtp serve examples/relay.lua --listen 127.0.0.1:5870 --listen-tls 127.0.0.1:4650 \
--       --tls-cert cert.pem --tls-key key.pem --users users.passwd --queue var/queue \
--       [--smarthost HOST[:PORT] [--smarthost-tls starttls|implicit|none] [--smarthost-cafile FILE]
--        [--smarthost-user USER --smarthost-password-file FILE]]
--       [--tls-policy dane] [--mta-sts-cache DIR] [--dns-server ADDR[:PORT]] [--port PORT]
--       [--cafile FILE] [--mta-sts-port PORT] [--mta-sts-resolve HOST:PORT:ADDR[,...]]
--       [--hostname NAME]
--
-- --cafile: the CA certificates that MX hosts (PKIX: verify, MTA-STS)
-- and MTA-STS policy servers are verified with (default: the system's).
-- --mta-sts-port and --mta-sts-resolve (curl's HOST:PORT:ADDR) point the
-- policy fetches elsewhere than mta-sts.DOMAIN:443, for tests on
-- loopback.
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local credentials = require "luasmtp.credentials"
local getopt = require "luasmtp.getopt"
local queue = require "luasmtp.queue"

local usage = [=[
usage: relay.lua --listen ADDR:PORT | --listen-tls ADDR:PORT  --tls-cert FILE --tls-key FILE
                 --users FILE --queue DIR [--hostname NAME]
                 [--smarthost HOST[:PORT] [--smarthost-tls starttls|implicit|none]
                  [--smarthost-cafile FILE] [--smarthost-user USER --smarthost-password-file FILE]]
                 [--tls-policy LEVEL] [--mta-sts-cache DIR] [--dns-server ADDR[:PORT]]
                 [--port PORT (of the MX hosts, 25)] [--cafile FILE]
                 [--mta-sts-port PORT] [--mta-sts-resolve HOST:PORT:ADDR[,...]]
]=]
local opts = getopt.run(function(argv)
  local o = getopt.parse(argv, { listen = "string", ["listen-tls"] = "string", ["tls-cert"] = "string",
    ["tls-key"] = "string", users = "string", queue = "string", hostname = "string",
    smarthost = "string", ["smarthost-tls"] = "string", ["smarthost-cafile"] = "string",
    ["smarthost-user"] = "string",
    ["smarthost-password-file"] = "string", ["tls-policy"] = "string", ["mta-sts-cache"] = "string",
    ["dns-server"] = "string", port = "number", cafile = "string", ["mta-sts-port"] = "number",
    ["mta-sts-resolve"] = "string" })
  for _, k in ipairs { "tls-cert", "tls-key", "users", "queue" } do
    if not o[k] then error({ usage = true, message = "--" .. k .. " is required" }, 0) end
  end
  if not (o.listen or o["listen-tls"]) then
    error({ usage = true, message = "--listen or --listen-tls is required" }, 0)
  end
  if o["smarthost-user"] and not o["smarthost-password-file"] then
    error({ usage = true, message = "--smarthost-user needs --smarthost-password-file" }, 0)
  end
  return o
end, { ... }, usage)

local hostname = opts.hostname or "relay.localhost"
local tls = luasmtp.tls.context { mode = "server", certificate = opts["tls-cert"], key = opts["tls-key"] }
local users = assert(credentials.passwd_file(opts.users))

-- Where the queue sends mail: the smarthost when one is given, else
-- each recipient domain's MX hosts under the TLS policy (DANE by
-- default; MTA-STS when a cache directory is given).
local route
if opts.smarthost then
  local host, port = require("luasmtp.net").parse_address(opts.smarthost, 587)
  assert(host, "bad --smarthost: " .. opts.smarthost)
  local auth
  if opts["smarthost-user"] then
    local f = assert(io.open(opts["smarthost-password-file"], "r"))
    local password = f:read("l")
    f:close()
    assert(password and password ~= "", "the smarthost password file is empty")
    auth = { user = opts["smarthost-user"], password = password }
  end
  route = { kind = "smarthost", host = host, port = port, tls = opts["smarthost-tls"] or "starttls",
            cafile = opts["smarthost-cafile"], auth = auth }
else
  local dns = require "luasmtp.dns"
  if opts["dns-server"] then
    local host, port = require("luasmtp.net").parse_address(opts["dns-server"], 53)
    assert(host, "bad --dns-server: " .. opts["dns-server"])
    dns.configure { servers = { (host:find(":", 1, true) and ("[" .. host .. "]") or host) .. ":" .. port },
                    trust_ad = true }
  end
  local mtasts
  if opts["mta-sts-cache"] then
    local resolve
    if opts["mta-sts-resolve"] then
      resolve = {}
      for item in opts["mta-sts-resolve"]:gmatch("[^,]+") do resolve[#resolve + 1] = item end
    end
    mtasts = require("luasmtp.delivery.mtasts").new { cache_dir = opts["mta-sts-cache"], dns_query = dns.query,
      cafile = opts.cafile, port = opts["mta-sts-port"] and math.tointeger(opts["mta-sts-port"]),
      resolve = resolve }
  end
  route = { kind = "mx", tls_policy = opts["tls-policy"] or "dane", dns = dns, mtasts = mtasts,
            port = opts.port and math.tointeger(opts.port), cafile = opts.cafile }
end

-- one process per queue directory: a second one stops here, saying which holds it
local q, _, why = queue.open { dir = opts.queue, hostname = hostname, route = function() return route end }
if not q then error(why, 0) end
q:start()

local listen = {}
if opts.listen then listen[#listen + 1] = opts.listen end
if opts["listen-tls"] then listen[#listen + 1] = { address = opts["listen-tls"], tls = "implicit" } end

local srv = assert(server.new {
  listen = listen,
  hostname = hostname,
  tls = tls,
  auth = { verifier = users },
  dsn = true, -- the queue honours NOTIFY, RET, ENVID and ORCPT
  plugins = {
    server.plugins.submission(), -- MAIL needs AUTH
    server.plugins.limits(),
    server.plugins.received(),
    queue.plugin(q), -- deliver phase: the 250 once the message is in the queue
  },
})
for _, a in ipairs(srv:addresses()) do
  io.stderr:write(("relay listening on %s, relaying %s\n"):format(luasmtp.format_address(a.address, a.port),
    opts.smarthost and ("through " .. opts.smarthost) or "to MX hosts"))
end

-- SIGTERM: deliveries in flight finish, the rest stays queued
return { stop = function() q:stop() end }
