-- `luasmtp send`: the sendmail-compatible command, run as a separate
-- process against aiosmtpd and the scripted server of spec/fake_smtp.lua.
local luasmtp = require "luasmtp"
local H = require "spec.helper"
local fake = require "spec.fake_smtp"
local postfix = require "spec.postfix"
local dovecot = require "spec.dovecot"
local server = require "luasmtp.server"
local credentials = require "luasmtp.credentials"

local shquote = H.shquote

local runs = 0

--- Run `luasmtp send ARGS` (inside a task) with input on stdin and env
-- (a table; LUASMTP_PASSWORD is unset unless given); wrap: a command
-- prefix (nsenter ...); piped: the input comes through a pipe (not
-- seekable) instead of from the file. -> status, stdout, stderr
local function send(args, input, env, wrap, piped)
  os.execute("mkdir -p " .. shquote(fake.TMP))
  runs = runs + 1
  local base = ("%s/send-%d-%d"):format(fake.TMP, math.floor(luasmtp.time()), runs)
  local f = assert(io.open(base .. ".in", "wb"))
  f:write(input or "")
  f:close()
  local vars = { "env -u LUASMTP_PASSWORD" }
  for k, v in pairs(env or {}) do vars[#vars + 1] = k .. "=" .. shquote(v) end
  local cmd = ("%s%s %s timeout 20 lua5.4 %s send %s %s > %s 2> %s; echo $? > %s"):format(
    piped and ("cat " .. shquote(base .. ".in") .. " | ") or "", wrap or "", table.concat(vars, " "),
    shquote(H.root .. "/bin/luasmtp"), args, piped and "" or ("< " .. shquote(base .. ".in")),
    shquote(base .. ".out"), shquote(base .. ".err"), shquote(base .. ".status"))
  fake.external("sh -c " .. shquote(cmd))
  -- the status file appears when the command is done (polling it is
  -- quicker than waiting for the process to be reaped)
  local deadline = luasmtp.update_now() + 25
  local status
  repeat
    luasmtp.sleep(0.02)
    local sf = io.open(base .. ".status")
    if sf then
      status = math.tointeger(tonumber(sf:read("a")))
      sf:close()
    end
  until status or luasmtp.update_now() > deadline
  assert(status, "luasmtp send did not finish")
  return status, H.readfile(base .. ".out"), H.readfile(base .. ".err")
end

local function cafile()
  return shquote(H.certs() .. "/ca.pem")
end

local function password_file(pw)
  os.execute("mkdir -p " .. shquote(fake.TMP))
  local path = fake.TMP .. "/password"
  local f = assert(io.open(path, "w"))
  f:write(pw, "\n")
  f:close()
  return shquote(path)
end

local MESSAGE = table.concat({
  "From: Alice <alice@client.test>",
  "To: Bob <bob@dest.test>, \"Carol, C.\" <carol@dest.test>",
  "Cc: team: dave@dest.test, (a comment) erin@dest.test;",
  "Bcc: hidden@dest.test,",
  "  other-hidden@dest.test",
  "Subject: acceptance",
  "",
  "Hello.",
  ".",
  "Still the body with -i.",
  "",
}, "\n")

describe("luasmtp send", function()
  after_each(function()
    fake.cleanup()
    postfix.cleanup()
    dovecot.cleanup()
    H.assert_no_leaks()
  end)

  it("delivers over STARTTLS with AUTH, recipients from the headers, Bcc removed", function()
    H.run(function()
      local port, log = fake.aiosmtpd("--tls starttls --user alice:pw0rd --auth-required")
      local status, _, err = send(("--server localhost:%d --tls starttls --cafile %s --user alice "
        .. "--password-file %s -t -i -f alice@client.test"):format(port, cafile(), password_file("pw0rd")), MESSAGE)
      assert.equal(0, status, err)
      local msgs = fake.messages(log)
      assert.equal(1, #msgs)
      local m = msgs[1]
      assert.equal("alice@client.test", m.from)
      assert.same({ "bob@dest.test", "carol@dest.test", "dave@dest.test", "erin@dest.test",
        "hidden@dest.test", "other-hidden@dest.test" }, m.to)
      assert.equal("alice", m.user)
      assert.is_true(m.tls)
      assert.is_nil(m.data:find("Bcc", 1, true))
      assert.is_nil(m.data:find("hidden", 1, true))
      assert.truthy(m.data:find("\r\n.\r\nStill the body with -i.\r\n", 1, true))
      assert.truthy(m.data:find("^From: Alice"))
    end, 20)
  end)

  it("delivers over implicit TLS with the password from the environment", function()
    H.run(function()
      local port, log = fake.aiosmtpd("--tls implicit --user bob:secret")
      local status, _, err = send(("--server localhost:%d --tls implicit --cafile %s --user bob bob@dest.test")
        :format(port, cafile()), "Subject: implicit\n\nhi\n", { LUASMTP_PASSWORD = "secret" })
      assert.equal(0, status, err)
      local msgs = fake.messages(log)
      assert.equal(1, #msgs)
      assert.equal("bob", msgs[1].user)
      assert.same({ "bob@dest.test" }, msgs[1].to)
      -- the envelope sender comes from the From: header when -f is not given
      status = send(("--server localhost:%d --tls implicit --cafile %s --user bob bob@dest.test")
        :format(port, cafile()), "From: Some One <one@client.test>\n\nhi\n", { LUASMTP_PASSWORD = "secret" })
      assert.equal(0, status)
      assert.equal("one@client.test", fake.messages(log)[2].from)
    end, 20)
  end)

  it("exits 69 on 5xx and 75 on 4xx, naming each refused recipient", function()
    H.run(function()
      local port, log = fake.aiosmtpd("")
      local base = ("--server 127.0.0.1:%d --tls none -f s@client.test "):format(port)
      local status, _, err = send(base .. "ok@dest.test reject-me@dest.test", "Subject: x\n\nx\n")
      assert.equal(69, status)
      assert.matches("<reject%-me@dest.test>: 550 5.1.1 No such user here", err)
      assert.is_nil(err:find("ok@dest.test", 1, true))
      assert.same({ "ok@dest.test" }, fake.messages(log)[1].to)
      status, _, err = send(base .. "busy@dest.test", "x\n")
      assert.equal(75, status)
      assert.matches("<busy@dest.test>: 450 4.2.1", err)
      status, _, err = send(base:gsub("s@client", "tempfail@client") .. "a@dest.test", "x\n")
      assert.equal(75, status)
      assert.matches("451 4.3.0 Try again later", err)
      status, _, err = send(base:gsub("s@client", "permfail@client") .. "a@dest.test", "x\n")
      assert.equal(69, status)
      assert.matches("554 5.6.0 Message refused", err)
    end, 30)
  end)

  it("exits 77 when the password is refused and masks it in the transcript", function()
    H.run(function()
      local port = fake.aiosmtpd("--tls starttls --user alice:right")
      local status, _, err = send(("-v --server localhost:%d --cafile %s --user alice a@dest.test")
        :format(port, cafile()), "x\n", { LUASMTP_PASSWORD = "wrong-secret" })
      assert.equal(77, status)
      assert.matches(">>> AUTH PLAIN <credentials hidden>", err, 1, true)
      assert.matches("<<< 535", err, 1, true)
      assert.is_nil(err:find("wrong-secret", 1, true))
      assert.is_nil(err:find(luasmtp.crypto.b64encode("\0alice\0wrong-secret"), 1, true))
    end, 20)
  end)

  it("exits 64 on usage errors and 65 on bad messages", function()
    H.run(function()
      assert.equal(64, (send("--bogus a@dest.test", "x\n")))
      assert.equal(64, (send("--server 127.0.0.1:1 --tls none", "x\n"))) -- no recipients
      assert.equal(64, (send("--user me --server 127.0.0.1:1 a@dest.test", "x\n"))) -- no password
      assert.equal(64, (send("--tls sometimes a@dest.test", "x\n")))
      local status, out = send("--help", "")
      assert.equal(0, status)
      assert.matches("usage: luasmtp send", out)
      local srv, port, log = fake.start {}
      local status2, _, err = send(("--server 127.0.0.1:%d --tls none -t"):format(port), "Subject: none\n\nx\n")
      assert.equal(65, status2)
      assert.matches("no recipients", err)
      status2 = send(("--server 127.0.0.1:%d --tls none -t"):format(port), "To: <a\1b@dest.test>\n\nx\n")
      assert.equal(65, status2)
      assert.is_nil(next(log.messages))
      srv:close()
    end, 20)
  end)

  it("ends the message at a lone dot without -i", function()
    H.run(function()
      local srv, port, log = fake.start {}
      local status = send(("--server 127.0.0.1:%d --tls none a@dest.test"):format(port),
        "Subject: dot\n\nbefore\n.\nafter\n")
      assert.equal(0, status)
      assert.matches("^Subject: dot\r\nDate: [^\r]+\r\nMessage%-ID: <[^>]+>\r\n\r\nbefore\r\n$",
        log.messages[1].body)
      srv:close()
    end, 20)
  end)

  -- A message of several input blocks (64 KiB) and more than the pipe
  -- buffer (256 KiB): lines starting with dots at the block edges, bare LF
  -- line ends, and a To: line in the body that -t must not read.
  local function long_message()
    local head = "From: Alice <alice@client.test>\nTo: bob@dest.test\nBcc: hidden@dest.test\nSubject: long\n\n"
    local parts, size = { "To: not-a-header@dest.test\n" }, 0
    local line = ("x"):rep(70) .. "\n"
    while size < 3 * 1024 * 1024 do
      parts[#parts + 1] = line
      size = size + #line
    end
    local body = table.concat(parts)
    -- a line starting with "." and one with ".." right at block edges
    local function put(at, s) body = body:sub(1, at - 1) .. s .. body:sub(at + #s) end
    for _, edge in ipairs { 65536, 2 * 65536 + 1, 17 * 65536 } do
      put(edge - 1, "\n.") -- a line starting at the last (first) octet of a block
    end
    put(5 * 65536 - 1, "\n..z") -- ".." split over the edge
    return head, body
  end

  local function expected_wire(s)
    return (s:gsub("\n", "\r\n"))
  end

  for _, piped in ipairs { false, true } do
    it(("streams a long message from a %s with -t, reading only the header block"):format(
      piped and "pipe" or "file"), function()
      H.run(function()
        local srv, port, log = fake.start {}
        local head, body = long_message()
        local status, _, err = send(("--server 127.0.0.1:%d --tls none -t"):format(port), head .. body, nil, nil,
          piped)
        assert.equal(0, status, err)
        local msg = log.messages[1]
        assert.same({ "bob@dest.test", "hidden@dest.test" }, msg.rcpts)
        local got_head, got_body = msg.body:match("^(.-\r\n\r\n)(.*)$")
        assert.matches("^From: Alice <alice@client.test>\r\nTo: bob@dest.test\r\nSubject: long\r\n"
          .. "Date: [^\r]+\r\nMessage%-ID: <[^>]+>\r\n\r\n$", got_head)
        assert.is_true(expected_wire(body) == got_body, "the body differs")
        local declared = math.tointeger(tonumber(msg.mail:match("SIZE=(%d+)")))
        if piped then
          assert.is_nil(declared) -- a long pipe: the size is not known
        else
          assert.is_true(declared >= #msg.body, msg.mail .. " " .. #msg.body)
        end
        srv:close()
      end, 30)
    end)
  end

  it("ends a piped message at a lone dot split over a block edge, without -i", function()
    H.run(function()
      local srv, port, log = fake.start {}
      local head = "Subject: edge\n\n"
      -- the dot as the last octet of the first block, and as the one before
      for _, case in ipairs { { ".\n", 65534 }, { ".\r\n", 65534 }, { ".\r\n", 65533 }, { ".\n", 65533 } } do
        local dot, n = case[1], case[2]
        local body = ("a"):rep(n) .. "\n" .. dot .. "after\n"
        local status, _, err = send(("--server 127.0.0.1:%d --tls none r@dest.test"):format(port), head .. body, nil,
          nil, true)
        assert.equal(0, status, err)
        local got = log.messages[#log.messages].body
        assert.equal("Subject: edge\r\n", got:sub(1, 15))
        assert.equal(("a"):rep(n) .. "\r\n", got:match("\r\n\r\n(.*)$"), n .. " " .. dot:gsub("\r", "CR"))
      end
      -- with -i the dot line is content (and goes stuffed, arrives as ".")
      local body = ("a"):rep(65533) .. "\n.\nafter\n"
      assert.equal(0, (send(("--server 127.0.0.1:%d --tls none -i r@dest.test"):format(port), head .. body, nil, nil,
        true)))
      assert.matches(("a"):rep(65533) .. "\r\n%.\r\nafter\r\n$", log.messages[#log.messages].body)
      srv:close()
    end, 30)
  end)

  it("exits 75 on network and TLS failures, 69 without STARTTLS, 76 on protocol errors", function()
    H.run(function()
      local closed = H.free_port()
      assert.equal(75, (send(("--server 127.0.0.1:%d --tls none a@dest.test"):format(closed), "x\n")))
      local srv, port = fake.start { tls = luasmtp.tls.context { mode = "server",
        certificate = H.certs() .. "/server.pem", key = H.certs() .. "/server.key" } }
      -- the test CA is not in the system store: verification fails
      local status, _, err = send(("--server localhost:%d a@dest.test"):format(port), "x\n")
      assert.equal(75, status)
      assert.matches("issuer", err)
      assert.equal(0, (send(("--server localhost:%d --insecure a@dest.test"):format(port), "x\n")))
      srv:close()
      srv, port = fake.start {}
      status, _, err = send(("--server 127.0.0.1:%d a@dest.test"):format(port), "x\n")
      assert.equal(69, status)
      assert.matches("STARTTLS", err)
      srv:close()
      srv, port = fake.start { greeting = "hello, I am not SMTP" }
      assert.equal(76, (send(("--server 127.0.0.1:%d --tls none a@dest.test"):format(port), "x\n")))
      srv:close()
    end, 30)
  end)

  it("takes -f '<>', -f '' and bracketed addresses, into Postfix's smtpd", function()
    H.run(function()
      local pf = postfix.start {}
      local base = ("--server 127.0.0.1:%d --tls none "):format(pf.port)
      local cases = {
        { "-f '<>' '<null1@dest.test>'", "", "null1@dest.test" },
        { "-f '' null2@dest.test", "", "null2@dest.test" },
        { "-f'<>' null3@dest.test", "", "null3@dest.test" },
        { "-r '<a@client.test>' '<b@dest.test>'", "a@client.test", "b@dest.test" },
        { "--from '<c@client.test>' d@dest.test", "c@client.test", "d@dest.test" },
      }
      for _, r in ipairs(cases) do
        local status, _, err = send(base .. r[1], "Subject: bounce\n\nauto-reply\n")
        assert.equal(0, status, r[1] .. ": " .. err)
      end
      -- one pair of brackets only: what is left is not an address
      local status, _, err = send(base .. "-f '<<x@client.test>>' e@dest.test", "x\n")
      assert.equal(65, status)
      assert.matches("angle brackets", err)
      assert.equal(65, (send(base .. "-f x@client.test '<>'", "x\n")))
      local queued = {}
      for _, m in ipairs(pf:queue("hold")) do queued[m.recipients[1]] = m end
      for _, r in ipairs(cases) do
        local m = queued[r[3]]
        assert.is_table(m, r[3] .. " is not in Postfix's queue: " .. pf:logtext())
        assert.equal(r[2], m.sender, r[1])
        assert.same({ r[3] }, m.recipients)
      end
      assert.matches("from=<> to=<null1@dest.test>", pf:logtext(), 1, true)
      pf:stop()
    end, 90)
  end)

  it("delivers with --lmtp --server /path into Dovecot's LMTP on a UNIX socket", function()
    H.run(function()
      local dc = dovecot.start { users = { "bob@example.test", "carol@example.test" } }
      local status, _, err = send(("--lmtp --server %s -f '<>' bob@example.test carol@example.test "
        .. "nobody@example.test"):format(H.shquote(dc.lmtp)), "Subject: over a UNIX socket\n\nhello dovecot\n")
      -- Dovecot refuses the unknown user; the other two get the message
      assert.equal(69, status, err .. dc:logtext())
      assert.matches("<nobody@example.test>: 550 5.1.1", err)
      for _, user in ipairs { "bob@example.test", "carol@example.test" } do
        local msgs = dc:maildir(user)
        assert.equal(1, #msgs, user .. ": " .. dc:logtext())
        assert.matches("^Return%-Path: <>\r?\n", msgs[1].data)
        assert.matches("Received: from localhost", msgs[1].data, 1, true) -- our LHLO name
        assert.matches("Subject: over a UNIX socket\r?\nDate: [^\r\n]+\r?\nMessage%-ID: <[^>]+>\r?\n\r?\nhello dovecot",
          msgs[1].data)
      end
      -- unix:/path says the same; a missing socket is a temporary failure
      status = send(("--lmtp --server unix:%s bob@example.test"):format(H.shquote(dc.lmtp)), "Subject: 2\n\nx\n")
      assert.equal(0, status)
      assert.equal(2, #dc:maildir("bob@example.test"))
      dc:stop()
      status, _, err = send(("--lmtp --server %s bob@example.test"):format(H.shquote(dc.lmtp)), "x\n")
      assert.equal(75, status)
      assert.matches("connect to " .. dc.lmtp:gsub("%p", "%%%0"), err)
    end, 60)
  end)

  it("after a 535 to SCRAM tries the next mechanism over TLS, within what was allowed", function()
    H.run(function()
      -- bob's entry is a crypt hash: it serves PLAIN only, while alice's
      -- plaintext entry makes the server offer SCRAM and CRAM-MD5 too
      local got = {}
      local srv = assert(server.new {
        listen = "127.0.0.1:0", hostname = "mx.test", tls = (H.tls_contexts()), submission = true,
        allow_plaintext_auth = true, auth_failure_delay = 0.01, logger = function() end,
        limits = { max_auth_failures = 10 },
        auth = { verifier = credentials.table { alice = "wonderland", bob = "{SHA512-CRYPT}"
          .. luasmtp.crypto.crypt("builder", luasmtp.crypto.crypt_gensalt("$6$")) } },
        hooks = { on_data = function(session) got[#got + 1] = session.user end },
      })
      local port = srv:addresses()[1].port
      local base = ("-v --server localhost:%d --cafile %s --user bob "):format(port, cafile())
      local status, _, err = send(base .. "a@dest.test", "Subject: x\n\nx\n", { LUASMTP_PASSWORD = "builder" })
      assert.equal(0, status, err)
      assert.same({ "bob" }, got)
      assert.matches("AUTH SCRAM-SHA-256-PLUS refused; trying the next mechanism", err, 1, true)
      assert.matches(">>> AUTH PLAIN <credentials hidden>\n<<< 235", err)
      -- a wrong password: each kind of check once (PLAIN, never LOGIN after it), then 77
      status, _, err = send(base .. "a@dest.test", "x\n", { LUASMTP_PASSWORD = "wrong" })
      assert.equal(77, status, err)
      assert.is_nil(err:find(">>> AUTH LOGIN", 1, true))
      assert.matches(">>> AUTH PLAIN <credentials hidden>\n<<< 535", err)
      assert.matches("luasmtp send: AUTH SCRAM%-SHA%-256%-PLUS: 535 .*; AUTH PLAIN: 535", err)
      -- never outside what the user allowed
      status, _, err = send(base .. "--auth SCRAM-SHA-256-PLUS a@dest.test", "x\n", { LUASMTP_PASSWORD = "builder" })
      assert.equal(77, status)
      assert.equal(1, select(2, err:gsub(">>> AUTH ", "")))
      -- and never without TLS: the first 535 is the answer
      status, _, err = send(("-v --server 127.0.0.1:%d --tls none --allow-plaintext-auth --user bob a@dest.test")
        :format(port), "x\n", { LUASMTP_PASSWORD = "builder" })
      assert.equal(77, status)
      assert.matches(">>> AUTH SCRAM%-SHA%-256 ", err)
      assert.equal(1, select(2, err:gsub(">>> AUTH ", "")))
      assert.equal(1, #got)
      srv:close()
    end, 60)
  end)

  it("with --tls auto uses the mode the port implies: STARTTLS on 587 and 25, TLS on 465 (Postfix)", function()
    H.run(function()
      local d = H.certs()
      local pf = postfix.start {
        smtpd = false, netns = true, listening = { 25, 465, 587 },
        main = { "smtpd_tls_cert_file = " .. d .. "/server.pem", "smtpd_tls_key_file = " .. d .. "/server.key",
          "smtpd_tls_security_level = may", "smtpd_tls_loglevel = 1" },
        services = { "127.0.0.1:587 inet n - n - - smtpd", "127.0.0.1:25 inet n - n - - smtpd",
          "127.0.0.1:465 inet n - n - - smtpd -o smtpd_tls_wrappermode=yes",
          "tlsmgr unix - - n 1000? 1 tlsmgr" },
      }
      local function count(text, what)
        return select(2, text:gsub(what:gsub("%p", "%%%0"), ""))
      end
      local seen = 0
      for _, case in ipairs { { 587, "starttls" }, { 25, "starttls" }, { 465, "implicit" } } do
        local port, mode = case[1], case[2]
        local status, _, err = send(("-v --tls auto --server localhost:%d --cafile %s -f a@client.test b@dest.test")
          :format(port, cafile()), "Subject: auto\n\nx\n", nil, pf.nsenter)
        assert.equal(0, status, err .. pf:logtext())
        -- one connection, in the implied mode from the start
        assert.equal(1, count(err, "--- connecting to "), err)
        if mode == "starttls" then
          assert.matches(">>> STARTTLS\n<<< 220", err)
          assert.matches("connecting to localhost port " .. port .. "\n", err)
        else
          assert.matches("connecting to localhost port 465 %(TLS%)", err)
          assert.is_nil(err:find("STARTTLS", 1, true))
        end
        seen = seen + 1
        local log = pf:logtext()
        assert.equal(seen, count(log, ": connect from localhost[127.0.0.1]"), log)
        assert.equal(seen, count(log, "Anonymous TLS connection established from localhost[127.0.0.1]"), log)
      end
      local log = pf:logtext()
      assert.equal(0, count(log, "improper command pipelining"), log)
      assert.equal(0, count(log, "non-SMTP command"), log)
      assert.equal(2, count(log, "starttls=1"), log)
      assert.equal(3, #pf:queue("hold"))
      pf:stop()
    end, 90)
  end)

  it("speaks LMTP with --lmtp", function()
    H.run(function()
      local srv, port, log = fake.start { lmtp = true, data = function(_, rcpt)
        if rcpt:find("^full") then return "452 4.2.2 Mailbox full" end
      end }
      local status, _, err = send(("--server 127.0.0.1:%d --tls none --lmtp --helo me.test a@dest.test "
        .. "full@dest.test"):format(port), "x\n")
      assert.equal(75, status)
      assert.matches("<full@dest.test>: 452 4.2.2 Mailbox full", err)
      assert.equal("LHLO me.test", log.commands[1])
      srv:close()
    end, 20)
  end)
end)
