-- luasmtp.queue.dsn: every notice is parsed by Python's email package
-- (spec/dsn_check.py), sent through the client into aiosmtpd, and the
-- success notices are driven by a real SMTP session (smtplib).
local json = require "dkjson"
local H = require "spec.helper"
local fake = require "spec.fake_smtp"
local dsn = require "luasmtp.queue.dsn"
local client = require "luasmtp.client"
local server = require "luasmtp.server"

local shquote = H.shquote
local TMP = ("%s/dsn-%d"):format(H.tmp, math.random(1, 1e9)) -- one run's own files
local runs = 0

teardown(function() os.execute("rm -rf " .. shquote(TMP)) end)

-- Parse a notice (a string or a chunk function) with Python's email
-- package; returns what spec/dsn_check.py printed.
local function parse(message)
  H.need("python3")
  os.execute("mkdir -p " .. shquote(TMP))
  runs = runs + 1
  local path = ("%s/notice-%d.eml"):format(TMP, runs)
  local f = assert(io.open(path, "wb"))
  if type(message) == "function" then
    for piece in message do f:write(piece) end
  else
    f:write(message)
  end
  f:close()
  local p = assert(io.popen(H.python3 .. " " .. shquote(H.root .. "/spec/dsn_check.py") .. " " .. shquote(path)
    .. " 2>&1"))
  local out = p:read("a")
  assert(p:close(), "dsn_check.py failed: " .. out)
  return assert(json.decode(out), out)
end

local ORIGINAL = table.concat({
  "Received: from client.test by mx.test; Tue, 1 Dec 2026 10:00:00 +0000",
  "From: Alice <alice@example.org>",
  "To: bob@example.net",
  "Subject: quarterly figures",
  "Message-ID: <orig.1@example.org>",
  "",
  "Hello Bob,",
  "the figures are attached.",
  "",
}, "\r\n")

local T0 = 1764583200 -- Tue, 01 Dec 2025 10:00:00 +0000

local function failure(extra)
  local o = {
    original = ORIGINAL, reporting_mta = "mx.example.org", arrival_date = T0, now = T0 + 120,
    envelope = { from = "alice@example.org", envid = "QQ314159", ret = "full" },
    recipients = { {
      address = "bob@example.net", orcpt = "rfc822;bob+2Bfigures@example.net", action = "failed",
      status = "5.1.1", remote_mta = "mx.example.net",
      diagnostic = "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown",
      last_attempt = T0 + 100,
    } },
  }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

