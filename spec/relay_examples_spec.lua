-- examples/relay.lua and examples/null-client.lua run by `luasmtp serve`
-- as separate processes, end to end: Python's smtplib submits, the
-- queue relays to aiosmtpd as the smarthost, and a refused recipient
-- comes back to the sender as a delivery status notification.
local json = require "dkjson"
local luasmtp = require "luasmtp"
local H = require "spec.helper"
local fake = require "spec.fake_smtp"

local shquote = H.shquote
local TMP = ("%s/relay-examples-%d"):format(H.tmp, math.random(1, 1e9))

teardown(function() os.execute("rm -rf " .. shquote(TMP)) end)

local function serve(script, args, log)
  return fake.external(("exec timeout 60 lua5.4 %s serve %s %s"):format(shquote(H.root .. "/bin/luasmtp"),
    shquote(H.root .. "/examples/" .. script), args), log)
end

-- Run a Python snippet (inside a task); returns its output.
local function python(name, code)
  local path = TMP .. "/" .. name .. ".py"
  local f = assert(io.open(path, "w"))
  f:write(code)
  f:close()
  local out = TMP .. "/" .. name .. ".out"
  local pid = fake.external(("exec timeout 30 %s %s"):format(H.python3, shquote(path)), out)
  assert.is_true(H.wait_pid(pid, 35))
  return H.readfile(out)
end

