-- submission.lua: a message submission server (RFC 6409), port-587 style
-- with STARTTLS, or port-465 style with --implicit-tls. AUTH is required
-- before MAIL and is offered only over TLS; users come from a Dovecot
-- passwd-file ("user:{SCHEME}secret", e.g. made with `doveadm pw`);
-- accepted messages go to a Maildir.
--
--   luasmtp serve examples/submission.lua --listen 127.0.0.1:5870 \
--       --tls-cert cert.pem --tls-key key.pem --users users.passwd \
--       --maildir var/submission [--implicit-tls]
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local credentials = require "luasmtp.credentials"
local getopt = require "luasmtp.getopt"

local usage = [[
usage: submission.lua --listen ADDR:PORT --tls-cert FILE --tls-key FILE
                      --users FILE --maildir DIR [--implicit-tls] [--hostname NAME]
]]
local opts = getopt.run(function(argv)
  local o = getopt.parse(argv, { listen = "string", ["tls-cert"] = "string", ["tls-key"] = "string",
    users = "string", maildir = "string", ["implicit-tls"] = "flag", hostname = "string" })
  for _, k in ipairs { "listen", "tls-cert", "tls-key", "users", "maildir" } do
    if not o[k] then error({ usage = true, message = "--" .. k .. " is required" }, 0) end
  end
  return o
end, { ... }, usage)

local tls = luasmtp.tls.context { mode = "server", certificate = opts["tls-cert"], key = opts["tls-key"] }
local users = assert(credentials.passwd_file(opts.users))

local srv = assert(server.new {
  listen = { { address = opts.listen, tls = opts["implicit-tls"] and "implicit" or nil } },
  hostname = opts.hostname or "submission.localhost",
  tls = tls,
  auth = { verifier = users },
  plugins = {
    server.plugins.submission(), -- MAIL needs AUTH
    server.plugins.limits(),
    server.plugins.received(),
    server.plugins.maildir(opts.maildir),
  },
})
for _, a in ipairs(srv:addresses()) do
  io.stderr:write(("submission listening on %s (%s)\n"):format(luasmtp.format_address(a.address, a.port),
    opts["implicit-tls"] and "implicit TLS" or "STARTTLS"))
end