describe("dsn.build", function()
  it("makes a failure notice with every RFC 3464 field and the full message for RET=FULL", function()
    local notice = assert(dsn.build(failure()))
    assert.equal("", notice.from)
    assert.same({ "alice@example.org" }, notice.to)
    local m = parse(notice.message)
    assert.same({}, m.defects)
    assert.equal("multipart/report", m.content_type)
    assert.equal("delivery-status", m.report_type)
    assert.same({ "text/plain", "message/delivery-status", "message/rfc822" }, m.parts)
    assert.equal("Mail Delivery System <MAILER-DAEMON@mx.example.org>", m.headers.From)
    assert.equal("alice@example.org", m.headers.To)
    assert.equal("auto-replied", m.headers["Auto-Submitted"])
    assert.equal("Undelivered Mail Returned to Sender", m.headers.Subject)
    assert.equal("Mon, 01 Dec 2025 10:02:00 +0000", m.headers.Date)
    assert.matches("^<.+@mx%.example%.org>$", m.headers["Message-ID"])
    assert.equal(notice.message_id, m.headers["Message-ID"])
    assert.same({ ["Reporting-MTA"] = "dns; mx.example.org", ["Original-Envelope-Id"] = "QQ314159",
                  ["Arrival-Date"] = "Mon, 01 Dec 2025 10:00:00 +0000" }, m.per_message)
    assert.equal(1, #m.recipients)
    assert.same({
      ["Original-Recipient"] = "rfc822; bob+figures@example.net",
      ["Final-Recipient"] = "rfc822; bob@example.net",
      Action = "failed", Status = "5.1.1", ["Remote-MTA"] = "dns; mx.example.net",
      ["Diagnostic-Code"] = "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown",
      ["Last-Attempt-Date"] = "Mon, 01 Dec 2025 10:01:40 +0000",
    }, m.recipients[1])
    assert.equal("message/rfc822", m.attached.content_type)
    assert.equal("quarterly figures", m.attached.headers.Subject)
    assert.equal("<orig.1@example.org>", m.attached.headers["Message-ID"])
    assert.equal("Hello Bob,\r\nthe figures are attached.\r\n", m.attached.body)
    assert.matches("<bob@example.net>: could not be delivered", m.human, 1, true)
  end)

  it("returns the headers only for RET=HDRS, without RET, and when nothing failed", function()
    for _, case in ipairs {
      { ret = "hdrs", action = "failed", status = "5.2.2" },
      { ret = nil, action = "failed", status = "5.2.2" },
      { ret = "full", action = "delayed", status = "4.4.1" },
      { ret = "full", action = "delivered", status = "2.0.0" },
    } do
      local o = failure()
      o.envelope.ret = case.ret
      o.recipients[1].action, o.recipients[1].status = case.action, case.status
      local m = parse(assert(dsn.build(o)).message)
      assert.same({}, m.defects)
      assert.same({ "text/plain", "message/delivery-status", "text/rfc822-headers" }, m.parts)
      assert.equal("quarterly figures", m.attached.headers.Subject)
      assert.equal("Alice <alice@example.org>", m.attached.headers.From)
      assert.equal(case.action, m.recipients[1].Action)
      assert.equal(case.status, m.recipients[1].Status)
    end
  end)

  it("says what kind of notice it is in the Subject and the fields of a delay", function()
    local o = failure()
    o.recipients = { { address = "bob@example.net", action = "delayed", status = "4.4.1",
                       will_retry_until = T0 + 5 * 86400, last_attempt = T0 + 60 } }
    local m = parse(assert(dsn.build(o)).message)
    assert.equal("Delayed Mail (still being retried)", m.headers.Subject)
    assert.equal("Sat, 06 Dec 2025 10:00:00 +0000", m.recipients[1]["Will-Retry-Until"])
    assert.is_nil(m.recipients[1]["Diagnostic-Code"])
    o.recipients = { { address = "bob@example.net", action = "delivered", status = "2.0.0" },
                     { address = "carol@example.net", action = "relayed", status = "2.0.0",
                       remote_mta = "old.example.net" } }
    m = parse(assert(dsn.build(o)).message)
    assert.equal("Successful Mail Delivery Report", m.headers.Subject)
    assert.equal(2, #m.recipients)
    assert.equal("delivered", m.recipients[1].Action)
    assert.equal("relayed", m.recipients[2].Action)
    assert.equal("rfc822; carol@example.net", m.recipients[2]["Final-Recipient"])
    assert.equal("dns; old.example.net", m.recipients[2]["Remote-MTA"])
  end)

  it("uses the RFC 6533 global types for SMTPUTF8 mail", function()
    local original = "From: Jürgen <jürgen@exämple.org>\r\nTo: björn@exämple.net\r\nSubject: Grüße\r\n\r\n"
      .. "Schöne Grüße\r\n"
    local o = failure {
      original = original,
      envelope = { from = "jürgen@exämple.org", ret = "full", smtputf8 = true },
      recipients = { { address = "björn@exämple.net", orcpt = "utf-8;bj\\x{F6}rn+2Bx@ex\\x{E4}mple.net",
                       action = "failed", status = "5.1.1", remote_mta = "mx.exämple.net",
                       diagnostic = "smtp; 550 5.1.1 <björn@exämple.net> unknown" } },
    }
    local notice = assert(dsn.build(o))
    assert.equal("8bitmime", notice.body_type)
    local m = parse(notice.message)
    assert.same({}, m.defects)
    assert.equal("delivery-status", m.report_type)
    assert.same({ "text/plain", "message/global-delivery-status", "message/global" }, m.parts)
    assert.equal("jürgen@exämple.org", m.headers.To)
    assert.equal("utf-8; björn@exämple.net", m.recipients[1]["Final-Recipient"])
    assert.equal("utf-8; björn+x@exämple.net", m.recipients[1]["Original-Recipient"])
    assert.equal("smtp; 550 5.1.1 <björn@exämple.net> unknown", m.recipients[1]["Diagnostic-Code"])
    assert.equal("dns; mx.exämple.net", m.recipients[1]["Remote-MTA"])
    assert.equal("Grüße", m.attached.headers.Subject)
    assert.equal("Schöne Grüße\r\n", m.attached.body)
    -- headers only: message/global-headers
    o.envelope.ret = "hdrs"
    m = parse(assert(dsn.build(o)).message)
    assert.same({ "text/plain", "message/global-delivery-status", "message/global-headers" }, m.parts)
    assert.equal("björn@exämple.net", m.attached.headers.To)
    -- a plain notice for a UTF-8 address writes it as utf-8-addr-xtext
    o.envelope.smtputf8 = nil
    m = parse(assert(dsn.build(o)).message)
    assert.equal("message/delivery-status", m.parts[2])
    assert.equal("utf-8; bj\\x{F6}rn@ex\\x{E4}mple.net", m.recipients[1]["Final-Recipient"])
  end)

  it("keeps what a peer said on one line: no header injection from a reply", function()
    local o = failure()
    o.recipients[1].diagnostic = "550 5.1.1 no\r\nX-Injected: yes\r\n\r\n--boundary\0\127 end"
    o.recipients[1].remote_mta = "evil.test\r\nAction: delivered"
    o.recipients[1].address = "bob@example.net\r\nStatus: 2.0.0"
    local m = parse(assert(dsn.build(o)).message)
    assert.same({}, m.defects)
    assert.equal(1, #m.recipients)
    local r = m.recipients[1]
    assert.is_nil(r["X-Injected"])
    assert.equal("failed", r.Action)
    assert.equal("5.1.1", r.Status)
    assert.equal("smtp; 550 5.1.1 no X-Injected: yes --boundary end", r["Diagnostic-Code"])
    assert.equal("dns; evil.test Action: delivered", r["Remote-MTA"])
    -- a very long reply is capped and folded, not a line past 998 octets
    o = failure()
    o.recipients[1].diagnostic = "smtp; 550 " .. ("word "):rep(2000)
    local notice = assert(dsn.build(o))
    for line in notice.message:gmatch("[^\n]*") do assert.is_true(#line <= 998) end
    m = parse(notice.message)
    assert.is_true(#m.recipients[1]["Diagnostic-Code"] <= 900)
  end)

  it("streams a large original from a file, and returns only its headers above the cap", function()
    os.execute("mkdir -p " .. shquote(TMP))
    local path = TMP .. "/big.eml"
    local f = assert(io.open(path, "wb"))
    f:write("From: alice@example.org\r\nTo: bob@example.net\r\nSubject: big\r\n\r\n")
    local line = ("0123456789"):rep(7) .. "\r\n"
    for _ = 1, 20000 do f:write(line) end
    f:close()
    f = assert(io.open(path, "rb"))
    local notice = assert(dsn.build(failure { original = f }))
    assert.equal("function", type(notice.message))
    local pieces, total, largest = 0, 0, 0
    local parts = {}
    for piece in notice.message do
      pieces, total = pieces + 1, total + #piece
      largest = math.max(largest, #piece)
      parts[#parts + 1] = piece
    end
    assert.equal(notice.size, total)
    assert.is_true(pieces > 10)
    assert.is_true(largest <= 65536)
    local m = parse(table.concat(parts))
    assert.same({}, m.defects)
    assert.equal("message/rfc822", m.attached.content_type)
    assert.equal(20000 * #line, #m.attached.body)
    -- above max_original: the headers only, as one string (a file is
    -- read from its current position)
    f:seek("set", 0)
    notice = assert(dsn.build(failure { original = f, max_original = 100000 }))
    assert.equal("string", type(notice.message))
    m = parse(notice.message)
    assert.equal("text/rfc822-headers", m.attached.content_type)
    assert.equal("big", m.attached.headers.Subject)
    f:close()
  end)

  it("refuses to notify the null sender and checks its arguments", function()
    local o = failure()
    o.envelope.from = ""
    local notice, err = dsn.build(o)
    assert.is_nil(notice)
    assert.equal("null sender", err)
    o.envelope.from = "<>"
    assert.is_nil((dsn.build(o)))
    o = failure()
    o.recipients[1].status = "2.0.0" -- does not fit "failed"
    assert.has_error(function() dsn.build(o) end)
    o.recipients[1].status = "4.4.7" -- failed after the last temporary error: kept
    assert.equal("4.4.7", parse(assert(dsn.build(o)).message).recipients[1].Status)
    o.recipients[1].action = "delayed"
    o.recipients[1].status = "5.1.1" -- does not fit "delayed"
    assert.has_error(function() dsn.build(o) end)
    o.recipients[1].action = "failed"
    o.recipients[1].status, o.recipients[1].action = "5.1.1", "bounced"
    assert.has_error(function() dsn.build(o) end)
    o.recipients[1].action, o.recipients[1].status = "failed", "550"
    assert.has_error(function() dsn.build(o) end)
  end)
end)

describe("dsn.should_notify", function()
  it("honours NOTIFY with the RFC 3461 default of FAILURE and DELAY", function()
    local cases = {
      -- notify, failed, delayed, delivered
      { nil, true, true, false },
      { { failure = true }, true, false, false },
      { { delay = true }, false, true, false },
      { { success = true }, false, false, true },
      { { never = true }, false, false, false },
      { "SUCCESS,FAILURE", true, false, true },
      { "NEVER", false, false, false },
      { { "DELAY", "SUCCESS" }, false, true, true },
    }
    for _, c in ipairs(cases) do
      local rcpt = { address = "bob@example.net", notify = c[1] }
      assert.equal(c[2], dsn.should_notify(rcpt, "failed", "alice@example.org"))
      assert.equal(c[3], dsn.should_notify(rcpt, "delayed", "alice@example.org"))
      assert.equal(c[4], dsn.should_notify(rcpt, "delivered", "alice@example.org"))
      assert.equal(c[4], dsn.should_notify(rcpt, "relayed", "alice@example.org"))
    end
  end)

  it("never notifies the null sender: no bounce for a bounce", function()
    for _, action in ipairs { "failed", "delayed", "delivered" } do
      assert.is_false(dsn.should_notify({ notify = { success = true, failure = true, delay = true } }, action, ""))
      assert.is_false(dsn.should_notify({}, action, "<>"))
    end
    assert.has_error(function() dsn.should_notify({}, "bounced", "a@b.test") end)
  end)
end)

describe("dsn.orcpt", function()
  it("decodes xtext with the protocol codec", function()
    assert.same({ "rfc822", "a+b=c@example.org" }, { dsn.orcpt("rfc822;a+2Bb+3Dc@example.org") })
    assert.same({ "rfc822", "plain@example.org" }, { dsn.orcpt("rfc822;plain@example.org") })
    assert.same({ "utf-8", "jürgen@example.org" }, { dsn.orcpt("utf-8;j\\x{FC}rgen@example.org") })
    assert.same({ "rfc822", "x@y" }, { dsn.orcpt { type = "rfc822", addr = "x@y" } })
    assert.is_nil((dsn.orcpt("rfc822;bad+ZZ@example.org")))
    assert.is_nil((dsn.orcpt("no-semicolon")))
    assert.is_nil((dsn.orcpt("utf-8;bad\\x{D800}@example.org")))
  end)

  it("takes the ORCPT the server's RCPT parser decoded", function()
    local cmd = require("luasmtp.core").parse_command("RCPT TO:<bob@example.net> NOTIFY=SUCCESS,DELAY "
      .. "ORCPT=rfc822;bob+2Bold@example.net")
    local rcpt = { address = cmd.path, notify = cmd.notify, orcpt = cmd.orcpt }
    assert.same({ "rfc822", "bob+old@example.net" }, { dsn.orcpt(rcpt.orcpt) })
    assert.is_true(dsn.should_notify(rcpt, "delivered", "alice@example.org"))
    assert.is_true(dsn.should_notify(rcpt, "delayed", "alice@example.org"))
    assert.is_false(dsn.should_notify(rcpt, "failed", "alice@example.org"))
  end)
end)

describe("dsn.recipient", function()
  it("turns a reply or a client error into a recipient entry", function()
    local r = dsn.recipient("bob@example.net", { code = 550, enhanced = "5.1.1", text = "No such user" },
      { remote_mta = "mx.example.net" })
    assert.same({ address = "bob@example.net", action = "failed", status = "5.1.1",
                  diagnostic = "smtp; 550 5.1.1 No such user", remote_mta = "mx.example.net" }, r)
    r = dsn.recipient("bob@example.net", { code = 451, text = "Try later" })
    assert.equal("delayed", r.action)
    assert.equal("4.0.0", r.status)
    assert.equal("smtp; 451 Try later", r.diagnostic)
    -- an enhanced code of the wrong class is not used
    r = dsn.recipient("bob@example.net", { code = 554, enhanced = "2.0.0", text = "odd" })
    assert.equal("5.0.0", r.status)
    -- no reply at all: by the client's token
    r = dsn.recipient("bob@example.net", { token = "refused", message = "connect to 192.0.2.1: refused" })
    assert.same({ "delayed", "4.4.1", "X-luasmtp; connect to 192.0.2.1: refused" },
      { r.action, r.status, r.diagnostic })
    r = dsn.recipient("bob@example.net", { token = "dns", message = "SERVFAIL" }, { action = "failed" })
    assert.same({ "failed", "5.4.3" }, { r.action, r.status })
    -- and build takes it
    local o = failure()
    o.recipients = { r }
    local m = parse(assert(dsn.build(o)).message)
    assert.equal("5.4.3", m.recipients[1].Status)
    assert.equal("X-luasmtp; SERVFAIL", m.recipients[1]["Diagnostic-Code"])
  end)
end)

describe("dsn.too_many_hops", function()
  local function with_received(n, body)
    local lines = {}
    for i = 1, n do
      lines[i] = ("Received: from h%d.test by h%d.test; Tue, 1 Dec 2026 10:00:00 +0000"):format(i, i + 1)
    end
    lines[#lines + 1] = "Subject: loop"
    lines[#lines + 1] = ""
    lines[#lines + 1] = body or "Received: in the body does not count"
    return table.concat(lines, "\r\n")
  end

  it("counts Received fields of the header block against Postfix's 50", function()
    assert.same({ false, 50 }, { dsn.too_many_hops(with_received(50, ("Received: x\r\n"):rep(10))) })
    assert.same({ true, 51 }, { dsn.too_many_hops(with_received(51)) })
    assert.same({ true, 6 }, { dsn.too_many_hops(with_received(6), 5) })
    assert.same({ false, 0 }, { dsn.too_many_hops("Subject: x\r\n\r\n") })
    assert.same({ true, 2 }, { dsn.too_many_hops("received: a\nRECEIVED : b\n\n", 1) })
  end)
end)

-- The one message aiosmtpd took: from the null sender to `sender`, a
-- notice Python parses without defects.
local function arrived_notice(log, sender)
  local got = fake.messages(log)
  assert.equal(1, #got)
  assert.equal("<>", got[1].from) -- aiosmtpd's name for the null sender
  assert.same({ sender }, got[1].to)
  local m = parse(got[1].data)
  assert.same({}, m.defects)
  return m
end

describe("notices sent through the client", function()
  after_each(fake.cleanup)

  it("arrive at aiosmtpd from the null sender and parse", function()
    H.run(function()
      local port, log, pid = fake.aiosmtpd("")
      local notice = assert(dsn.build(failure()))
      local res = assert(client.send { host = "127.0.0.1", port = port, tls = "none",
        from = notice.from, to = notice.to, body = notice.message })
      assert.is_true(res.ok)
      local m = arrived_notice(log, "alice@example.org")
      assert.equal("delivery-status", m.report_type)
      assert.equal("failed", m.recipients[1].Action)
      assert.equal("5.1.1", m.recipients[1].Status)
      assert.equal("quarterly figures", m.attached.headers.Subject)
      H.kill(pid)
    end, 40)
  end)
  it("stream a large original through the client", function()
    H.run(function()
      local port, log, pid = fake.aiosmtpd("")
      os.execute("mkdir -p " .. shquote(TMP))
      local path = TMP .. "/stream.eml"
      local f = assert(io.open(path, "wb"))
      f:write("From: alice@example.org\r\nSubject: streamed\r\n\r\n")
      for i = 1, 30000 do f:write(("line %05d of the original\r\n"):format(i)) end
      f:close()
      f = assert(io.open(path, "rb"))
      local notice = assert(dsn.build(failure { original = f }))
      assert.equal("function", type(notice.message))
      local res = assert(client.send { host = "127.0.0.1", port = port, tls = "none", from = notice.from,
        to = notice.to, body = notice.message, size = notice.size, body_type = notice.body_type })
      f:close()
      assert.is_true(res.ok)
      local m = arrived_notice(log, "alice@example.org")
      assert.equal("message/rfc822", m.attached.content_type)
      assert.equal("streamed", m.attached.headers.Subject)
      assert.matches("^line 00001 of the original\r\n", m.attached.body)
      assert.matches("line 30000 of the original\r\n$", m.attached.body)
      H.kill(pid)
    end, 40)
  end)
end)

describe("dsn.success_notices", function()
  after_each(fake.cleanup)

  it("sends a delivered notice for NOTIFY=SUCCESS after a real session stored the message", function()
    H.need("python3 aiosmtpd")
    H.run(function()
      local port, log, aio_pid = fake.aiosmtpd("")
      local maildir_dir = TMP .. "/Maildir"
      local sent = {}
      local plugin = dsn.success_notices {
        reporting_mta = "mx.test",
        send = function(notice)
          sent[#sent + 1] = notice
          return client.send { host = "127.0.0.1", port = port, tls = "none",
            from = notice.from, to = notice.to, body = notice.message }
        end,
      }
      local srv = assert(server.new {
        listen = "127.0.0.1:0", hostname = "mx.test", dsn = true, logger = function() end,
        -- the store first; the notice plugin runs only when it has stored the message
        plugins = { server.plugins.received(), server.plugins.maildir(maildir_dir), plugin },
      })
      local sport = srv:addresses()[1].port
      local script = TMP .. "/smtplib_dsn.py"
      local sf = assert(io.open(script, "wb"))
      sf:write(([[
import smtplib, sys
msg = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: report\r\n\r\nbody\r\n"
with smtplib.SMTP("127.0.0.1", %d, local_hostname="client.test", timeout=10) as s:
    s.ehlo()
    assert s.has_extn("dsn"), "no DSN"
    s.mail("alice@example.org", ["RET=HDRS", "ENVID=ENV+2B1"])
    print(s.rcpt("bob@example.net", ["NOTIFY=SUCCESS", "ORCPT=rfc822;bob+2Bold@example.net"]))
    print(s.rcpt("carol@example.net", ["NOTIFY=FAILURE"]))
    print(s.rcpt("dave@example.net"))
    print(s.data(msg))
print("DONE")
]]):format(sport))
      sf:close()
      local out = TMP .. "/smtplib_dsn.out"
      os.remove(out)
      local pid = fake.external(("exec timeout 20 %s %s"):format(H.python3, shquote(script)), out)
      assert.is_true(H.wait_pid(pid, 25))
      assert.matches("DONE", H.readfile(out))
      -- the notice went out from the session's task, before the 250
      assert.equal(1, #sent)
      local m = arrived_notice(log, "alice@example.org")
      assert.equal("Successful Mail Delivery Report", m.headers.Subject)
      assert.equal("ENV+1", m.per_message["Original-Envelope-Id"])
      assert.equal("dns; mx.test", m.per_message["Reporting-MTA"])
      assert.equal(1, #m.recipients) -- only bob asked for it
      assert.equal("rfc822; bob@example.net", m.recipients[1]["Final-Recipient"])
      assert.equal("rfc822; bob+old@example.net", m.recipients[1]["Original-Recipient"])
      assert.equal("delivered", m.recipients[1].Action)
      assert.equal("2.0.0", m.recipients[1].Status)
      assert.equal("text/rfc822-headers", m.attached.content_type)
      assert.equal("report", m.attached.headers.Subject)
      assert.matches("^Received: from client%.test", m.attached.headers.Received and
        ("Received: " .. m.attached.headers.Received) or "")
      local p = assert(io.popen("cat " .. shquote(maildir_dir) .. "/new/*"))
      assert.matches("Subject: report", p:read("a"), 1, true)
      p:close()
      srv:close()
      H.kill(aio_pid)
    end, 60)
  end)

  it("queues the notice from the null sender when given the queue", function()
    local queue = require "luasmtp.queue"
    os.execute("mkdir -p " .. shquote(TMP))
    local q = assert(queue.open { dir = TMP .. "/queue", hostname = "mx.test", log = function() end })
    local plugin = dsn.success_notices { queue = q }
    local message = { size = 26 }
    function message.chunks()
      local done = false
      return function() if not done then done = true return "Subject: stored\r\n\r\nbody\r\n" end end
    end
    local session = { config = { hostname = "mx.test" },
                      envelope = { from = "alice@example.org", params = { envid = "E7" },
                                   rcpt = { "bob@example.net", "carol@example.net" },
                                   rcpt_params = { { notify = { success = true } }, {} } } }
    assert.is_nil(plugin.deliver(session, message))
    local entries = {}
    for _, e in pairs(q.entries) do entries[#entries + 1] = e end
    assert.equal(1, #entries)
    assert.equal("", entries[1].from)
    assert.equal(1, #entries[1].rcpt)
    assert.equal("alice@example.org", entries[1].rcpt[1].address)
    assert.equal("NEVER", entries[1].rcpt[1].notify)
    local m = parse(require("luasmtp.queue.store").read_body(entries[1]))
    assert.equal("dns; mx.test", m.per_message["Reporting-MTA"])
    assert.equal("E7", m.per_message["Original-Envelope-Id"])
    assert.equal(1, #m.recipients)
    assert.equal("rfc822; bob@example.net", m.recipients[1]["Final-Recipient"])
    assert.equal("delivered", m.recipients[1].Action)
    assert.equal("stored", m.attached.headers.Subject)
  end)

  it("sends nothing for a message from the null sender or without NOTIFY=SUCCESS", function()
    local sent = {}
    local plugin = dsn.success_notices { reporting_mta = "mx.test",
      send = function(n) sent[#sent + 1] = n return true end }
    local message = { read = function() return "Subject: x\r\n\r\nbody\r\n" end }
    function message.chunks()
      local done = false
      return function() if not done then done = true return "Subject: x\r\n\r\nbody\r\n" end end
    end
    local session = { envelope = { from = "", params = {}, rcpt = { "bob@example.net" },
                                   rcpt_params = { { notify = { success = true } } } } }
    assert.is_nil(plugin.deliver(session, message))
    session.envelope.from = "alice@example.org"
    session.envelope.rcpt_params = { { notify = { failure = true, delay = true } } }
    assert.is_nil(plugin.deliver(session, message))
    assert.equal(0, #sent)
    session.envelope.rcpt_params = { { notify = { success = true } } }
    assert.is_nil(plugin.deliver(session, message))
    assert.equal(1, #sent)
    assert.same({ "alice@example.org" }, sent[1].to)
    local m = parse(sent[1].message)
    assert.equal("delivered", m.recipients[1].Action)
    assert.equal("x", m.attached.headers.Subject)
  end)
end)
