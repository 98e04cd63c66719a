-- The queue's delivery behaviour against real peers: MX sessions
-- reused per domain and TLS policy (counted at the receiving server),
-- "relayed" notices when the next hop lacks DSN (the notice parsed by
-- Python's email package) and the DSN parameters passed on when it has
-- it (our server with dsn = true, Postfix's smtpd), mail loops bounced
-- with 5.4.6, and one scheduler per queue directory.
local json = require "dkjson"
local server = require "luasmtp.server"
local queue = require "luasmtp.queue"
local dns = require "luasmtp.dns"
local H = require "spec.helper"
local fake = require "spec.fake_smtp"

local shquote = H.shquote
local TMP = ("%s/queue-delivery-%d"):format(H.tmp, math.random(1, 1e9))
local seq = 0

local function fresh_dir(name)
  seq = seq + 1
  local dir = ("%s/%s-%d"):format(TMP, name, seq)
  os.execute("rm -rf " .. shquote(dir))
  return H.mkdir(dir)
end

local function open(dir, opts)
  local o = { dir = dir, retry = { 0.2 }, jitter = 0, tick = 0.1, hostname = "relay.test",
    log = os.getenv("QUEUE_DEBUG") and print or function() end }
  for k, v in pairs(opts or {}) do o[k] = v end
  return assert(queue.open(o))
end

local until_true = require("spec.queue_helper").until_true

local function msg(n, extra)
  return ("Message-ID: <q%d@test>\r\nSubject: %d\r\n%s\r\nbody %d\r\n"):format(n, n, extra or "", n)
end

local started = {}

-- A receiving MTA (the project's server): counts its sessions, which
-- session each message came over, with TLS or not, and the DSN
-- parameters it was given.
local function peer(listen, opts)
  opts = opts or {}
  local p = { sessions = 0, open = 0, messages = {} }
  local ids = setmetatable({}, { __mode = "k" })
  local tls = opts.tls and H.tls_contexts() or nil
  local srv = assert(server.new {
    listen = { listen }, hostname = opts.hostname or "mx.peer.test", log_level = "error", tls = tls,
    dsn = opts.dsn or false,
    hooks = {
      on_connect = function(s)
        p.sessions = p.sessions + 1
        p.open = p.open + 1
        ids[s] = p.sessions
      end,
      on_disconnect = function() p.open = p.open - 1 end,
      on_data = function(s, m)
        local env = m.envelope or s.envelope
        local rcpt = {}
        for i, a in ipairs(m.rcpt) do rcpt[i] = a end
        p.messages[#p.messages + 1] = { from = m.from, rcpt = rcpt, data = m:read(), session = ids[s],
          tls = s.tls or false, params = env.params, rcpt_params = env.rcpt_params }
      end,
    },
  })
  started[#started + 1] = srv
  return p, srv:addresses()[1].port
end

-- Messages per session number, and which sessions had TLS.
local function per_session(p)
  local count, tls = {}, {}
  for _, m in ipairs(p.messages) do
    count[m.session] = (count[m.session] or 0) + 1
    tls[m.session] = m.tls
  end
  return count, tls
end

-- Of two messages that arrived, the delivered one and the notice (from
-- the null sender).
local function delivered_and_notice(messages)
  local delivered, notice
  for _, m in ipairs(messages) do
    if m.from == "" then notice = m else delivered = m end
  end
  return delivered, notice
end

local function parse_dsn(data)
  local path = TMP .. "/notice-" .. seq .. ".eml"
  H.writefile(path, data)
  local p = assert(io.popen(H.python3 .. " " .. shquote(H.root .. "/spec/dsn_check.py") .. " " .. shquote(path)))
  local out = p:read("a")
  assert(p:close(), out)
  return assert(json.decode(out), out)
end

after_each(function()
  for _, srv in ipairs(started) do srv:close() end
  started = {}
  fake.cleanup()
end)

teardown(function() os.execute("rm -rf " .. shquote(TMP)) end)

describe("queue MX connection reuse", function()
  local dns_pid
  lazy_setup(function()
    H.need("python3")
    os.execute("mkdir -p " .. shquote(TMP))
    local port
    dns_pid, port = H.fake_dns("127.0.0.1", { "mx:reuse.test=10:mx.reuse.test", "mx:other.test=10:mx.reuse.test",
      "mx.reuse.test=127.0.0.41", "mx:pf.test=10:mx.pf.test", "mx.pf.test=127.0.0.1",
      "mx:dsn.test=10:mx.dsn.test", "mx.dsn.test=127.0.0.42" }, "queue_reuse", 120)
    assert(dns.configure { servers = { "127.0.0.1:" .. port }, timeout = 2, tries = 2 })
  end)
  lazy_teardown(function()
    dns.configure {}
    if dns_pid then H.kill(dns_pid) end
  end)

  it("sends a domain's messages one after another over one session, up to the cap; idle sessions close", function()
    H.run(function()
      local p, port = peer("127.0.0.41:0", { tls = true })
      local q = open(fresh_dir("reuse"), { max_connections_per_destination = 1, max_messages_per_connection = 4,
        connection_idle_timeout = 0.5,
        route = function() return { kind = "mx", dns = dns, port = port, tls_policy = "encrypt" } end })
      for n = 1, 6 do
        assert(q:enqueue { from = "a@sender.test", rcpt = { "u" .. n .. "@reuse.test" }, body = msg(n) })
      end
      q:start()
      until_true(function() return #p.messages == 6 end, "6 messages")
      -- the idle session is closed (QUIT) while the queue runs on
      until_true(function() return p.open == 0 end, "the idle session to close")
      assert.equal(0, q.pool:stats().idle)
      local count, tls = per_session(p)
      assert.equal(2, p.sessions)
      assert.same({ 4, 2 }, count) -- max_messages_per_connection
      assert.same({ true, true }, tls)
      -- the next message after the idle time: a new session
      assert(q:enqueue { from = "a@sender.test", rcpt = { "u7@reuse.test" }, body = msg(7) })
      until_true(function() return #p.messages == 7 end, "message 7")
      assert.equal(3, p.sessions)
      until_true(function() return q:pending() == 0 end, "an empty queue")
      q:stop()
    end, 60)
  end)

  it("sends a domain's messages to Postfix's smtpd as its MX over one session", function()
    local postfix = require "spec.postfix"
    H.run(function()
      local pf = postfix.start {}
      local ok, err = pcall(function()
        local q = open(fresh_dir("reuse-postfix"), { max_connections_per_destination = 1,
          route = function() return { kind = "mx", dns = dns, port = pf.port, tls_policy = "may" } end })
        for n = 1, 4 do
          assert(q:enqueue { from = "a@sender.test", rcpt = { "r" .. n .. "@pf.test" }, body = msg(n) })
        end
        q:start()
        until_true(function() return q:pending() == 0 end, "an empty queue")
        q:stop() -- QUIT on the kept session
        until_true(function() return pf:logtext():find("disconnect from", 1, true) end, "smtpd's disconnect line")
        local log = pf:logtext()
        -- smtpd's summary per session (the one without MAIL is the
        -- start's port probe): one session, four transactions, QUIT
        local sessions = {}
        for summary in log:gmatch("disconnect from [^\n]*") do
          if summary:find(" mail=", 1, true) then sessions[#sessions + 1] = summary end
        end
        assert.equal(1, #sessions, log)
        assert.matches("ehlo=1 mail=4 rcpt=4 data=4 rset=3 quit=1", sessions[1], 1, true)
        assert.equal(4, #pf:queue("hold"))
      end)
      pf:stop()
      assert(ok, err)
    end, 90)
  end)

  it("sends the \"relayed\" notice for an MX without DSN, none for one with it", function()
    H.run(function()
      local plain, port = peer("127.0.0.41:0") -- mx.reuse.test, no DSN
      local with_dsn, dsn_port = peer("127.0.0.42:0", { dsn = true }) -- mx.dsn.test
      local back, back_port = peer("127.0.0.1:0")
      local q = open(fresh_dir("mx-relayed"), { route = function(r)
        if r.address:find("@sender%.test$") then
          return { kind = "smarthost", host = "127.0.0.1", port = back_port, tls = "none" }
        end
        return { kind = "mx", dns = dns, port = r.address:find("@dsn%.test$") and dsn_port or port, tls_policy = "may" }
      end })
      assert(q:enqueue { from = "a@sender.test", rcpt = { { address = "x@reuse.test", notify = "SUCCESS" },
        { address = "y@dsn.test", notify = "SUCCESS" } }, body = msg(1) })
      q:start()
      until_true(function() return #back.messages == 1 and q:pending() == 0 end, "the notice")
      q:stop()
      assert.equal(1, #plain.messages)
      assert.equal(1, #with_dsn.messages)
      assert.is_true(with_dsn.messages[1].rcpt_params[1].notify.success)
      assert.equal(1, #back.messages) -- for x only
      assert.equal("", back.messages[1].from)
      local d = parse_dsn(back.messages[1].data)
      assert.equal(1, #d.recipients)
      assert.equal("rfc822; x@reuse.test", d.recipients[1]["Final-Recipient"])
      assert.equal("relayed", d.recipients[1].Action)
      assert.equal("dns; mx.reuse.test", d.recipients[1]["Remote-MTA"])
    end, 60)
  end)

  it("caps a route's sessions at its max_messages_per_connection (MX and smarthost)", function()
    H.run(function()
      local mxp, mx_port = peer("127.0.0.41:0")
      local smart, smart_port = peer("127.0.0.1:0")
      local q = open(fresh_dir("route-cap"), { max_connections_per_destination = 1, connection_idle_timeout = 30,
        route = function(r)
          if r.address:find("@reuse%.test$") then
            return { kind = "mx", dns = dns, port = mx_port, tls_policy = "none", max_messages_per_connection = 3 }
          end
          return { kind = "smarthost", host = "127.0.0.1", port = smart_port, tls = "none",
            max_messages_per_connection = 2 }
        end })
      for n = 1, 9 do
        local to = n <= 4 and ("m" .. n .. "@reuse.test") or ("s" .. n .. "@far.test")
        assert(q:enqueue { from = "a@sender.test", rcpt = { to }, body = msg(n) })
      end
      q:start()
      until_true(function() return q:pending() == 0 end, "an empty queue")
      q:stop()
      assert.same({ 3, 1 }, (per_session(mxp)))
      assert.same({ 2, 2, 1 }, (per_session(smart)))
    end, 60)
  end)

  it("reuses a session only for the domain and the TLS policy it was verified for", function()
    H.run(function()
      local p, port = peer("127.0.0.41:0", { tls = true })
      -- local parts "plain..." go without TLS, the others under encrypt;
      -- other.test has the same MX host as reuse.test
      local q = open(fresh_dir("reuse-key"), { max_connections_per_destination = 1, connection_idle_timeout = 30,
        route = function(r)
          return { kind = "mx", dns = dns, port = port, tls_policy = r.address:find("^plain") and "none" or "encrypt" }
        end })
      local rcpts = { "a@reuse.test", "b@other.test", "plain1@reuse.test", "c@reuse.test", "d@other.test",
        "plain2@reuse.test" }
      for n, r in ipairs(rcpts) do
        assert(q:enqueue { from = "a@sender.test", rcpt = { r }, body = msg(n) })
      end
      q:start()
      until_true(function() return #p.messages == 6 end, "6 messages")
      until_true(function() return q:pending() == 0 end, "an empty queue")
      -- three sessions: reuse.test under encrypt, other.test under
      -- encrypt, reuse.test without TLS; each took its two messages
      assert.equal(3, p.sessions)
      local by = {}
      for _, m in ipairs(p.messages) do
        local key = m.rcpt[1]:match("@(.*)$") .. (m.rcpt[1]:find("^plain") and "/none" or "/encrypt")
        by[key] = by[key] or {}
        by[key][m.session] = (by[key][m.session] or 0) + 1
        assert.equal(not m.rcpt[1]:find("^plain"), m.tls)
      end
      local function only(t)
        local k, v = next(t)
        assert.is_nil(next(t, k))
        return v
      end
      assert.equal(2, only(by["reuse.test/encrypt"]))
      assert.equal(2, only(by["other.test/encrypt"]))
      assert.equal(2, only(by["reuse.test/none"]))
      assert.equal(3, q.pool:stats().idle)
      q:stop()
      until_true(function() return p.open == 0 end, "the sessions to close on stop")
    end, 60)
  end)
end)

describe("queue success notices", function()
  it("sends a \"relayed\" notice when the next hop lacks DSN, nothing when it takes the parameters", function()
    H.need("python3 aiosmtpd")
    H.run(function()
      os.execute("mkdir -p " .. shquote(TMP))
      local with_dsn, dsn_port = peer("127.0.0.1:0", { dsn = true })
      local aio_port, aio_log = fake.aiosmtpd("") -- advertises no DSN
      local back, back_port = peer("127.0.0.1:0") -- where the sender's notices go
      local q = open(fresh_dir("relayed"), { route = function(r)
        local host = r.address:match("@(.*)$")
        local port = host == "dsn.test" and dsn_port or host == "nodsn.test" and aio_port or back_port
        return { kind = "smarthost", host = "127.0.0.1", port = port, tls = "none" }
      end })
      assert(q:enqueue { from = "alice@sender.test", envid = "ENV-77", ret = "hdrs",
        rcpt = { { address = "bob@nodsn.test", notify = "SUCCESS,FAILURE", orcpt = "rfc822;Bob+Tag@nodsn.test" },
                 { address = "carol@nodsn.test" } }, -- no NOTIFY: no success notice
        body = msg(1) })
      assert(q:enqueue { from = "alice@sender.test", envid = "ENV-78", ret = "full",
        rcpt = { { address = "dave@dsn.test", notify = "SUCCESS", orcpt = "rfc822;Dave+x=y@dsn.test" } },
        body = msg(2) })
      q:start()
      until_true(function() return #fake.messages(aio_log) == 1 and #with_dsn.messages == 1 end, "both relayed")
      until_true(function() return #back.messages == 1 end, "the relayed notice")
      until_true(function() return q:pending() == 0 end, "an empty queue")
      q:stop()
      -- the next hop with DSN got NOTIFY, ORCPT, RET and ENVID
      local m = with_dsn.messages[1]
      assert.same({ "dave@dsn.test" }, m.rcpt)
      assert.equal("FULL", tostring(m.params.ret):upper())
      assert.equal("ENV-78", m.params.envid)
      assert.is_true(m.rcpt_params[1].notify.success)
      assert.equal("rfc822", m.rcpt_params[1].orcpt.type:lower())
      assert.equal("Dave+x=y@dsn.test", m.rcpt_params[1].orcpt.addr) -- went as xtext, came back whole
      -- the one without DSN: the message went, and the notice came back
      -- for bob only, from the null sender, Action: relayed
      local aio = fake.messages(aio_log)[1]
      assert.same({ "bob@nodsn.test", "carol@nodsn.test" }, aio.to)
      assert.equal(1, #back.messages) -- nothing for dave: dsn.test took over
      local n = back.messages[1]
      assert.equal("", n.from)
      assert.same({ "alice@sender.test" }, n.rcpt)
      local d = parse_dsn(n.data)
      assert.same({}, d.defects)
      assert.equal("delivery-status", d.report_type)
      assert.equal("ENV-77", d.per_message["Original-Envelope-Id"])
      assert.equal("dns; relay.test", d.per_message["Reporting-MTA"])
      assert.equal(1, #d.recipients)
      assert.equal("relayed", d.recipients[1].Action)
      assert.equal("rfc822; bob@nodsn.test", d.recipients[1]["Final-Recipient"])
      assert.equal("rfc822; Bob+Tag@nodsn.test", d.recipients[1]["Original-Recipient"])
      assert.matches("^2%.%d+%.%d+$", d.recipients[1].Status)
      assert.matches("^smtp; 250", d.recipients[1]["Diagnostic-Code"])
      assert.equal("text/rfc822-headers", d.attached.content_type)
      assert.equal("1", d.attached.headers.Subject)
    end, 60)
  end)

  it("passes NOTIFY and ORCPT on to Postfix's smtpd, which advertises DSN, and sends no notice", function()
    local postfix = require "spec.postfix"
    H.run(function()
      local back, back_port = peer("127.0.0.1:0")
      local pf = postfix.start {}
      local ok, err = pcall(function()
        local q = open(fresh_dir("postfix-dsn"), { route = function(r)
          local port = r.address:find("@pf%.test$") and pf.port or back_port
          return { kind = "smarthost", host = "127.0.0.1", port = port, tls = "none" }
        end })
        assert(q:enqueue { from = "alice@sender.test", envid = "PF-1",
          rcpt = { { address = "erin@pf.test", notify = "SUCCESS", orcpt = "rfc822;erin@pf.test" } }, body = msg(3) })
        q:start()
        until_true(function() return q:pending() == 0 end, "an empty queue")
        q:stop()
        local held = pf:queue("hold")
        assert.equal(1, #held)
        assert.same({ "erin@pf.test" }, held[1].recipients)
        -- Postfix keeps the DSN parameters in its queue file
        local pc = assert(io.popen("postcat -c " .. shquote(pf.conf) .. " -e "
          .. shquote(pf.dir .. "/queue/hold/" .. held[1].id) .. " 2>&1"))
        local text = pc:read("a")
        pc:close()
        assert.matches("notify_flags=2\n", text, 1, true) -- SUCCESS
        assert.matches("dsn_orig_rcpt=rfc822;erin@pf.test", text, 1, true)
        assert.matches("envelope_id=PF-1", text, 1, true)
        assert.equal(0, #back.messages)
      end)
      pf:stop()
      assert(ok, err)
    end, 90)
  end)
end)

describe("queue mail loops", function()
  it("bounces a message with more Received fields than max_hops (5.4.6) and delivers one at the limit", function()
    H.run(function()
      local p, port = peer("127.0.0.1:0")
      local received = {}
      for i = 1, 51 do
        received[i] = ("Received: from hop%d.test (hop%d.test [192.0.2.%d])\r\n\tby relay.test; "
          .. "Tue, 1 Dec 2026 10:00:00 +0000\r\n"):format(i, i, i % 250)
      end
      local q = open(fresh_dir("loop"), { route = function()
        return { kind = "smarthost", host = "127.0.0.1", port = port, tls = "none" }
      end })
      assert.equal(50, q.opts.max_hops) -- the default: Postfix's hopcount_limit
      local looping = table.concat(received) .. msg(1)
      local at_limit = table.concat(received, "", 1, 50) .. msg(2)
      assert(q:enqueue { from = "alice@sender.test", rcpt = { "bob@far.test", "carol@far.test" }, body = looping })
      assert(q:enqueue { from = "alice@sender.test", rcpt = { "dave@far.test" }, body = at_limit })
      assert(q:enqueue { from = "", rcpt = { "erin@far.test" }, body = looping }) -- a looping bounce: no notice
      q:start()
      until_true(function() return q:pending() == 0 end, "an empty queue")
      q:stop()
      -- the one at the limit went; the loop came back as one notice
      assert.equal(2, #p.messages)
      local delivered, notice = delivered_and_notice(p.messages)
      assert.same({ "dave@far.test" }, delivered.rcpt)
      assert.same({ "alice@sender.test" }, notice.rcpt)
      local d = parse_dsn(notice.data)
      assert.same({}, d.defects)
      assert.equal(2, #d.recipients)
      for i, who in ipairs { "bob@far.test", "carol@far.test" } do
        assert.equal("rfc822; " .. who, d.recipients[i]["Final-Recipient"])
        assert.equal("failed", d.recipients[i].Action)
        assert.equal("5.4.6", d.recipients[i].Status)
        assert.matches("Too many hops: 51 Received", d.recipients[i]["Diagnostic-Code"], 1, true)
        assert.is_nil(d.recipients[i]["Remote-MTA"])
      end
    end, 60)
  end)

  it("counts the Received fields of mail that came in over SMTP, the front's own included", function()
    H.run(function()
      local client = require "luasmtp.client"
      local p, port = peer("127.0.0.1:0")
      local q = open(fresh_dir("loop-front"), { max_hops = 3, route = function()
        return { kind = "smarthost", host = "127.0.0.1", port = port, tls = "none" }
      end })
      local front = assert(server.new { listen = { "127.0.0.1:0" }, hostname = "front.test", log_level = "error",
        plugins = { server.plugins.received(), queue.plugin(q) } })
      local fport = front:addresses()[1].port
      local function send(body)
        local res, token, err = client.send { host = "127.0.0.1", port = fport, tls = "none", helo = "c.test",
          from = "alice@sender.test", to = { "bob@far.test" }, body = body }
        assert(res and res.ok, tostring(token) .. " " .. tostring(err))
      end
      -- two fields and the front's: 3, at the limit
      send("Received: from a\r\nreceived : from b\r\n" .. msg(1))
      -- three and the front's: 4, a loop
      send("Received: from a\r\nReceived: from b\r\nRECEIVED: from c\r\n" .. msg(2))
      q:start()
      until_true(function() return q:pending() == 0 end, "an empty queue")
      q:stop()
      front:close()
      assert.equal(2, #p.messages)
      local delivered, notice = delivered_and_notice(p.messages)
      assert.same({ "bob@far.test" }, delivered.rcpt)
      assert.matches("Message%-ID: <q1@", delivered.data)
      assert.same({ "alice@sender.test" }, notice.rcpt)
      assert.matches("Too many hops: 4 Received", notice.data, 1, true)
    end, 60)
  end)

  it("takes its limit from max_hops", function()
    H.run(function()
      local p, port = peer("127.0.0.1:0")
      local q = open(fresh_dir("loop-limit"), { max_hops = 2, route = function()
        return { kind = "smarthost", host = "127.0.0.1", port = port, tls = "none" }
      end })
      local three = "Received: from a\r\nReceived: from b\r\nreceived : from c\r\n" .. msg(1)
      assert(q:enqueue { from = "alice@sender.test", rcpt = { "bob@far.test" }, body = three })
      q:start()
      until_true(function() return q:pending() == 0 end, "an empty queue")
      q:stop()
      assert.equal(1, #p.messages)
      assert.equal("", p.messages[1].from)
      assert.matches("Status: 5.4.6", p.messages[1].data, 1, true)
    end, 30)
  end)
end)

describe("queue directory lock", function()
  it("lets one queue own a directory; a second one fails clearly, the tool still works beside it", function()
    local dir = fresh_dir("lock")
    local q = open(dir)
    local q2, token, detail = queue.open { dir = dir }
    assert.is_nil(q2)
    assert.equal("busy", token)
    assert.matches("queue directory .* is in use by another queue %(.*lock is held by another process: pid "
      .. math.tointeger(require("luasmtp.core").getpid()) .. "%)", detail)
    -- another process: the same refusal, with the holder's pid
    local code = ([[
local queue = require "luasmtp.queue"
local q, token, detail = queue.open { dir = %q }
io.write(tostring(q), " ", tostring(token), " ", tostring(detail))
]]):format(dir)
    H.writefile(dir .. "/second.lua", code)
    local p = assert(io.popen("lua5.4 " .. shquote(dir .. "/second.lua") .. " 2>&1"))
    local out = p:read("a")
    p:close()
    assert.matches("^nil busy queue directory", out)
    assert.matches("pid " .. math.tointeger(require("luasmtp.core").getpid()), out, 1, true)
    -- the tool beside the running owner: list and hold work
    local id = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg(1) })
    local tp = assert(io.popen("lua5.4 " .. shquote(H.root .. "/bin/luasmtp") .. " queue --dir " .. shquote(dir)
      .. " hold " .. id .. " 2>&1"))
    local text = tp:read("a")
    assert(tp:close(), text)
    assert.matches(id .. ": hold", text, 1, true)
    q:read_control()
    assert.is_true(q.entries[id].held)
    -- once the owner closes, the directory can be opened again
    q:close()
    local q3 = assert(queue.open { dir = dir })
    assert.is_true(q3.entries[id].held)
    q3:close()
  end)

  it("is released when the owning process dies (kill -9)", function()
    H.run(function()
      local dir = fresh_dir("lock-kill")
      H.writefile(dir .. "/owner.lua", ([[
local luasmtp = require "luasmtp"
local queue = require "luasmtp.queue"
local q = assert(queue.open { dir = %q })
io.stdout:write("open\n") io.stdout:flush()
luasmtp.spawn(function() luasmtp.sleep(30) q:close() end)
luasmtp.run()
]]):format(dir .. "/q"))
      local log = dir .. "/owner.log"
      local pid = H.start("exec lua5.4 " .. shquote(dir .. "/owner.lua"), log)
      until_true(function()
        local f = io.open(log)
        local t = f and f:read("a") or ""
        if f then f:close() end
        return t:find("open")
      end, "the owner to open the queue")
      local q, token = queue.open { dir = dir .. "/q" }
      assert.is_nil(q)
      assert.equal("busy", token)
      os.execute("kill -9 " .. math.tointeger(pid))
      assert.is_true(H.wait_pid(pid, 10))
      local q2 = assert(queue.open { dir = dir .. "/q" })
      q2:close()
    end, 40)
  end)
end)
