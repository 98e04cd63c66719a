local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local credentials = require "luasmtp.credentials"
local H = require "spec.helper"

-- Python smtplib as the client: login with a forced mechanism.
local function smtplib(port, mech, user, password, log)
  H.need("python3 smtplib TLS")
  local script = H.tmp .. "/smtplib_auth.py"
  local f = assert(io.open(script, "w"))
  f:write(([[
import smtplib, ssl, sys
port, mech, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=%q)
with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=5) as s:
    s.starttls(context=ctx)
    s.ehlo("client.test")
    s.user, s.password = user, password
    fn = {"PLAIN": s.auth_plain, "LOGIN": s.auth_login, "CRAM-MD5": s.auth_cram_md5}[mech]
    try:
        code, text = s.auth(mech, fn, initial_response_ok=(mech != "LOGIN"))
        print("auth", code)
        s.sendmail(user + "@x.test", ["b@mx.test"], "Subject: auth\r\n\r\nhi\r\n")
        print("sent")
    except smtplib.SMTPAuthenticationError as e:
        print("auth", e.smtp_code, e.smtp_error.decode())
]]):format(H.certs() .. "/ca.pem"))
  f:close()
  local pid = H.start(("exec timeout 10 %s %s %d %s %s %s"):format(H.python3, script, port, mech, user, password),
    log)
  assert.is_true(H.wait_pid(pid, 12))
  return H.readfile(log)
end

describe("AUTH in the SMTP server", function()
  after_each(H.assert_no_leaks)

  local function start(extra)
    local sctx = H.tls_contexts()
    local got = {}
    local opts = {
      listen = "127.0.0.1:0", hostname = "mx.test", tls = sctx, submission = true,
      auth_failure_delay = 0.01, logger = function() end,
      auth = { verifier = credentials.table { alice = "wonderland", bob = "{SHA512-CRYPT}"
        .. luasmtp.crypto.crypt("builder", luasmtp.crypto.crypt_gensalt("$6$")) } },
      hooks = { on_data = function(session, msg) got[#got + 1] = { user = session.user, data = msg:read() } end },
    }
    for k, v in pairs(extra or {}) do opts[k] = v end
    local srv = assert(server.new(opts))
    return srv, srv:addresses()[1].port, got
  end

  for _, mech in ipairs { "PLAIN", "LOGIN", "CRAM-MD5" } do
    it("accepts Python smtplib with " .. mech .. " after STARTTLS, and refuses a wrong password", function()
      H.run(function()
        local srv, port, got = start()
        local out = smtplib(port, mech, "alice", "wonderland", H.tmp .. "/smtplib-" .. mech .. ".log")
        assert.matches("auth 235", out)
        assert.matches("sent", out)
        assert.equal("alice", got[1].user)
        assert.matches("with ESMTPSA", got[1].data)
        out = smtplib(port, mech, "alice", "wrong", H.tmp .. "/smtplib-bad-" .. mech .. ".log")
        assert.matches("auth 535 5.7.8", out)
        out = smtplib(port, mech, "nobody", "wrong", H.tmp .. "/smtplib-nouser-" .. mech .. ".log")
        assert.matches("auth 535 5.7.8", out) -- same answer for unknown users
        srv:close()
      end, 30)
    end)
  end

  it("accepts swaks with AUTH PLAIN against a crypt(3) password", function()
    H.need("swaks TLS", "swaks AUTH")
    H.run(function()
      local srv, port, got = start()
      local log = H.tmp .. "/swaks-auth.log"
      local pid = H.start(("exec timeout 10 swaks --server 127.0.0.1 --port %d --tls --tls-verify "
        .. "--tls-ca-path %s/ca.pem --tls-sni localhost --auth PLAIN --auth-user bob --auth-password builder "
        .. "--from bob@x.test --to b@mx.test --helo client.test"):format(port, H.certs()), log)
      assert.is_true(H.wait_pid(pid, 12))
      srv:close()
      assert.matches("235 2.7.0", H.readfile(log))
      assert.equal("bob", got[1] and got[1].user, H.readfile(log))
    end, 20)
  end)

  it("offers no AUTH before TLS and refuses MAIL without it", function()
    H.run(function()
      local srv, port = start()
      local c = assert(luasmtp.connect("127.0.0.1", port, { timeout = 5 }))
      c:settimeout(5)
      c:receiveline()
      c:send("EHLO client.test\r\n")
      local ehlo = {}
      repeat
        local line = assert(c:receiveline())
        ehlo[#ehlo + 1] = line
      until line:sub(4, 4) == " "
      local text = table.concat(ehlo, "\n")
      assert.matches("STARTTLS", text)
      assert.not_matches("AUTH", text)
      c:send("AUTH PLAIN " .. luasmtp.crypto.b64encode("\0alice\0wonderland") .. "\r\n")
      assert.matches("^538 5%.7%.11", c:receiveline())
      c:send("MAIL FROM:<a@x.test>\r\n")
      assert.matches("^530 5%.7%.0", c:receiveline())
      c:close()
      srv:close()
    end)
  end)

  it("disconnects after too many failures", function()
    H.run(function()
      local srv, port = start { limits = { max_auth_failures = 2 } }
      local _, cctx = H.tls_contexts()
      local c = assert(luasmtp.connect("127.0.0.1", port, { timeout = 5 }))
      c:settimeout(5)
      c:receiveline()
      c:send("EHLO client.test\r\n")
      repeat local l = c:receiveline() until l:sub(4, 4) == " "
      c:send("STARTTLS\r\n")
      c:receiveline()
      assert(c:starttls(cctx, { servername = "localhost" }))
      c:send("EHLO client.test\r\n")
      repeat local l = c:receiveline() until l:sub(4, 4) == " "
      local bad = "AUTH PLAIN " .. luasmtp.crypto.b64encode("\0alice\0nope") .. "\r\n"
      c:send(bad)
      assert.matches("^535 5%.7%.8", c:receiveline())
      c:send(bad)
      assert.matches("^535 5%.7%.8", c:receiveline())
      assert.matches("^421", c:receiveline())
      c:close()
      srv:close()
    end)
  end)
end)