-- Wait (inside a task) until aiosmtpd has logged n messages.
local function wait_messages(log, n)
  local deadline = luasmtp.update_now() + 30
  repeat
    local got = fake.messages(log)
    if #got >= n then return got end
    luasmtp.sleep(0.1)
  until luasmtp.update_now() > deadline
  error(("aiosmtpd has %d of %d messages"):format(#fake.messages(log), n))
end

local function parse_dsn(data)
  local path = TMP .. "/notice.eml"
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
  local p = assert(io.popen(H.python3 .. " " .. shquote(H.root .. "/spec/dsn_check.py") .. " " .. shquote(path)))
  local out = p:read("a")
  assert(p:close(), out)
  return assert(json.decode(out), out)
end

describe("examples/relay.lua", function()
  after_each(fake.cleanup)

  it("takes mail over implicit TLS and STARTTLS with AUTH, queues it, relays it and bounces a refusal", function()
    H.need("python3 aiosmtpd", "python3 smtplib TLS")
    H.run(function()
      os.execute("mkdir -p " .. shquote(TMP))
      local certs = H.certs()
      local smart_port, log = fake.aiosmtpd("")
      H.writefile(TMP .. "/users.passwd", "alice:{PLAIN}s3cret\n")
      local sub, implicit = H.free_port(), H.free_port()
      while implicit == sub do implicit = H.free_port() end
      local pid = serve("relay.lua", ("--listen 127.0.0.1:%d --listen-tls 127.0.0.1:%d --tls-cert %s --tls-key %s "
        .. "--users %s --queue %s --hostname relay.test --smarthost 127.0.0.1:%d --smarthost-tls none"):format(
        sub, implicit, shquote(certs .. "/server.pem"), shquote(certs .. "/server.key"),
        shquote(TMP .. "/users.passwd"), shquote(TMP .. "/queue"), smart_port), TMP .. "/relay.log")
      H.wait_port(sub)
      H.wait_port(implicit)
      local out = python("submit", ([[
import smtplib, ssl
ctx = ssl.create_default_context(cafile=%q)
with smtplib.SMTP_SSL("localhost", %d, context=ctx, timeout=10) as s:
    s.login("alice", "s3cret")
    print("implicit", s.sendmail("alice@example.org", ["bob@example.net"],
          b"From: alice@example.org\r\nSubject: over implicit TLS\r\n\r\nfirst\r\n"))
with smtplib.SMTP("localhost", %d, timeout=10) as s:
    s.starttls(context=ctx)
    s.login("alice", "s3cret")
    s.mail("alice@example.org", ["RET=HDRS", "ENVID=relay-env-1"])
    print("rcpt", s.rcpt("reject-me@example.net", ["NOTIFY=FAILURE"])[0])
    print("data", s.data(b"From: alice@example.org\r\nSubject: over STARTTLS\r\n\r\nsecond\r\n")[0])
with smtplib.SMTP("localhost", %d, timeout=10) as s:
    try:
        s.sendmail("alice@example.org", ["bob@example.net"], b"Subject: x\r\n\r\nx\r\n")
        print("unauthenticated accepted")
    except smtplib.SMTPSenderRefused as e:
        print("unauthenticated", e.smtp_code)
print("DONE")
]]):format(certs .. "/ca.pem", implicit, sub, sub))
      assert.matches("implicit {}", out, 1, true)
      assert.matches("rcpt 250", out, 1, true)
      assert.matches("data 250", out, 1, true)
      assert.matches("unauthenticated 530", out, 1, true)
      assert.matches("DONE", out, 1, true)
      -- the first message reached the smarthost; the second was refused
      -- there (550 5.1.1) and its notice went back to alice the same way
      local got = wait_messages(log, 2)
      local relayed, notice
      for _, m in ipairs(got) do
        if m.from == "<>" then notice = m else relayed = m end
      end
      assert.truthy(relayed, "the relayed message")
      assert.equal("alice@example.org", relayed.from)
      assert.same({ "bob@example.net" }, relayed.to)
      assert.matches("Subject: over implicit TLS", relayed.data, 1, true)
      assert.matches("^Received: ", relayed.data)
      assert.truthy(notice, "the delivery status notification")
      assert.same({ "alice@example.org" }, notice.to)
      local m = parse_dsn(notice.data)
      assert.same({}, m.defects)
      assert.equal("delivery-status", m.report_type)
      assert.equal("relay-env-1", m.per_message["Original-Envelope-Id"])
      assert.equal("dns; relay.test", m.per_message["Reporting-MTA"])
      assert.equal("rfc822; reject-me@example.net", m.recipients[1]["Final-Recipient"])
      assert.equal("failed", m.recipients[1].Action)
      assert.equal("5.1.1", m.recipients[1].Status)
      assert.matches("^smtp; 550 5%.1%.1", m.recipients[1]["Diagnostic-Code"])
      assert.equal("text/rfc822-headers", m.attached.content_type)
      assert.equal("over STARTTLS", m.attached.headers.Subject)
      os.execute("kill -TERM " .. math.tointeger(pid))
      assert.is_true(H.wait_pid(pid, 40), "relay did not stop on SIGTERM")
    end, 90)
  end)
end)

describe("examples/relay.lua to the MX", function()
  after_each(fake.cleanup)

  it("delivers through the queue to the signed test zone's MX with DANE and bounces a refused recipient", function()
    H.need("python3 aiosmtpd", "python3 smtplib TLS", "nsd", "unbound", "ldnsutils")
    local rig_mod = require "spec.dnssec_rig"
    local certs = H.certs()
    local mx_port = H.free_port()
    local rig = rig_mod.start {
      records = {
        "dane IN MX 10 mx-dane",
        "mx-dane IN A 127.0.0.31",
        rig_mod.tlsa_record("_" .. mx_port .. "._tcp.mx-dane", 3, 1, 1, certs .. "/server.pem"),
      },
    }
    local ok, err = pcall(H.run, function()
      os.execute("mkdir -p " .. shquote(TMP))
      -- the MX: aiosmtpd with STARTTLS and the certificate the TLSA record names
      local mx_log = TMP .. "/mx.jsonl"
      fake.external(("exec timeout 60 %s %s --host 127.0.0.31 --port %d --tls starttls --cert %s --key %s "
        .. "--log %s --lifetime 50"):format(H.python3, shquote(H.root .. "/spec/aiosmtpd_server.py"), mx_port,
        shquote(certs .. "/server.pem"), shquote(certs .. "/server.key"), shquote(mx_log)), TMP .. "/mx.out")
      H.wait_port(mx_port, "127.0.0.31", 10)
      H.writefile(TMP .. "/users.passwd", "alice:{PLAIN}s3cret\n")
      local sub = H.free_port()
      local pid = serve("relay.lua", ("--listen 127.0.0.1:%d --tls-cert %s --tls-key %s --users %s --queue %s "
        .. "--hostname relay.test --dns-server %s --port %d --tls-policy dane-only"):format(sub,
        shquote(certs .. "/server.pem"), shquote(certs .. "/server.key"), shquote(TMP .. "/users.passwd"),
        shquote(TMP .. "/mxqueue"), rig.server, mx_port), TMP .. "/relay-mx.log")
      H.wait_port(sub)
      local out = python("submit_mx", ([[
import smtplib, ssl
ctx = ssl.create_default_context(cafile=%q)
with smtplib.SMTP("localhost", %d, timeout=10) as s:
    s.starttls(context=ctx)
    s.login("alice", "s3cret")
    print("sent", s.sendmail("alice@dane.example.test", ["bob@dane.example.test", "reject-x@dane.example.test"],
          b"From: alice@dane.example.test\r\nSubject: via DANE\r\n\r\nhello\r\n"))
]]):format(certs .. "/ca.pem", sub))
      assert.matches("sent {}", out, 1, true)
      local got = wait_messages(mx_log, 2)
      local relayed, notice
      for _, m in ipairs(got) do
        if m.from == "<>" then notice = m else relayed = m end
      end
      assert.truthy(relayed, "the relayed message")
      assert.same({ "bob@dane.example.test" }, relayed.to)
      assert.is_true(relayed.tls, "delivered over TLS")
      assert.matches("Subject: via DANE", relayed.data, 1, true)
      assert.truthy(notice, "the bounce")
      assert.same({ "alice@dane.example.test" }, notice.to)
      local m = parse_dsn(notice.data)
      assert.equal("rfc822; reject-x@dane.example.test", m.recipients[1]["Final-Recipient"])
      assert.equal("failed", m.recipients[1].Action)
      assert.equal("5.1.1", m.recipients[1].Status)
      assert.equal("dns; mx-dane.example.test", m.recipients[1]["Remote-MTA"])
      os.execute("kill -TERM " .. math.tointeger(pid))
      assert.is_true(H.wait_pid(pid, 40), "relay did not stop on SIGTERM")
    end, 90)
    rig:stop()
    if not ok then error(err, 0) end
  end)
end)

describe("examples/null-client.lua", function()
  after_each(fake.cleanup)

  it("relays local mail from 127.0.0.1 through the smarthost and listens on loopback only", function()
    H.need("python3 aiosmtpd")
    H.run(function()
      os.execute("mkdir -p " .. shquote(TMP))
      local smart_port, log = fake.aiosmtpd("")
      local port = H.free_port()
      local pid = serve("null-client.lua", ("--listen 127.0.0.1:%d --queue %s --hostname host.test "
        .. "--smarthost 127.0.0.1:%d --smarthost-tls none"):format(port, shquote(TMP .. "/nq"), smart_port),
        TMP .. "/null.log")
      H.wait_port(port)
      local out = python("cron", ([[
import smtplib
with smtplib.SMTP("127.0.0.1", %d, timeout=10) as s:
    print("sent", s.sendmail("root@host.test", ["admin@example.org"],
          b"From: Cron Daemon <root@host.test>\r\nSubject: cron output\r\n\r\nbackup done\r\n"))
]]):format(port))
      assert.matches("sent {}", out, 1, true)
      local got = wait_messages(log, 1)
      assert.equal("root@host.test", got[1].from)
      assert.same({ "admin@example.org" }, got[1].to)
      assert.matches("Subject: cron output", got[1].data, 1, true)
      os.execute("kill -TERM " .. math.tointeger(pid))
      assert.is_true(H.wait_pid(pid, 40))
      -- a non-loopback address is refused before anything listens
      local bad = serve("null-client.lua", ("--listen 0.0.0.0:%d --queue %s"):format(port, shquote(TMP .. "/nq2")),
        TMP .. "/null-bad.log")
      assert.is_true(H.wait_pid(bad, 20))
      assert.matches("must be a loopback address", H.readfile(TMP .. "/null-bad.log"))
    end, 90)
  end)
end)

describe("examples/relay.lua with MTA-STS", function()
  after_each(fake.cleanup)

  it("enforce: refuses an MX the policy does not list and delivers to one it lists", function()
    H.need("python3", "python3 smtplib TLS", "python3 https server")
    local server = require "luasmtp.server"
    os.execute("mkdir -p " .. shquote(TMP))
    local certs = H.certs()
    -- the policies: example.test and refresh.test list mail.example.test only
    local root = TMP .. "/sts-root"
    for _, domain in ipairs { "example.test", "refresh.test" } do
      H.mkdir(root .. "/mta-sts." .. domain .. "/.well-known")
      H.writefile(root .. "/mta-sts." .. domain .. "/.well-known/mta-sts.txt",
        "version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\nmax_age: 86400\r\n")
    end
    local https = H.https_server { tag = "relay_sts", cert = "mtasts", root = root }
    local servers = {}
    local ok, err = pcall(H.run, function()
      -- example.test: the unlisted MX first (preference 10), then the
      -- listed one; refresh.test: only the unlisted one. Both would take
      -- the mail.
      local dns_pid, dns_port = H.fake_dns("127.0.0.1", { "mx:example.test=10:mx.rogue.test,20:mail.example.test",
        "mx:refresh.test=10:mx.rogue.test", "mx.rogue.test=127.0.0.52", "mail.example.test=127.0.0.51",
        "txt:_mta-sts.example.test=v=STSv1; id=20261201", "txt:_mta-sts.refresh.test=v=STSv1; id=20261201" },
        "relay_sts", 60)
      local mx_port = H.free_port()
      local got = { listed = {}, rogue = { sessions = 0 } }
      local function mx(addr, cert, record)
        local srv = assert(server.new {
          listen = { addr .. ":" .. mx_port }, hostname = "mx.test", log_level = "error",
          tls = luasmtp.tls.context { mode = "server", certificate = certs .. "/" .. cert .. ".pem",
            key = certs .. "/" .. cert .. ".key" },
          hooks = {
            on_connect = function() record.sessions = (record.sessions or 0) + 1 end,
            on_data = function(s, m)
              record[#record + 1] = { rcpt = { table.unpack(m.rcpt) }, tls = s.tls or false, data = m:read() }
            end,
          },
        })
        servers[#servers + 1] = srv
      end
      mx("127.0.0.51", "sni2", got.listed) -- mail.example.test
      mx("127.0.0.52", "server", got.rogue)
      H.writefile(TMP .. "/users.passwd", "alice:{PLAIN}s3cret\n")
      local sub = H.free_port()
      local qdir = TMP .. "/stsqueue"
      local pid = serve("relay.lua", ("--listen 127.0.0.1:%d --tls-cert %s --tls-key %s --users %s --queue %s "
        .. "--hostname relay.test --dns-server 127.0.0.1:%d --port %d --mta-sts-cache %s --cafile %s "
        .. "--mta-sts-port %d --mta-sts-resolve mta-sts.example.test:%d:127.0.0.1,mta-sts.refresh.test:%d:127.0.0.1")
        :format(sub, shquote(certs .. "/server.pem"), shquote(certs .. "/server.key"), shquote(TMP .. "/users.passwd"),
          shquote(qdir), dns_port, mx_port, shquote(TMP .. "/sts-cache"), shquote(certs .. "/ca.pem"), https.port,
          https.port, https.port), TMP .. "/relay-sts.log")
      H.wait_port(sub)
      local out = python("submit_sts", ([[
import smtplib, ssl
ctx = ssl.create_default_context(cafile=%q)
with smtplib.SMTP("localhost", %d, timeout=10) as s:
    s.starttls(context=ctx)
    s.login("alice", "s3cret")
    print("sent", s.sendmail("alice@sender.test", ["bob@example.test", "carol@refresh.test"],
          b"From: alice@sender.test\r\nSubject: under MTA-STS\r\n\r\nhello\r\n"))
]]):format(certs .. "/ca.pem", sub))
      assert.matches("sent {}", out, 1, true)
      -- bob: past the unlisted MX to the listed one, over verified TLS
      local deadline = luasmtp.update_now() + 30
      while #got.listed == 0 and luasmtp.update_now() < deadline do luasmtp.sleep(0.1) end
      assert.equal(1, #got.listed, H.readfile(TMP .. "/relay-sts.log"))
      assert.same({ "bob@example.test" }, got.listed[1].rcpt)
      assert.is_true(got.listed[1].tls)
      assert.matches("Subject: under MTA-STS", got.listed[1].data, 1, true)
      -- carol: still queued, refused by the policy; the unlisted MX never
      -- saw a connection
      local carol
      deadline = luasmtp.update_now() + 30
      repeat
        local p = assert(io.popen("lua5.4 " .. shquote(H.root .. "/bin/luasmtp") .. " queue --dir " .. shquote(qdir)
          .. " --json list 2>&1"))
        local list = json.decode(p:read("a"))
        p:close()
        for _, e in ipairs(list or {}) do
          for _, r in ipairs(e.recipients) do
            if r.address == "carol@refresh.test" and r.attempts >= 1 then carol = r end
          end
        end
        if not carol then luasmtp.sleep(0.2) end
      until carol or luasmtp.update_now() > deadline
      assert.truthy(carol, "carol's attempt in the queue")
      assert.equal("pending", carol.state)
      assert.matches("MX mx.rogue.test is not listed in the MTA-STS policy of refresh.test", carol.last_reply, 1, true)
      assert.equal(0, got.rogue.sessions)
      assert.equal(0, #got.rogue)
      -- a second relay on the same queue directory stops at once, saying why
      local second = serve("relay.lua", ("--listen 127.0.0.1:%d --tls-cert %s --tls-key %s --users %s --queue %s")
        :format(H.free_port(), shquote(certs .. "/server.pem"), shquote(certs .. "/server.key"),
          shquote(TMP .. "/users.passwd"), shquote(qdir)), TMP .. "/relay-second.log")
      assert.is_true(H.wait_pid(second, 20))
      local said = H.readfile(TMP .. "/relay-second.log")
      assert.matches("queue directory " .. qdir .. " is in use by another queue (" .. qdir
        .. "/lock is held by another process: pid ", said, 1, true)
      assert.matches("pid %d+%)", said) -- the first relay's (under timeout(1), so not `pid`)
      os.execute("kill -TERM " .. math.tointeger(pid))
      assert.is_true(H.wait_pid(pid, 40), "relay did not stop on SIGTERM")
      H.kill(dns_pid)
    end, 120)
    for _, srv in ipairs(servers) do srv:close() end
    H.kill(https.pid)
    if not ok then error(err, 0) end
  end)
end)
