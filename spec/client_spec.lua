local luasmtp = require "luasmtp"
local client = require "luasmtp.client"
local H = require "spec.helper"
local fake = require "spec.fake_smtp"

local shquote = H.shquote

local TMP = H.tmp .. "/client"
local aiosmtpd, messages_in = fake.aiosmtpd, fake.messages

local function cafile()
  return H.certs() .. "/ca.pem"
end

local function transcript_into(list)
  return function(direction, line) list[#list + 1] = direction .. ": " .. line end
end

-- A fake server over TLS contexts of the test PKI (cert: which key pair).
local function server_ctx(cert)
  local d = H.certs()
  cert = cert or "server"
  return luasmtp.tls.context { mode = "server", certificate = d .. "/" .. cert .. ".pem",
    key = d .. "/" .. cert .. ".key" }
end

local function find(list, pattern)
  for i, v in ipairs(list) do
    if v:find(pattern) then return i, v end
  end
  return nil
end

describe("SMTP client", function()
  after_each(function()
    fake.cleanup()
    H.assert_no_leaks()
  end)

  describe("against aiosmtpd", function()
    it("sends over STARTTLS with AUTH to 3 recipients, one refused, and says which", function()
      H.run(function()
        local port, log, pid = aiosmtpd("--tls starttls --user alice:s3cret --auth-required")
        local lines = {}
        local conn, _, err = client.connect { host = "localhost", port = port, tls = "starttls",
          cafile = cafile(), auth = { user = "alice", password = "s3cret" }, transcript = transcript_into(lines) }
        assert(conn, tostring(err))
        assert.is_true(conn.tls)
        assert.equal("alice", conn.authenticated)
        assert.truthy(conn:has("AUTH"))
        assert.equal("localhost", conn:tlsinfo().peer.common_name)
        local res
        res, _, err = conn:send {
          from = "sender@client.test",
          to = { "one@dest.test", "reject-two@dest.test", "three@dest.test" },
          body = "Subject: three\n\n.leading dot\nbare LF\rbare CR\r\nend",
        }
        assert(res, tostring(err))
        assert.is_false(res.ok)
        assert.same({ "one@dest.test", "three@dest.test" }, res.accepted)
        assert.same({ "reject-two@dest.test" }, res.rejected)
        local refused = res:recipient("reject-two@dest.test")
        assert.equal(550, refused.reply.code)
        assert.equal("5.1.1", refused.reply.enhanced)
        assert.is_true(refused.permanent)
        assert.equal(250, res:recipient("one@dest.test").reply.code)
        assert.equal(250, res.reply.code)
        conn:close()
        local msgs = messages_in(log)
        assert.equal(1, #msgs)
        assert.same({ "one@dest.test", "three@dest.test" }, msgs[1].to)
        assert.equal("alice", msgs[1].user)
        assert.is_true(msgs[1].tls)
        assert.equal("Subject: three\r\n\r\n.leading dot\r\nbare LF\r\nbare CR\r\nend\r\n", msgs[1].data)
        -- the transcript shows the exchange without the credentials
        assert.truthy(find(lines, "^C: STARTTLS$"))
        assert.truthy(find(lines, "^C: AUTH PLAIN <credentials hidden>$"))
        assert.is_nil(find(lines, "s3cret"))
        assert.is_nil(find(lines, luasmtp.crypto.b64encode("\0alice\0s3cret")))
        assert.truthy(find(lines, "^C: QUIT$"))
        H.kill(pid)
      end, 20)
    end)

    it("sends over implicit TLS with the one-shot function", function()
      H.run(function()
        local port, log, pid = aiosmtpd("--tls implicit --user bob:pw")
        local res, token, err = client.send {
          server = "localhost:" .. port, tls = "implicit", cafile = cafile(),
          auth = { user = "bob", password = "pw" },
          from = "bob@client.test", to = "rcpt@dest.test", body = "Subject: implicit\r\n\r\nhi\r\n",
        }
        assert(res, tostring(err))
        assert.is_true(res.ok)
        assert.is_nil(token)
        local msgs = messages_in(log)
        assert.equal(1, #msgs)
        assert.equal("bob", msgs[1].user)
        H.kill(pid)
      end, 20)
    end)

    it("verifies the certificate by default (the system store does not know the test CA)", function()
      H.run(function()
        local port, _, pid = aiosmtpd("--tls implicit")
        local conn, token, err = client.connect { host = "localhost", port = port, tls = "implicit" }
        assert.is_nil(conn)
        assert.equal("tls", token)
        assert.matches("issuer", err.message)
        assert.is_false(err.permanent)
        -- verification can be turned off explicitly
        conn = assert(client.connect { host = "localhost", port = port, tls = "implicit", insecure = true })
        assert.is_false(conn:tlsinfo().verified)
        conn:close()
        H.kill(pid)
      end, 20)
    end)

    it("returns 4xx and 5xx replies after the data as values", function()
      H.run(function()
        local port, _, pid = aiosmtpd("")
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        local res, token, err = conn:send { from = "tempfail@x.test", to = "a@dest.test", body = "x\r\n" }
        assert.is_nil(res)
        assert.equal("smtp", token)
        assert.equal(451, err.code)
        assert.equal("4.3.0", err.enhanced)
        assert.is_false(err.permanent)
        assert.equal("end", err.stage)
        assert.equal("end of data", err.command)
        assert.matches("^end of data: 451 4.3.0 Try again later", tostring(err))
        assert.is_false(err.result.recipients[1].ok)
        -- the session is still usable: the next message goes through
        res, _, err = conn:send { from = "permfail@x.test", to = "a@dest.test", body = "x\r\n" }
        assert.is_nil(res)
        assert.equal(554, err.code)
        assert.is_true(err.permanent)
        res = assert(conn:send { from = "fine@x.test", to = "a@dest.test", body = "x\r\n" })
        assert.is_true(res.ok)
        conn:close()
        H.kill(pid)
      end, 20)
    end)

    it("refuses PLAIN over plaintext unless allowed", function()
      H.run(function()
        local srv, port, log = fake.start { ext = { "AUTH PLAIN LOGIN" } }
        local conn, token, err = client.connect { host = "127.0.0.1", port = port, tls = "none",
          auth = { user = "u", password = "p" } }
        assert.is_nil(conn)
        assert.equal("auth", token)
        assert.matches("no TLS", err.message)
        assert.is_nil(find(log.commands, "^AUTH"))
        conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none",
          auth = { user = "u", password = "p", allow_plaintext = true } })
        assert.equal("PLAIN", conn.auth_mechanism)
        conn:close()
        srv:close()
      end)
    end)

    it("reports a refused password as an auth error", function()
      H.run(function()
        local port, _, pid = aiosmtpd("--tls starttls --user alice:right")
        local conn, token, err = client.connect { host = "localhost", port = port, cafile = cafile(),
          auth = { user = "alice", password = "wrong" } }
        assert.is_nil(conn)
        assert.equal("auth", token)
        assert.equal(535, err.code)
        assert.is_true(err.permanent)
        H.kill(pid)
      end, 20)
    end)
  end)

  describe("against the project's server engine", function()
    it("authenticates with SCRAM-SHA-256-PLUS and splits by its RCPTMAX, over BDAT", function()
      H.run(function()
        local server = require "luasmtp.server"
        local credentials = require "luasmtp.credentials"
        local got = {}
        local srv = assert(server.new {
          listen = { "127.0.0.1:0" }, hostname = "mx.test", tls = server_ctx(),
          auth = { verifier = credentials.table { alice = "{PLAIN}pw" } },
          limits = { max_recipients = 2 },
          logger = function() end,
          hooks = { on_data = function(_, message) got[#got + 1] = message end },
        })
        local conn = assert(client.connect { host = "localhost", port = srv:addresses()[1].port, cafile = cafile(),
          auth = { user = "alice", password = "pw" } })
        assert.equal("SCRAM-SHA-256-PLUS", conn.auth_mechanism)
        assert.equal(2, conn.limits.RCPTMAX)
        local res = assert(conn:send { from = "alice@x.test", chunking = true,
          to = { "a@y.test", "b@y.test", "c@y.test" }, body = "Subject: engine\n\n.dot\n" })
        assert.is_true(res.ok)
        assert.equal(2, res.transactions)
        conn:close()
        assert.equal(2, #got)
        assert.same({ "c@y.test" }, got[2].rcpt)
        assert.matches("\r\nSubject: engine\r\n\r\n%.dot\r\n$", got[1]:read())
        srv:close()
      end)
    end)

    it("speaks LMTP over a UNIX socket with path =, plaintext unless asked, from a pool too", function()
      H.run(function()
        local server = require "luasmtp.server"
        local p = H.sockpath("client-lmtp.sock")
        local got = {}
        local srv = assert(server.new {
          listen = "unix:" .. p, hostname = "mx.test", lmtp = true, tls = server_ctx(), logger = function() end,
          hooks = { on_data = function(_, message)
            got[#got + 1] = message
            if message.rcpt[2] then return server.per_recipient { [message.rcpt[2]] = server.tempfail("full") } end
          end },
        })
        local lines = {}
        local conn = assert(client.connect { path = p, lmtp = true, transcript = transcript_into(lines) })
        assert.equal("none", conn.tls_mode)
        assert.is_false(conn.tls) -- STARTTLS is offered, and not needed on a local socket
        assert.equal("C: LHLO localhost", lines[find(lines, "^C: LHLO")])
        local res = assert(conn:send { from = "", to = { "a@y.test", "b@y.test" }, body = "Subject: u\r\n\r\nx\r\n" })
        assert.same({ "a@y.test" }, res.accepted)
        assert.equal(451, res:recipient("b@y.test").reply.code)
        conn:close()
        -- TLS when asked for: the certificate is checked against servername
        conn = assert(client.connect { path = p, lmtp = true, tls = "starttls", servername = "localhost",
          cafile = cafile() })
        assert.is_true(conn.tls)
        conn:close()
        assert.has_error(function() client.connect { path = p, tls = "starttls" } end)
        local pool <close> = client.pool { path = p, lmtp = true }
        assert((pool:send { from = "a@x.test", to = "c@y.test", body = "x\r\n" }))
        assert.equal(2, #got)
        assert.equal("", got[1].from)
        srv:close()
        -- nobody listens any more: refused, naming the path
        local none, token, err = client.connect { path = p, lmtp = true }
        assert.is_nil(none)
        assert.equal("refused", token)
        assert.matches("connect to " .. p:gsub("%p", "%%%0") .. ": ", tostring(err))
      end)
    end)
  end)

  describe("against Postfix smtp-sink", function()
    local sink = "/usr/sbin/smtp-sink"
    local function start_sink(args)
      H.need("smtp-sink")
      local port = H.free_port()
      local user = io.popen("id -u"):read("l") == "0" and "-u nobody " or ""
      local pid = fake.external(("exec timeout 60 %s %s%s 127.0.0.1:%d 64"):format(sink, user, args or "", port))
      H.wait_port(port)
      return port, pid
    end

    it("keeps up with many messages over one pipelined session", function()
      H.run(function()
        local port, pid = start_sink("")
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        assert.truthy(conn:has("PIPELINING"))
        local t0 = luasmtp.update_now()
        local n = 500
        for i = 1, n do
          local res, _, err = conn:send { from = "s@x.test", to = { "a@y.test", "b@y.test" },
            body = ("Subject: %d\r\n\r\n%s\r\n"):format(i, ("x"):rep(1000)) }
          assert(res and res.ok, tostring(err))
        end
        local rate = n / (luasmtp.update_now() - t0)
        conn:close()
        print(("\n  smtp-sink: %d messages over one session, %.0f messages/s"):format(n, rate))
        assert.is_true(rate > 100)
        H.kill(pid)
      end, 30)
    end)

    it("reports its soft and hard rejections per recipient and per command", function()
      H.run(function()
        local port, pid = start_sink("-r RCPT")
        local res, token, err = client.send { host = "127.0.0.1", port = port, tls = "none",
          from = "s@x.test", to = { "a@y.test", "b@y.test" }, body = "x\r\n" }
        assert.is_nil(res)
        assert.equal("smtp", token)
        assert.is_false(err.permanent)
        assert.equal(450, err.result.recipients[2].reply.code)
        H.kill(pid)
        port, pid = start_sink("-f MAIL")
        res, token, err = client.send { host = "127.0.0.1", port = port, tls = "none",
          from = "s@x.test", to = "a@y.test", body = "x\r\n" }
        assert.is_nil(res)
        assert.equal("smtp", token)
        assert.equal(500, err.code)
        assert.equal("mail", err.stage)
        assert.is_true(err.permanent)
        H.kill(pid)
        port, pid = start_sink("-Q DATA")
        res, token, err = client.send { host = "127.0.0.1", port = port, tls = "none",
          from = "s@x.test", to = "a@y.test", body = "x\r\n" }
        assert.is_nil(res)
        assert.equal("smtp", token)
        assert.equal(421, err.code)
        H.kill(pid)
      end, 30)
    end)

    it("speaks LMTP to smtp-sink -L", function()
      H.run(function()
        local port, pid = start_sink("-L")
        local res, _, err = client.send { host = "127.0.0.1", port = port, tls = "none", lmtp = true,
          from = "s@x.test", to = { "a@y.test", "b@y.test" }, body = "x\r\n" }
        assert(res, tostring(err))
        assert.is_true(res.ok)
        assert.equal(2, #res.replies)
        H.kill(pid)
      end, 20)
    end)
  end)

  describe("against a scripted server", function()
    it("pipelines MAIL, RCPT and DATA in one group and reports partial failure", function()
      H.run(function()
        local srv, port, log = fake.start {
          rcpt = function(addr) if addr:find("^bad") then return "550 5.1.1 unknown user" end end,
        }
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        local res = assert(conn:send { from = "a@x.test", to = { "b@y.test", "bad@y.test", "c@y.test" },
          body = "hello\r\n" })
        local mail = find(log.commands, "^MAIL")
        assert.equal("RCPT TO:<b@y.test>", log.commands[mail + 1])
        assert.equal("DATA", log.commands[mail + 4])
        -- the whole group was waiting when MAIL was read
        assert.is_true(log.buffered[mail] >= #"RCPT TO:<b@y.test>\r\n" * 3 + #"DATA\r\n")
        assert.same({ "b@y.test", "c@y.test" }, res.accepted)
        assert.same({ "bad@y.test" }, res.rejected)
        assert.equal(550, res.recipients[2].reply.code)
        assert.equal(550, res.recipients[2].rcpt_reply.code)
        assert.same({ "b@y.test", "c@y.test" }, log.messages[1].rcpts)
        conn:close()
        srv:close()
      end)
    end)

    it("waits for each reply when the server does not pipeline", function()
      H.run(function()
        local srv, port, log = fake.start { ext = { "8BITMIME" } }
        local res = assert(client.send { host = "127.0.0.1", port = port, tls = "none",
          from = "a@x.test", to = { "b@y.test", "c@y.test" }, body = "hello\r\n" })
        assert.is_true(res.ok)
        for i, cmd in ipairs(log.commands) do
          if cmd:find("^MAIL") or cmd:find("^RCPT") then assert.equal(0, log.buffered[i]) end
        end
        srv:close()
      end)
    end)

    it("splits the envelope by LIMITS RCPTMAX, with RSET between transactions", function()
      H.run(function()
        local srv, port, log = fake.start { ext = { "PIPELINING", "LIMITS RCPTMAX=2 MAILMAX=10" } }
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        assert.equal(2, conn.limits.RCPTMAX)
        local to = { "r1@y.test", "r2@y.test", "r3@y.test", "r4@y.test", "r5@y.test" }
        local res = assert(conn:send { from = "a@x.test", to = to, body = "x\r\n" })
        assert.is_true(res.ok)
        assert.equal(3, res.transactions)
        assert.equal(3, #log.messages)
        assert.same({ "r5@y.test" }, log.messages[3].rcpts)
        local rsets = 0
        for _, c in ipairs(log.commands) do if c == "RSET" then rsets = rsets + 1 end end
        assert.equal(2, rsets)
        conn:close()
        srv:close()
      end)
    end)

    it("sends the recipients refused with 452 too many recipients in another transaction", function()
      H.run(function()
        local srv, port, log = fake.start {
          rcpt = function(_, _, state)
            if #state.rcpts >= 2 then return "452 4.5.3 Too many recipients" end
          end,
        }
        local body_calls = 0
        local chunks = { "Subject: fn\r\n\r\n", "part one\r\n", "part two\r\n" }
        local res = assert(client.send { host = "127.0.0.1", port = port, tls = "none",
          from = "a@x.test", to = { "r1@y.test", "r2@y.test", "r3@y.test", "r4@y.test", "r5@y.test" },
          body = function()
            body_calls = body_calls + 1
            return chunks[body_calls]
          end })
        assert.is_true(res.ok)
        assert.equal(3, res.transactions)
        assert.equal(3, #log.messages)
        for _, m in ipairs(log.messages) do
          assert.equal("Subject: fn\r\n\r\npart one\r\npart two\r\n", m.body)
        end
        assert.equal(4, body_calls) -- read once, replayed from memory
        srv:close()
      end)
    end)

    it("checks SIZE before sending anything", function()
      H.run(function()
        local srv, port, log = fake.start { ext = { "PIPELINING", "SIZE 100" } }
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        assert.equal(100, conn.max_size)
        local res, token, err = conn:send { from = "a@x.test", to = "b@y.test", body = ("x"):rep(200) }
        assert.is_nil(res)
        assert.equal("size", token)
        assert.is_true(err.permanent)
        assert.is_nil(find(log.commands, "^MAIL"))
        assert(conn:send { from = "a@x.test", to = "b@y.test", body = "small\r\n" })
        assert.matches("SIZE=7", log.commands[find(log.commands, "^MAIL")])
        conn:close()
        srv:close()
      end)
    end)

    it("fails cleanly without SMTPUTF8 or 8BITMIME, and sends anyway when forced", function()
      H.run(function()
        local srv, port, log = fake.start { ext = { "PIPELINING" } }
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        local res, token, err = conn:send { from = "a@x.test", to = "jörg@y.test", body = "x\r\n" }
        assert.is_nil(res)
        assert.equal("unsupported", token)
        assert.equal("SMTPUTF8", err.extension)
        res, token, err = conn:send { from = "a@x.test", to = "b@y.test", body = "caf\xc3\xa9\r\n" }
        assert.is_nil(res)
        assert.equal("unsupported", token)
        assert.equal("8BITMIME", err.extension)
        assert.is_nil(find(log.commands, "^MAIL"))
        res = assert(conn:send { from = "a@x.test", to = "b@y.test", body = "caf\xc3\xa9\r\n", force = true })
        assert.is_true(res.ok)
        conn:close()
        srv:close()
        srv, port, log = fake.start {}
        res = assert(client.send { host = "127.0.0.1", port = port, tls = "none",
          from = "a@x.test", to = "jörg@y.test", body = "caf\xc3\xa9\r\n" })
        assert.is_true(res.ok)
        assert.equal("MAIL FROM:<a@x.test> SIZE=7 BODY=8BITMIME SMTPUTF8", log.commands[find(log.commands, "^MAIL")])
        srv:close()
      end)
    end)

    it("sends a MAIL parameter once when mail_params repeats one it sets itself", function()
      H.run(function()
        local srv, port, log = fake.start {}
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        assert(conn:send { from = "j\u{fc}rgen@x.test", to = "b@y.test", body = "gr\u{fc}\u{df}e\r\n",
          mail_params = { SMTPUTF8 = true, BODY = "8BITMIME", ["X-TAG"] = "1" } })
        assert.equal("MAIL FROM:<j\u{fc}rgen@x.test> SIZE=9 BODY=8BITMIME SMTPUTF8 X-TAG=1",
          log.commands[find(log.commands, "^MAIL")])
        local res, token, err = conn:send { from = "a@x.test", to = "b@y.test", body = "8bit \u{fc}\r\n",
          mail_params = { BODY = "7BIT" } }
        assert.is_nil(res)
        assert.equal("invalid", token)
        assert.matches("BODY=7BIT contradicts BODY=8BITMIME", tostring(err))
        conn:close()
        srv:close()
      end)
    end)

    it("asks for REQUIRETLS only where it is offered over TLS", function()
      H.run(function()
        local srv, port, log = fake.start { tls = server_ctx(), ext_tls = { "REQUIRETLS" } }
        local res, _, err = client.send { host = "127.0.0.1", port = port, tls = "opportunistic",
          from = "a@x.test", to = "b@y.test", body = "x\r\n", requiretls = true }
        assert(res, tostring(err))
        assert.matches(" REQUIRETLS$", log.commands[find(log.commands, "^MAIL")])
        local token
        res, token, err = client.send { host = "127.0.0.1", port = port, tls = "none",
          from = "a@x.test", to = "b@y.test", body = "x\r\n", requiretls = true }
        assert.is_nil(res)
        assert.equal("unsupported", token)
        assert.equal("REQUIRETLS", err.extension)
        srv:close()
      end)
    end)

    it("sends DSN parameters as xtext", function()
      H.run(function()
        local srv, port, log = fake.start {}
        local res = assert(client.send { host = "127.0.0.1", port = port, tls = "none",
          from = "a@x.test", body = "x\r\n",
          to = { "b@y.test", { address = "c@y.test", notify = "never", orcpt = "rfc822;c+tag=1@y.test" } },
          dsn = { ret = "hdrs", envid = "id+1 = x", notify = { "success", "failure" } } })
        assert.is_true(res.ok)
        local mail = log.commands[find(log.commands, "^MAIL")]
        assert.matches("RET=HDRS ENVID=id%+2B1%+20%+3D%+20x$", mail)
        assert.equal("RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE", log.commands[find(log.commands, "^RCPT")])
        assert.equal("RCPT TO:<c@y.test> NOTIFY=NEVER ORCPT=rfc822;c+2Btag+3D1@y.test",
          log.commands[find(log.commands, "^RCPT TO:<c")])
        srv:close()
      end)
    end)

    it("refuses CR, LF and control characters in addresses and parameters before sending", function()
      H.run(function()
        local srv, port, log = fake.start {}
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        local bad = {
          { from = "a@x.test\r\nRCPT TO:<evil@x.test>", to = "b@y.test" },
          { from = "a@x.test", to = "b@y.test\nDATA" },
          { from = "a@x.test", to = { "ok@y.test", "b\0@y.test" } },
          { from = "a@x.test", to = "b@y.test> NOTIFY=NEVER" },
          { from = "a@x.test", to = "b@y.test", mail_params = { ["X-A"] = "1 2" } },
          { from = "a@x.test", to = "b@y.test", dsn = { envid = "a\r\nb" } },
          { from = "a@x.test", to = { { address = "b@y.test", orcpt = "rfc822;x\r\n@y" } } },
          { from = "a@x.test", to = {} },
        }
        for _, msg in ipairs(bad) do
          msg.body = "x\r\n"
          local res, token, err = conn:send(msg)
          assert.is_nil(res)
          assert.equal("invalid", token)
          assert.is_true(err.permanent)
        end
        assert.is_nil(find(log.commands, "^MAIL"))
        assert(conn:send { from = "", to = "b@y.test", body = "bounce\r\n" }) -- the null sender
        assert.equal("MAIL FROM:<> SIZE=8", log.commands[find(log.commands, "^MAIL")])
        assert.has_error(function() conn:send { from = 1, to = "b@y.test", body = "x" } end)
        conn:close()
        srv:close()
      end)
    end)

    it("takes bodies from strings, files and functions, dot-stuffed with CRLF", function()
      H.run(function()
        local srv, port, log = fake.start {}
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        local path = TMP .. "/body.txt"
        os.execute("mkdir -p " .. shquote(TMP))
        local f = assert(io.open(path, "wb"))
        f:write("From file\n.\n..two\r\nlast line without end")
        f:close()
        f = assert(io.open(path, "rb"))
        assert(conn:send { from = "a@x.test", to = "b@y.test", body = f })
        f:close()
        assert.equal("From file\r\n.\r\n..two\r\nlast line without end\r\n", log.messages[1].body)
        local parts = { "split CR\r", "\nhere\n", ".", "dot\r\n" }
        local i = 0
        assert(conn:send { from = "a@x.test", to = "b@y.test", body = function()
          i = i + 1
          return parts[i]
        end })
        assert.equal("split CR\r\nhere\r\n.dot\r\n", log.messages[2].body)
        -- a big one crosses many reads and writes
        local big = {}
        for n = 1, 20000 do big[n] = (n % 7 == 0 and "." or "") .. "line " .. n end
        assert(conn:send { from = "a@x.test", to = "b@y.test", body = table.concat(big, "\n") })
        assert.equal(table.concat(big, "\r\n") .. "\r\n", log.messages[3].body)
        conn:close()
        srv:close()
      end)
    end)

    it("never ends the data when the body function fails", function()
      H.run(function()
        local srv, port, log = fake.start {}
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        local calls = 0
        local res, token, err = conn:send { from = "a@x.test", to = "b@y.test", body = function()
          calls = calls + 1
          if calls == 1 then return "partial\r\n" end
          return nil, "disk read error"
        end }
        assert.is_nil(res)
        assert.equal("io", token)
        assert.matches("disk read error", err.message)
        assert.equal(0, #log.messages)
        assert.equal(conn.broken, err)
        srv:close()
      end)
    end)

    it("sends binary bodies with BDAT and BINARYMIME", function()
      H.run(function()
        local srv, port, log = fake.start { ext = { "PIPELINING", "CHUNKING", "BINARYMIME", "8BITMIME" } }
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        local blob = {}
        for n = 1, 300000 do blob[n] = string.char(n % 256) end
        blob = table.concat(blob)
        local res = assert(conn:send { from = "a@x.test", to = { "b@y.test", "c@y.test" }, body = blob })
        assert.is_true(res.ok)
        assert.equal(blob, log.messages[1].body)
        assert.matches("BODY=BINARYMIME", log.messages[1].mail)
        assert.is_true(log.sessions[1].bdat_chunks >= 2)
        assert.is_nil(find(log.commands, "^DATA"))
        conn:close()
        srv:close()
        -- without BINARYMIME the binary message is refused before MAIL
        srv, port, log = fake.start { ext = { "PIPELINING", "CHUNKING" } }
        local _, token, err = client.send { host = "127.0.0.1", port = port, tls = "none",
          from = "a@x.test", to = "b@y.test", body = "a\0b" }
        assert.equal("unsupported", token)
        assert.equal("BINARYMIME", err.extension)
        assert.is_nil(find(log.commands, "^MAIL"))
        srv:close()
      end)
    end)

    it("uses BDAT for text when asked: CRLF normalised, no dot-stuffing", function()
      H.run(function()
        local srv, port, log = fake.start { ext = { "CHUNKING" } }
        local res = assert(client.send { host = "127.0.0.1", port = port, tls = "none", chunking = true,
          from = "a@x.test", to = "b@y.test", body = ".dot\nline\r" })
        assert.is_true(res.ok)
        assert.equal(".dot\r\nline\r\n", log.messages[1].body)
        assert.truthy(find(log.commands, "^BDAT %d+ LAST$"))
        srv:close()
      end)
    end)

    it("speaks LMTP: LHLO and one reply per recipient after the data", function()
      H.run(function()
        local srv, port, log = fake.start { lmtp = true,
          data = function(_, rcpt)
            if rcpt:find("^full") then return "452 4.2.2 mailbox full" end
          end }
        local res = assert(client.send { host = "127.0.0.1", port = port, tls = "none", lmtp = true,
          from = "a@x.test", to = { "b@y.test", "full@y.test", "c@y.test" }, body = "x\r\n" })
        assert.truthy(find(log.commands, "^LHLO "))
        assert.same({ "b@y.test", "c@y.test" }, res.accepted)
        assert.same({ "full@y.test" }, res.rejected)
        assert.equal(452, res:recipient("full@y.test").reply.code)
        assert.is_false(res:recipient("full@y.test").permanent)
        assert.equal(3, #res.replies)
        srv:close()
        -- the same over BDAT
        srv, port, log = fake.start { lmtp = true, ext = { "PIPELINING", "CHUNKING" },
          data = function(_, rcpt)
            if rcpt:find("^full") then return "552 5.2.2 over quota" end
          end }
        res = assert(client.send { host = "127.0.0.1", port = port, tls = "none", lmtp = true, chunking = true,
          from = "a@x.test", to = { "full@y.test", "b@y.test" }, body = "x\n" })
        assert.truthy(find(log.commands, "^BDAT 3 LAST$"))
        assert.same({ "b@y.test" }, res.accepted)
        assert.is_true(res:recipient("full@y.test").permanent)
        srv:close()
      end)
    end)

    it("falls back to HELO when EHLO is refused", function()
      H.run(function()
        local srv, port, log = fake.start { ehlo = "502 5.5.1 no ESMTP here" }
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "opportunistic",
          helo = "client.test" })
        assert.is_false(conn.esmtp)
        assert.equal("EHLO client.test", log.commands[1])
        assert.equal("HELO client.test", log.commands[2])
        assert(conn:send { from = "a@x.test", to = "b@y.test", body = "x\r\n" })
        conn:close()
        -- required STARTTLS cannot be had without EHLO
        local c2, token = client.connect { host = "127.0.0.1", port = port }
        assert.is_nil(c2)
        assert.equal("unsupported", token)
        srv:close()
      end)
    end)

    it("sends several messages over one session and QUIT on close", function()
      H.run(function()
        local srv, port, log = fake.start {}
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        for i = 1, 3 do
          assert(conn:send { from = "a@x.test", to = "b@y.test", body = "n" .. i .. "\r\n" })
        end
        assert.equal(250, conn:noop().code)
        assert.equal(250, conn:rset().code)
        conn:close()
        conn:close() -- idempotent
        assert.equal(3, #log.messages)
        assert.equal(1, log.connections)
        assert.equal("QUIT", log.commands[#log.commands])
        local _, token = conn:noop()
        assert.equal("closed", token)
        srv:close()
      end)
    end)

    it("works over a socket connected beforehand", function()
      H.run(function()
        local srv, port, log = fake.start {}
        local sock = assert(luasmtp.connect("127.0.0.1", port, { timeout = 5 }))
        local conn = assert(client.connect { sock = sock, tls = "none", helo = "me.test" })
        assert(conn:send { from = "a@x.test", to = "b@y.test", body = "x\r\n" })
        conn:close()
        assert.equal("EHLO me.test", log.commands[1])
        srv:close()
      end)
    end)

    it("breaks the session on a 421 and answers every later call with it", function()
      H.run(function()
        local srv, port = fake.start {
          rcpt = function(addr) if addr:find("^late") then return "421 4.7.0 shutting down" end end,
          on = { DATA = function() return "close" end },
        }
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        local res, token, err = conn:send { from = "a@x.test", to = { "b@y.test", "late@y.test" }, body = "x\r\n" }
        assert.is_nil(res)
        assert.equal("smtp", token)
        assert.equal(421, err.code)
        assert.is_false(err.permanent)
        local t0 = luasmtp.update_now()
        local r2, token2, err2 = conn:noop()
        assert.is_nil(r2)
        assert.equal("smtp", token2)
        assert.equal(err, err2)
        assert.is_true(luasmtp.update_now() - t0 < 0.1)
        conn:close()
        srv:close()
      end)
    end)

    it("times out per phase and stays broken afterwards", function()
      H.run(function()
        local srv, port = fake.start { on = { MAIL = function()
          luasmtp.sleep(1) -- no reply: the client gives up first
          return "close"
        end } }
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none",
          timeouts = { command = 0.3 } })
        local t0 = luasmtp.update_now()
        local res, token, err = conn:send { from = "a@x.test", to = "b@y.test", body = "x\r\n" }
        local took = luasmtp.update_now() - t0
        assert.is_nil(res)
        assert.equal("timeout", token)
        assert.matches("timed out waiting for the reply to MAIL FROM:<a@x.test>", err.message)
        assert.is_true(took >= 0.29 and took < 1.5)
        t0 = luasmtp.update_now()
        local _, token2, err2 = conn:send { from = "a@x.test", to = "b@y.test", body = "x\r\n" }
        assert.equal("timeout", token2)
        assert.equal(err, err2)
        assert.is_true(luasmtp.update_now() - t0 < 0.1)
        conn:close()
        srv:close()
        -- a server that never greets
        srv, port = fake.start { greeting = false, idle = 2 }
        t0 = luasmtp.update_now()
        local c2, token3 = client.connect { host = "127.0.0.1", port = port, tls = "none",
          timeouts = { greeting = 0.3 } }
        assert.is_nil(c2)
        assert.equal("timeout", token3)
        assert.is_true(luasmtp.update_now() - t0 < 1.5)
        srv:close()
      end)
    end)

    it("breaks the session on a malformed reply", function()
      H.run(function()
        local srv, port = fake.start { on = { MAIL = function(_, sock)
          sock:send("250-ok\r\n354 mixed codes\r\n")
          return "close"
        end } }
        local conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "none" })
        local res, token, err = conn:send { from = "a@x.test", to = "b@y.test", body = "x\r\n" }
        assert.is_nil(res)
        assert.equal("protocol", token)
        assert.matches("malformed reply", err.message)
        local _, token2 = conn:noop()
        assert.equal("protocol", token2)
        conn:close()
        srv:close()
      end)
    end)

    it("refuses replies injected before the STARTTLS handshake", function()
      H.run(function()
        local srv, port, log = fake.start { tls = server_ctx(), on = { STARTTLS = function(_, sock)
          sock:send("220 go\r\n250 injected\r\n") -- in one write, as an attacker would
          sock:receiveline(100, 3)
          return "close"
        end } }
        local conn, token, err = client.connect { host = "localhost", port = port, cafile = cafile() }
        assert.is_nil(conn)
        assert.equal("tls", token)
        assert.matches("before the TLS handshake", err.message)
        assert.equal("starttls", err.stage)
        assert.is_nil(find(log.commands, "^MAIL"))
        -- the opportunistic mode does not fall back to plaintext either
        conn, token = client.connect { host = "localhost", port = port, tls = "opportunistic" }
        assert.is_nil(conn)
        assert.equal("tls", token)
        assert.is_nil(find(log.commands, "^MAIL"))
        srv:close()
      end)
    end)

    it("requires STARTTLS when asked, and verifies the certificate", function()
      H.run(function()
        -- not offered: refused, nothing sent in plaintext
        local srv, port, log = fake.start {}
        local conn, token, err = client.connect { host = "localhost", port = port, tls = "starttls" }
        assert.is_nil(conn)
        assert.equal("unsupported", token)
        assert.equal("STARTTLS", err.extension)
        assert.is_nil(find(log.commands, "^MAIL"))
        assert.equal("QUIT", log.commands[#log.commands])
        srv:close()
        -- offered with certificates that do not verify
        for cert, pattern in pairs { wronghost = "hostname mismatch", untrusted = "issuer", expired = "expired" } do
          srv, port = fake.start { tls = server_ctx(cert) }
          conn, token, err = client.connect { host = "localhost", port = port, cafile = cafile() }
          assert.is_nil(conn)
          assert.equal("tls", token)
          assert.matches(pattern, err.message)
          srv:close()
        end
        -- opportunistic: used without verification; insecure: the same for required
        srv, port = fake.start { tls = server_ctx("untrusted") }
        conn = assert(client.connect { host = "localhost", port = port, tls = "opportunistic" })
        assert.is_true(conn.tls)
        assert.is_false(conn:tlsinfo().verified)
        conn:close()
        conn = assert(client.connect { host = "localhost", port = port, insecure = true })
        assert.is_true(conn.tls)
        conn:close()
        srv:close()
        -- opportunistic without STARTTLS: plaintext
        srv, port = fake.start {}
        conn = assert(client.connect { host = "127.0.0.1", port = port, tls = "opportunistic" })
        assert.is_false(conn.tls)
        conn:close()
        srv:close()
      end)
    end)

    it("forgets the capabilities of before STARTTLS", function()
      H.run(function()
        local srv, port = fake.start { tls = server_ctx(), ext = { "PIPELINING" }, ext_tls = { "AUTH PLAIN" } }
        local conn = assert(client.connect { host = "localhost", port = port, cafile = cafile(),
          auth = { user = "u", password = "p" } })
        assert.is_nil(conn:has("STARTTLS"))
        assert.same({ "PLAIN" }, conn:has("AUTH"))
        conn:close()
        srv:close()
      end)
    end)

    it("tries implicit TLS first, then STARTTLS, never plaintext", function()
      H.run(function()
        -- the implicit port is closed: STARTTLS on the other port
        local closed = H.free_port()
        local srv, port = fake.start { tls = server_ctx() }
        local conn = assert(client.connect { host = "localhost", tls = "auto", implicit_port = closed,
          starttls_port = port, cafile = cafile() })
        assert.equal("starttls", conn.tls_mode)
        assert.is_true(conn.tls)
        conn:close()
        -- the same port speaks plaintext SMTP: the handshake fails, STARTTLS there works
        conn = assert(client.connect { host = "localhost", port = port, tls = "auto", cafile = cafile(),
          timeouts = { connect = 2 } })
        assert.equal("starttls", conn.tls_mode)
        conn:close()
        srv:close()
        -- implicit works: used
        local isrv, iport = fake.start { implicit = server_ctx() }
        conn = assert(client.connect { host = "localhost", port = iport, tls = "auto", cafile = cafile() })
        assert.equal("implicit", conn.tls_mode)
        conn:close()
        isrv:close()
        -- no TLS anywhere: no session
        srv, port = fake.start {}
        local c2, token = client.connect { host = "localhost", port = port, tls = "auto", cafile = cafile(),
          timeouts = { connect = 2 } }
        assert.is_nil(c2)
        assert.equal("unsupported", token)
        srv:close()
      end, 15)
    end)

    it("reuses sessions from a pool, caps them and recovers from closed idle ones", function()
      H.run(function()
        local srv, port, log = fake.start { idle = 0.3 }
        local pool = client.pool { host = "127.0.0.1", port = port, tls = "none", max_messages = 2,
          max_connections = 2 }
        for i = 1, 3 do
          local res, _, err = pool:send { from = "a@x.test", to = "b@y.test", body = "m" .. i .. "\r\n" }
          assert(res, tostring(err))
        end
        assert.equal(2, log.connections) -- 2 messages on the first, then a new one
        -- the server drops the idle session: the next send reconnects
        luasmtp.sleep(0.5)
        local res, _, err = pool:send { from = "a@x.test", to = "b@y.test", body = "after idle\r\n" }
        assert(res, tostring(err))
        assert.equal(3, log.connections)
        assert.equal(4, #log.messages)
        -- concurrent senders share at most max_connections sessions
        local tasks = {}
        for i = 1, 6 do
          tasks[i] = luasmtp.spawn(function()
            return pool:send { from = "a@x.test", to = "b@y.test", body = "c" .. i .. "\r\n" }
          end)
        end
        for _, t in ipairs(tasks) do
          local ok, r = t:join(5)
          assert.is_true(ok)
          assert.is_true(r.ok)
        end
        assert.equal(10, #log.messages)
        assert.is_true(log.connections <= 3 + 2 * 3)
        local st = pool:stats()
        assert.equal(0, st.busy)
        assert.is_true(st.idle <= 2)
        pool:close()
        srv:close()
      end, 15)
    end)

    it("raises on programming errors", function()
      assert.has_error(function() client.connect() end)
      assert.has_error(function() client.connect { host = "x", tls = "sometimes" } end)
      assert.has_error(function() client.connect { host = "x", timeouts = { never = 1 } } end)
      assert.has_error(function() client.connect { host = "x", helo = "bad name\r\n" } end)
    end)
  end)
end)
