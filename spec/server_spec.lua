local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local H = require "spec.helper"
local postfix = require "spec.postfix"

-- Start a server on 127.0.0.1:0 with opts merged over quiet defaults.
local start = H.smtp_server

local raw = H.smtp

local function collect_messages()
  local messages = {}
  return messages, function(session, msg)
    messages[#messages + 1] = { data = msg:read(), from = msg.from, rcpt = msg.rcpt, session = session }
  end
end

describe("SMTP server", function()
  after_each(function()
    H.close_servers() -- a failed assertion leaves no server behind
    postfix.cleanup()
    H.assert_no_leaks()
  end)

  it("runs a whole transaction and prepends a Received header", function()
    H.run(function()
      local messages, on_data = collect_messages()
      local srv, port = start { hooks = { on_data = on_data } }
      local c = raw(port)
      local code, greeting = c.reply()
      assert.equal("220", code)
      assert.matches("^220 mx%.test ESMTP", greeting)
      assert.not_matches("luasmtp", greeting) -- no software version
      local ecode, ehlo = c.cmd("EHLO client.test")
      assert.equal("250", ecode)
      for _, ext in ipairs { "PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE", "CHUNKING",
        "ENHANCEDSTATUSCODES", "LIMITS RCPTMAX=" } do
        assert.truthy(ehlo:find("\n250[- ]" .. ext:gsub("%p", "%%%0")), ext)
      end
      assert.not_matches("DSN", ehlo) -- nothing here sends notices
      assert.not_matches("STARTTLS", ehlo) -- no TLS configured
      assert.not_matches("AUTH", ehlo)
      assert.equal("250", (c.cmd("MAIL FROM:<alice@client.test>")))
      assert.equal("250", (c.cmd("RCPT TO:<bob@mx.test>")))
      assert.equal("354", (c.cmd("DATA")))
      local dcode, dtext = c.cmd("Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.")
      assert.equal("250", dcode)
      assert.matches("2.0.0", dtext, 1, true)
      assert.equal("221", (c.cmd("QUIT")))
      c.close()
      srv:close()
      assert.equal(1, #messages)
      local m = messages[1]
      assert.equal("alice@client.test", m.from)
      assert.same({ "bob@mx.test" }, m.rcpt)
      assert.matches("^Received: from client%.test %(%[127%.0%.0%.1%]%)", m.data)
      assert.matches("\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n$", m.data)
    end)
  end)

  it("answers a pipelined group in order, in one segment", function()
    H.run(function()
      local srv, port = start {}
      local c = raw(port)
      c.reply()
      c.cmd("EHLO client.test")
      c.sock:send("MAIL FROM:<a@client.test>\r\nRCPT TO:<b@mx.test>\r\nRCPT TO:<c@mx.test>\r\nDATA\r\n")
      luasmtp.sleep(0.05)
      local chunk = c.sock:receiveany(4096)
      local codes = {}
      for code in chunk:gmatch("(%d%d%d) [^\r]*\r\n") do codes[#codes + 1] = code end
      assert.same({ "250", "250", "250", "354" }, codes)
      c.sock:send("x\r\n.\r\nQUIT\r\n")
      assert.equal("250", (c.reply()))
      assert.equal("221", (c.reply()))
      c.close()
      srv:close()
    end)
  end)

  for name, payload in pairs {
    ["LF.LF"] = "a\n.\nMAIL FROM:<evil@x>\r\n",
    ["CR.CR"] = "a\r.\rMAIL FROM:<evil@x>\r\n",
    ["CRLF.LF"] = "a\r\n.\nMAIL FROM:<evil@x>\r\n",
    ["LF.CRLF"] = "a\n.\r\nMAIL FROM:<evil@x>\r\n",
  } do
    it("is immune to SMTP smuggling with " .. name, function()
      H.run(function()
        local messages, on_data = collect_messages()
        local srv, port = start { hooks = { on_data = on_data } }
        local c = raw(port)
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@client.test>")
        c.cmd("RCPT TO:<b@mx.test>")
        assert.equal("354", (c.cmd("DATA")))
        -- the smuggled end must not end the message; the real end does
        c.sock:send(payload .. "more\r\n.\r\n")
        local code, text = c.reply()
        assert.equal("554", code)
        assert.matches("5.6.11", text, 1, true)
        assert.equal(0, #messages)
        assert.equal("250", (c.cmd("NOOP"))) -- nothing smuggled in between
        c.close()
        srv:close()
      end)
    end)
  end

  it("normalises bare line endings when told to", function()
    H.run(function()
      local messages, on_data = collect_messages()
      local srv, port = start { bare_newlines = "normalise", received_header = false,
        hooks = { on_data = on_data } }
      local c = raw(port)
      c.reply()
      c.cmd("EHLO client.test")
      c.cmd("MAIL FROM:<a@client.test>")
      c.cmd("RCPT TO:<b@mx.test>")
      c.cmd("DATA")
      assert.equal("250", (c.cmd("one\ntwo\r\n.")))
      assert.equal("one\r\ntwo\r\n", messages[1].data)
      c.close()
      srv:close()
    end)
  end)

  it("refuses bare LF in commands, long lines, and too many errors", function()
    H.run(function()
      local srv, port = start { limits = { max_invalid_commands = 3 } }
      local c = raw(port)
      c.reply()
      c.sock:send("NOOP\nNOOP\r\n")
      assert.equal("500", (c.reply()))
      assert.equal("500", (c.cmd(string.rep("A", 600))))
      assert.equal("500", (c.cmd("BOGUS")))
      local code, text = c.reply()
      assert.equal("421", code)
      assert.matches("Too many errors", text)
      assert.same({ nil, "closed" }, { c.sock:receiveline() })
      c.close()
      srv:close()
    end)
  end)

  it("limits recipients and message size", function()
    H.run(function()
      local srv, port = start { limits = { max_recipients = 2, max_message_size = 100 } }
      local c = raw(port)
      c.reply()
      c.cmd("EHLO client.test")
      assert.equal("552", (c.cmd("MAIL FROM:<a@client.test> SIZE=1000")))
      assert.equal("250", (c.cmd("MAIL FROM:<a@client.test> SIZE=50")))
      assert.equal("250", (c.cmd("RCPT TO:<b1@mx.test>")))
      assert.equal("250", (c.cmd("RCPT TO:<b2@mx.test>")))
      assert.equal("452", (c.cmd("RCPT TO:<b3@mx.test>")))
      c.cmd("DATA")
      assert.equal("552", (c.cmd(string.rep("x", 300) .. "\r\n.")))
      assert.equal("250", (c.cmd("NOOP")))
      c.close()
      srv:close()
    end)
  end)

  it("spools large messages in the spool directory, leaving no file behind", function()
    H.run(function()
      local seen
      local dir = H.tmpdir("spool")
      local srv, port = start { spool_threshold = 1000, spool_dir = dir, received_header = false, hooks = {
        on_data = function(_, msg)
          local pieces = {}
          for piece in msg:chunks(4096) do pieces[#pieces + 1] = piece end
          local ls = io.popen("ls -A " .. dir)
          seen = { spooled = msg:spooled(), size = msg:size(), data = table.concat(pieces), whole = msg:read(),
            files = ls:read("a") }
          ls:close()
        end,
      } }
      local c = raw(port)
      c.reply()
      c.cmd("EHLO client.test")
      c.cmd("MAIL FROM:<a@x.test>")
      c.cmd("RCPT TO:<b@mx.test>")
      c.cmd("DATA")
      local body = string.rep("0123456789abcdef\r\n", 10000)
      assert.equal("250", (c.cmd(body .. ".")))
      assert.is_true(seen.spooled)
      assert.equal(#body, seen.size)
      assert.equal(body, seen.data)
      assert.equal(body, seen.whole)
      -- the spool file is unlinked once open: a crash leaves nothing
      assert.equal("", seen.files)
      c.close()
      srv:close()
    end)
  end)

  it("limits the connection rate per address", function()
    H.run(function()
      local srv, port = start { limits = { connection_rate_per_ip = 3 } }
      for _ = 1, 3 do
        local c = raw(port)
        assert.equal("220", (c.reply()))
        c.close()
      end
      local c = raw(port)
      assert.equal("421", (c.reply()))
      c.close()
      srv:close()
    end)
  end)

  it("refuses text lines over the limit and logs session events with the session id", function()
    H.run(function()
      local log = {}
      local srv, port = start { limits = { text_line_length = 100 },
        logger = function(level, msg) log[#log + 1] = level .. " " .. msg end }
      local c = raw(port)
      c.reply()
      c.cmd("EHLO client.test")
      c.cmd("MAIL FROM:<a@x.test>")
      c.cmd("RCPT TO:<b@mx.test>")
      c.cmd("DATA")
      local code, text = c.cmd(string.rep("y", 200) .. "\r\n.")
      assert.equal("554", code)
      assert.matches("5.6.0", text, 1, true)
      c.cmd("QUIT")
      c.close()
      srv:close()
      local all = table.concat(log, "\n")
      assert.matches("info %[%d+%] connect from 127%.0%.0%.1", all)
      assert.matches("info %[%d+%] mail from=<a@x%.test> accepted", all)
      assert.matches("info %[%d+%] rcpt to=<b@mx%.test> accepted", all)
      assert.matches("info %[%d+%] message refused: line longer than 100", all)
      assert.matches("info %[%d+%] disconnect", all)
    end)
  end)

  it("applies per-address limits to the PROXY-reported client", function()
    H.run(function()
      local srv, port = start { proxy = { trusted = { "127.0.0.0/8" } },
        limits = { max_connections_per_ip = 1 } }
      local function via_proxy(src)
        local c = raw(port)
        c.sock:send(("PROXY TCP4 %s 192.0.2.1 40000 25\r\n"):format(src))
        return c
      end
      local a = via_proxy("198.51.100.1")
      assert.equal("220", (a.reply()))
      local b = via_proxy("198.51.100.2") -- another client behind the same proxy
      assert.equal("220", (b.reply()))
      local a2 = via_proxy("198.51.100.1")
      assert.equal("421", (a2.reply()))
      a.close() b.close() a2.close()
      srv:close()
    end)
  end)

  it("accepts real-world HELO names unless told to be strict", function()
    H.run(function()
      local srv, port = start {}
      local c = raw(port)
      c.reply()
      assert.equal("250", (c.cmd("EHLO DESKTOP_1A2B")))
      c.close()
      local srv2, port2 = start { strict_helo = true }
      c = raw(port2)
      c.reply()
      assert.equal("501", (c.cmd("EHLO DESKTOP_1A2B")))
      assert.equal("250", (c.cmd("EHLO [127.0.0.1]")))
      c.close()
      srv:close()
      srv2:close()
    end)
  end)

  it("answers 421 past the global connection limit", function()
    H.run(function()
      local srv, port = start { limits = { max_connections = 1 } }
      local a = raw(port)
      assert.equal("220", (a.reply()))
      local b = raw(port)
      assert.equal("421", (b.reply()))
      a.close() b.close()
      srv:close()
    end)
  end)

  it("times out idle clients with 421", function()
    H.run(function()
      local srv, port = start { timeouts = { command = 0.1 } }
      local c = raw(port)
      c.reply()
      local code = c.reply()
      assert.equal("421", code)
      c.close()
      srv:close()
    end)
  end)

  it("rejects HTTP requests and early talkers", function()
    H.run(function()
      local srv, port = start { timeouts = { greeting = 0.1 } }
      local c = raw(port)
      c.sock:send("EHLO too.early\r\n")
      assert.equal("554", (c.reply()))
      c.close()
      local c2 = raw(port)
      c2.reply()
      assert.equal("554", (c2.cmd("GET / HTTP/1.1")))
      c2.close()
      srv:close()
    end)
  end)

  it("answers VRFY with 252 and disables EXPN", function()
    H.run(function()
      local srv, port = start {}
      local c = raw(port)
      c.reply()
      c.cmd("EHLO client.test")
      assert.equal("252", (c.cmd("VRFY root")))
      assert.equal("502", (c.cmd("EXPN staff")))
      assert.equal("214", (c.cmd("HELP")))
      assert.equal("503", (c.cmd("RCPT TO:<a@b>")))
      assert.equal("503", (c.cmd("DATA")))
      c.close()
      srv:close()
    end)
  end)

  it("turns hook errors into 451 and keeps serving", function()
    H.run(function()
      local srv, port = start { hooks = {
        on_mail = function(_, from) if from == "boom@x.test" then error("hook exploded") end end,
      } }
      local c = raw(port)
      c.reply()
      c.cmd("EHLO client.test")
      local code, text = c.cmd("MAIL FROM:<boom@x.test>")
      assert.equal("451", code)
      assert.matches("4.3.0", text, 1, true)
      assert.equal("250", (c.cmd("MAIL FROM:<fine@x.test>")))
      c.close()
      srv:close()
    end)
  end)

  it("never lets hook text inject protocol", function()
    H.run(function()
      local srv, port = start { hooks = {
        on_rcpt = function() return server.reply(550, "5.1.1", "no such user\r\n250 fake success") end,
      } }
      local c = raw(port)
      c.reply()
      c.cmd("EHLO client.test")
      c.cmd("MAIL FROM:<a@x.test>")
      local code, text = c.cmd("RCPT TO:<nobody@mx.test>")
      assert.equal("550", code)
      for line in text:gmatch("[^\n]+") do
        assert.matches("^550[- ]", line)
      end
      c.close()
      srv:close()
    end)
  end)

  it("refuses to relay for strangers", function()
    H.run(function()
      local srv, port = start { relay = { domains = { "mx.test" }, networks = { "192.0.2.0/24" } } }
      local c = raw(port)
      c.reply()
      c.cmd("EHLO client.test")
      c.cmd("MAIL FROM:<a@elsewhere.test>")
      assert.equal("250", (c.cmd("RCPT TO:<local@mx.test>")))
      local code, text = c.cmd("RCPT TO:<victim@elsewhere.test>")
      assert.equal("554", code)
      assert.matches("5.7.1", text, 1, true)
      c.close()
      srv:close()
    end)
  end)

  it("requires authentication in submission mode", function()
    H.run(function()
      local srv, port = start { submission = true }
      local c = raw(port)
      c.reply()
      c.cmd("EHLO client.test")
      local code, text = c.cmd("MAIL FROM:<a@x.test>")
      assert.equal("530", code)
      assert.matches("5.7.0", text, 1, true)
      c.close()
      srv:close()
    end)
  end)

  it("takes BDAT chunks and consumes rejected ones", function()
    H.run(function()
      local messages, on_data = collect_messages()
      local srv, port = start { received_header = false, hooks = { on_data = on_data } }
      local c = raw(port)
      c.reply()
      c.cmd("EHLO client.test")
      -- rejected: no transaction; the chunk must be swallowed
      c.sock:send("BDAT 5\r\nNOOP\r")
      assert.equal("503", (c.reply()))
      assert.equal("250", (c.cmd("NOOP")))
      c.cmd("MAIL FROM:<a@x.test> BODY=BINARYMIME")
      c.cmd("RCPT TO:<b@mx.test>")
      c.sock:send("BDAT 6\r\nhello ")
      assert.equal("250", (c.reply()))
      c.sock:send("BDAT 7 LAST\r\nworld\r\n")
      assert.equal("250", (c.reply()))
      assert.equal("hello world\r\n", messages[1].data)
      c.close()
      srv:close()
    end)
  end)

  it("speaks LMTP with one reply per recipient", function()
    H.run(function()
      local srv, port = start { lmtp = true, hooks = {
        on_data = function()
          return server.per_recipient { ["full@mx.test"] = server.reply(452, "4.2.2", "Mailbox full") }
        end,
      } }
      local c = raw(port)
      c.reply()
      assert.equal("500", (c.cmd("EHLO client.test")))
      assert.equal("250", (c.cmd("LHLO client.test")))
      c.cmd("MAIL FROM:<a@x.test>")
      c.cmd("RCPT TO:<ok@mx.test>")
      c.cmd("RCPT TO:<full@mx.test>")
      c.cmd("DATA")
      c.sock:send("hi\r\n.\r\n")
      assert.equal("250", (c.reply()))
      assert.equal("452", (c.reply()))
      c.close()
      srv:close()
    end)
  end)

  it("takes PROXY v1 and v2 headers from trusted peers only", function()
    H.run(function()
      local seen = {}
      local hooks = { on_connect = function(session) seen[#seen + 1] = session.client_address end }
      local srv, port = start { proxy = { trusted = { "127.0.0.0/8" } }, hooks = hooks }
      local c = raw(port)
      c.sock:send("PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\n")
      assert.equal("220", (c.reply()))
      c.close()
      -- v2: signature, version 2 / PROXY, TCP over IPv6, 36 address bytes
      local v2 = "\r\n\r\n\0\r\nQUIT\n" .. "\x21\x21\x00\x24"
        .. ("\0"):rep(15) .. "\1" .. ("\0"):rep(15) .. "\2" .. "\x9c\x40\x00\x19"
      c = raw(port)
      c.sock:send(v2)
      assert.equal("220", (c.reply()))
      c.close()
      -- garbage instead of a header from a trusted peer: dropped
      c = raw(port)
      c.sock:send("EHLO x\r\n")
      assert.same({ nil, "closed" }, { c.reply() })
      c.close()
      srv:close()
      assert.same({ "198.51.100.7", "::1" }, seen)
      -- an untrusted peer's PROXY line is just an unknown command
      local srv2, port2 = start { proxy = { trusted = { "192.0.2.0/24" } }, hooks = hooks }
      c = raw(port2)
      c.reply()
      assert.equal("500", (c.cmd("PROXY TCP4 198.51.100.7 192.0.2.1 40000 25")))
      c.close()
      srv2:close()
      assert.equal("127.0.0.1", seen[3])
    end)
  end)

  -- A burst: every connection is made while the loop is held, so the
  -- server accepts them all in one go before any session task runs.
  local function burst(port, n)
    local result = H.tmp .. "/burst_" .. port
    os.remove(result)
    local p = assert(io.popen(("exec timeout 30 python3 '%s/spec/burst_client.py' %d %d '%s'")
      :format(H.root, port, n, result)))
    assert.equal("connected", p:read("l")) -- blocks the loop until all are made
    local deadline = luasmtp.update_now() + 30
    local f
    repeat
      luasmtp.sleep(0.05)
      f = io.open(result)
    until f or luasmtp.update_now() > deadline
    p:close()
    assert(f, "the burst client did not finish")
    local greeted, refused, other = f:read("n", "n", "n")
    f:close()
    os.remove(result)
    return greeted, refused, other
  end

  for _, case in ipairs {
    { what = "max_connections", limits = { max_connections = 5 }, limit = 5 },
    { what = "max_connections_per_ip from one address", limits = { max_connections_per_ip = 3 }, limit = 3 },
  } do
    it("never greets more than " .. case.what .. " in a burst", function()
      H.run(function()
        local srv, port = start { limits = case.limits }
        local greeted, refused, other = burst(port, 40)
        srv:close()
        assert.equal(case.limit, greeted)
        assert.equal(40 - case.limit, refused)
        assert.equal(0, other)
      end, 40)
    end)
  end

  describe("with STARTTLS", function()
    it("discards commands injected before the handshake and resets the session", function()
      H.run(function()
        local sctx, cctx = H.tls_contexts()
        local messages, on_data = collect_messages()
        local seen = {}
        local srv, port = start { tls = sctx, hooks = {
          on_data = on_data,
          on_mail = function(_, from) seen[#seen + 1] = from end,
        } }
        local c = raw(port)
        c.reply()
        local _, ehlo = c.cmd("EHLO client.test")
        assert.matches("STARTTLS", ehlo)
        c.sock:send("STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert.equal("220", (c.reply()))
        assert(c.sock:starttls(cctx, { servername = "localhost" }))
        -- the session starts over: EHLO is required again
        assert.equal("503", (c.cmd("MAIL FROM:<a@x.test>")))
        local _, ehlo2 = c.cmd("EHLO client.test")
        assert.not_matches("STARTTLS", ehlo2)
        assert.matches("REQUIRETLS", ehlo2)
        assert.equal("250", (c.cmd("MAIL FROM:<a@x.test>")))
        assert.same({ "a@x.test" }, seen)
        c.close()
        srv:close()
        assert.equal(0, #messages)
      end)
    end)

    it("drops a client that never does the handshake within tls_handshake, also when idle", function()
      local sctx = H.tls_contexts()
      local t0 = luasmtp.update_now()
      H.run_blocking(function()
        local gone = luasmtp.cond()
        local srv, port = start { tls = sctx, timeouts = { tls_handshake = 1 },
          hooks = { on_disconnect = function() gone:signal() end } }
        local c = raw(port)
        -- luasmtp.run() only returns once the server and the client are
        -- closed, also when an assertion fails
        local ok, err = pcall(function()
          -- The client reads nothing until the server has given up: no
          -- event in this process can wake the loop in the meantime.
          c.sock:send("EHLO client.test\r\nSTARTTLS\r\n")
          assert.is_true(gone:wait(10), "the stalled handshake was not timed out")
          assert.equal("220", (c.reply()))
          assert.equal("250", (c.reply()))
          assert.equal("220", (c.reply()))
          assert.is_nil(c.reply())
        end)
        c.close()
        srv:close()
        assert(ok, err)
      end)
      assert.is_true(luasmtp.update_now() - t0 < 10)
    end)
  end)

  describe("on a UNIX-domain socket", function()
    local path = H.sockpath

    it("runs a transaction, with the limits of TCP, and removes its socket at close", function()
      H.run(function()
        local p = path("smtp.sock")
        local messages, on_data = collect_messages()
        local srv = start { listen = { address = "unix:" .. p, mode = "0600" }, hooks = { on_data = on_data },
          limits = { max_connections = 1, command_line_length = 100 } }
        assert.same({ { address = "unix:" .. p, tls = false } }, srv:addresses())
        local c = raw(p)
        assert.equal("220", (c.reply()))
        local _, ehlo = c.cmd("EHLO client.test")
        assert.matches("greets unix:", ehlo, 1, true)
        -- one connection at most: the next one is told so
        local c2 = raw(p)
        assert.same({ "421" }, { (c2.reply()) })
        c2.close()
        assert.equal("500", (c.cmd("NOOP " .. ("x"):rep(200))))
        assert.equal("250", (c.cmd("MAIL FROM:<a@client.test>")))
        assert.equal("250", (c.cmd("RCPT TO:<b@mx.test>")))
        assert.equal("354", (c.cmd("DATA")))
        assert.equal("250", (c.cmd("Subject: unix\r\n\r\nbody\r\n.")))
        c.cmd("QUIT")
        c.close()
        srv:close()
        assert.is_nil(io.open(p))
        assert.equal(1, #messages)
        assert.equal("unix:", messages[1].session.client_address)
        assert.is_number(messages[1].session.client_credentials.uid)
        -- no TCP-info in the Received header: there is no address to give
        assert.matches("^Received: from client%.test\r\n\tby mx%.test with ESMTP", messages[1].data)
      end)
    end)

    it("takes mail from Postfix's smtp-source over LMTP (unix:/path)", function()
      H.run(function()
        local p = path("lmtp.sock")
        local messages, on_data = collect_messages()
        local srv = start { lmtp = true, listen = "unix:" .. p, hooks = { on_data = on_data } }
        local log = H.mkdir(H.tmp) .. "/smtp-source-unix.log"
        local pid = H.start(("exec timeout 20 smtp-source -L -s 2 -m 10 -l 512 -f a@client.test -t b@mx.test unix:%s")
          :format(H.shquote(p)), log)
        assert.is_true(H.wait_pid(pid, 20))
        srv:close()
        assert.equal(10, #messages, H.readfile(log))
        for _, m in ipairs(messages) do
          assert.equal("a@client.test", m.from)
          assert.same({ "b@mx.test" }, m.rcpt)
          assert.matches("with LMTP", m.data, 1, true)
        end
      end, 30)
    end)

    it("takes mail that Postfix delivers with lmtp:unix:/path, the socket owned by postfix", function()
      H.run(function()
        local p = path("postfix-lmtp.sock")
        local messages, on_data = collect_messages()
        local srv = start { lmtp = true, listen = { address = "unix:" .. p, owner = "postfix", mode = "0600" },
          hooks = { on_data = on_data } }
        local pf = postfix.start {
          main = { "smtpd_end_of_data_restrictions =", "default_transport = lmtp:unix:" .. p,
            "lmtp_tls_security_level = none" },
          services = { "qmgr unix n - n 300 1 qmgr", "lmtp unix - - n - - lmtp",
            "bounce unix - - n - 0 bounce", "defer unix - - n - 0 bounce", "trace unix - - n - 0 bounce",
            "error unix - - n - - error", "retry unix - - n - - error" },
        }
        local client = require "luasmtp.client"
        local res, _, err = client.send { host = "127.0.0.1", port = pf.port, tls = "none",
          from = "alice@client.test", to = { "bob@mx.test", "carol@mx.test" },
          body = "Subject: through Postfix\r\n\r\nhello\r\n" }
        assert(res and res.ok, tostring(err))
        local deadline = luasmtp.update_now() + 20
        while #messages == 0 and luasmtp.update_now() < deadline do luasmtp.sleep(0.1) end
        local pflog = pf:logtext()
        pf:stop()
        srv:close()
        assert.equal(1, #messages, pflog)
        assert.equal("alice@client.test", messages[1].from)
        assert.same({ "bob@mx.test", "carol@mx.test" }, messages[1].rcpt)
        assert.matches("Subject: through Postfix", messages[1].data, 1, true)
        -- the peer is Postfix's lmtp(8), running as the postfix user
        local id = io.popen("id -u postfix")
        local postfix_uid = math.tointeger(tonumber(id:read("l")))
        id:close()
        assert.equal(postfix_uid, messages[1].session.client_credentials.uid)
      end, 45)
    end)
  end)

  describe("with real clients", function()
    it("accepts a message from swaks", function()
      H.need("swaks")
      H.run(function()
        local messages, on_data = collect_messages()
        local srv, port = start { hooks = { on_data = on_data } }
        local log = H.tmp .. "/swaks.log"
        local pid = H.start(("exec timeout 10 swaks --server 127.0.0.1 --port %d --from a@client.test "
          .. "--to b@mx.test --helo client.test --body 'hello from swaks' --pipeline"):format(port), log)
        assert.is_true(H.wait_pid(pid, 10))
        srv:close()
        assert.equal(1, #messages, H.readfile(log))
        assert.matches("hello from swaks", messages[1].data)
      end, 15)
    end)

    it("accepts a message from Python's smtplib over STARTTLS", function()
      H.need("python3 smtplib TLS")
      H.run(function()
        local sctx = H.tls_contexts()
        local messages, on_data = collect_messages()
        local srv, port = start { tls = sctx, hooks = { on_data = on_data } }
        local script = H.tmp .. "/smtplib_send.py"
        local f = assert(io.open(script, "w"))
        f:write(([[
import smtplib, ssl, sys
ctx = ssl.create_default_context(cafile=%q)
with smtplib.SMTP("127.0.0.1", %d, local_hostname="client.test", timeout=5) as s:
    s.starttls(context=ctx)
    refused = s.sendmail("a@client.test", ["b@mx.test", "c@mx.test"], "Subject: py\r\n\r\nfrom python\r\n")
    print("refused", refused)
]]):format(H.certs() .. "/ca.pem", port))
        f:close()
        local log = H.tmp .. "/smtplib.log"
        local pid = H.start("exec timeout 10 " .. H.python3 .. " " .. script, log)
        assert.is_true(H.wait_pid(pid, 10))
        srv:close()
        assert.matches("refused {}", H.readfile(log))
        assert.equal(1, #messages)
        assert.same({ "b@mx.test", "c@mx.test" }, messages[1].rcpt)
        assert.matches("with ESMTPS", messages[1].data)
      end, 15)
    end)

    it("offers DSN to smtplib only when the script says it honours it", function()
      H.run(function()
        local script = H.mkdir(H.tmp) .. "/smtplib_dsn.py"
        local f = assert(io.open(script, "w"))
        f:write([[
import smtplib, sys
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), local_hostname="client.test", timeout=5) as s:
    s.ehlo()
    print("dsn", s.has_extn("dsn"), flush=True)
    try:
        s.sendmail("a@client.test", ["b@mx.test"], "Subject: dsn\r\n\r\nx\r\n",
                   mail_options=["RET=HDRS", "ENVID=e1"], rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
        print("sent", flush=True)
    except smtplib.SMTPException as e:
        print("refused", e, flush=True)
]])
        f:close()
        for _, dsn in ipairs { false, true } do
          local messages, on_data = collect_messages()
          local notify
          local srv, port = start { dsn = dsn, hooks = { on_data = on_data, on_rcpt = function(_, _, p)
            notify = p.notify
          end } }
          local log = H.tmp .. "/smtplib_dsn.log"
          local pid = H.start("exec timeout 10 python3 " .. script .. " " .. port, log)
          assert.is_true(H.wait_pid(pid, 10))
          srv:close()
          local out = H.readfile(log)
          if dsn then
            assert.matches("dsn True\nsent", out)
            assert.equal(1, #messages)
            assert.same({ success = true, failure = true }, notify)
          else
            assert.matches("dsn False\nrefused", out)
            assert.matches("555", out, 1, true)
            assert.matches("DSN not supported", out, 1, true)
            assert.equal(0, #messages)
          end
        end
      end, 25)
    end)

    it("accepts smtplib's send_message with mail_options=['SMTPUTF8'] (SMTPUTF8 sent twice)", function()
      H.run(function()
        local messages, on_data = collect_messages()
        local seen
        local srv, port = start { hooks = { on_data = on_data, on_mail = function(_, _, params)
          seen = params
        end } }
        local script = H.mkdir(H.tmp) .. "/smtplib_utf8.py"
        local f = assert(io.open(script, "w"))
        f:write(([[
import smtplib
from email.message import EmailMessage
msg = EmailMessage()
msg["From"] = "j\u00fcrgen@b\u00fccher.test"
msg["To"] = "bob@mx.test"
msg["Subject"] = "gr\u00fc\u00dfe"
msg.set_content("hall\u00f6\n")
with smtplib.SMTP("127.0.0.1", %d, local_hostname="client.test", timeout=5) as s:
    s.set_debuglevel(1)
    print("refused", s.send_message(msg, mail_options=["SMTPUTF8"]), flush=True)
]]):format(port))
        f:close()
        local log = H.tmp .. "/smtplib_utf8.log"
        local pid = H.start("exec timeout 10 python3 " .. script, log)
        assert.is_true(H.wait_pid(pid, 10))
        srv:close()
        local out = H.readfile(log)
        -- the peer really repeats the parameter; the server takes it as one
        assert.matches("SMTPUTF8 SMTPUTF8 BODY=8BITMIME", out, 1, true)
        assert.matches("refused {}", out, 1, true)
        assert.equal(1, #messages, out)
        assert.equal("j\u{fc}rgen@b\u{fc}cher.test", messages[1].from)
        assert.is_true(seen.smtputf8)
        assert.equal("8BITMIME", seen.body)
        assert.matches("hall\u{f6}", messages[1].data)
      end, 15)
    end)
  end)
end)
