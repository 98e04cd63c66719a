-- dev-server.lua: the `make run` demo. No setup needed: on first run it
-- creates var/ with a self-signed certificate, a users file with the demo
-- user, and Maildirs; then it runs
--   * a submission server on 127.0.0.1:5870 (STARTTLS, AUTH required),
--   * an MX for example.test on 127.0.0.1:2525 (no relaying),
-- and prints how to send a test message.
--
--   luasmtp serve examples/dev-server.lua [VARDIR [SUBMISSION_ADDR MX_ADDR]]
--
-- The addresses default to 127.0.0.1:5870 and 127.0.0.1:2525.
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local store = require "luasmtp.store"
local credentials = require "luasmtp.credentials"

local var, submission_addr, mx_addr = ...
var = var or "var"
submission_addr = submission_addr or "127.0.0.1:5870"
mx_addr = mx_addr or "127.0.0.1:2525"
local core = require "luasmtp.core"
assert(core.mkdir(var))

local cert, key = var .. "/dev-cert.pem", var .. "/dev-key.pem"
if not io.open(cert) then
  local cmd = ("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 "
    .. "-subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 "
    .. "-keyout '%s' -out '%s' 2>/dev/null"):format(key, cert)
  assert(os.execute(cmd), "could not create a self-signed certificate with openssl")
end
local users = var .. "/users.passwd"
if not io.open(users) then
  local f = assert(io.open(users, "w"))
  f:write("demo:", credentials.hash("demo", "SHA512-CRYPT"), "\n")
  f:close()
end

local tls = luasmtp.tls.context { mode = "server", certificate = cert, key = key }
local mail = store.maildir(var .. "/mail")
local function deliver(_, msg)
  local ok, reply = mail:deliver(msg)
  if not ok then return reply end
end

local submission = assert(server.new {
  listen = submission_addr,
  hostname = "localhost",
  tls = tls,
  submission = true,
  auth = { verifier = assert(credentials.passwd_file(users)) },
  hooks = { on_data = deliver },
})
local mx = assert(server.new {
  listen = mx_addr,
  hostname = "localhost",
  tls = tls,
  relay = { domains = { "example.test" }, authenticated = false },
  hooks = { on_data = deliver },
})
local _ = submission and mx

io.stderr:write(([[
luasmtp development server
  submission: %s (STARTTLS, AUTH PLAIN/LOGIN, user demo, password demo)
  MX:         %s (mail for example.test, no relaying)
  Maildir:    %s/mail/new
Send a test message:
  swaks --server %s --tls --tls-verify --tls-ca-path %s \
        --auth PLAIN --auth-user demo --auth-password demo \
        --from demo@example.test --to someone@example.test
Stop with Ctrl-C.
]]):format(submission_addr, mx_addr, var, submission_addr, cert))
