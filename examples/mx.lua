-- mx.lua: an inbound MX. Accepts mail for the listed domains into a
-- Maildir, refuses to relay anywhere else (554 5.7.1) unless the client
-- is in one of the relay networks, and offers STARTTLS when given a
-- certificate. The policy is a plugin chain: the built-in limits and
-- HTTP rejection, the relay guard, the Received header, a plugin of its
-- own (each of its calls has a deadline of 5 s) and the Maildir.
--
-- With --mailauth it checks SPF, DKIM and DMARC (luasmtp.mailauth) and
-- adds an Authentication-Results field; --dmarc-reject (implies
-- --mailauth) refuses DMARC failures whose policy asks for reject
-- (550 5.7.1) and tags the other failures with an X-DMARC field;
-- --dmarc-reports DIR records the aggregate report data there;
-- --dns ADDR:PORT picks the resolver.
--
--   luasmtp serve examples/mx.lua --listen 127.0.0.1:2525 \
--       --domains a.example,b.example --maildir var/mx \
--       [--relay-nets 127.0.0.0/8,::1/128] [--tls-cert F --tls-key F] [--hostname NAME]
--       [--mailauth] [--dmarc-reject] [--dmarc-reports DIR] [--dns ADDR:PORT]
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local getopt = require "luasmtp.getopt"

local usage = [[
usage: mx.lua --listen ADDR:PORT --domains D1,D2 --maildir DIR
              [--relay-nets CIDR,...] [--tls-cert FILE --tls-key FILE] [--hostname NAME]
              [--mailauth] [--dmarc-reject] [--dmarc-reports DIR] [--dns ADDR:PORT]
]]
local opts = getopt.run(function(argv)
  local o = getopt.parse(argv, { listen = "string", domains = "list", maildir = "string",
    ["relay-nets"] = "list", ["tls-cert"] = "string", ["tls-key"] = "string", hostname = "string",
    mailauth = "flag", ["dmarc-reject"] = "flag", ["dmarc-reports"] = "string", dns = "string" })
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

local hostname = opts.hostname or "mx.localhost"

-- Mail authentication: the mailauth plugin's results, and a policy on them.
local auth = {}
if opts.dns then
  assert(require("luasmtp.dns").configure { servers = { opts.dns } })
end
if opts.mailauth or opts["dmarc-reject"] or opts["dmarc-reports"] then
  local mailauth = require "luasmtp.mailauth.plugin"
  local reporter = opts["dmarc-reports"] and require("luasmtp.mailauth.dmarc").new { dir = opts["dmarc-reports"] }
  auth[1] = mailauth { authserv_id = hostname, reporter = reporter }
end
if opts["dmarc-reject"] then
  auth[2] = {
    name = "dmarc-policy",
    message = function(session, message)
      local v = session.auth_results.dmarc
      if v.result ~= "fail" then return end
      if v.disposition == "reject" then
        return server.reply(550, "5.7.1", "rejected by the DMARC policy of " .. v.from_domain)
      end
      message.header:prepend("X-DMARC", ("fail policy=%s disposition=%s"):format(v.policy, v.disposition))
    end,
  }
end

local chain = {
  plugins.limits(),
  plugins.http(),
  plugins.relay { domains = opts.domains, networks = opts["relay-nets"] or {}, authenticated = false },
}
for _, p in ipairs(auth) do chain[#chain + 1] = p end -- before Received: DKIM sees the fields as sent
for _, p in ipairs { plugins.received(), hygiene, plugins.maildir(opts.maildir) } do chain[#chain + 1] = p end

local srv = assert(server.new {
  listen = opts.listen,
  hostname = hostname,
  tls = tls,
  plugins = chain,
})
for _, a in ipairs(srv:addresses()) do
  io.stderr:write(("mx listening on %s for %s\n"):format(luasmtp.format_address(a.address, a.port),
    table.concat(opts.domains, ",")))
end
