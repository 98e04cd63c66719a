-- MX delivery over kept sessions (delivery.deliver with `sessions`, a
-- client pool): the second message to a domain goes over the session
-- the first one opened, carrying what that session was verified under
-- (DANE with the DNSSEC rig); another policy level or domain gets its
-- own; a kept session the server has closed gives way to a new one.
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local client = require "luasmtp.client"
local delivery = require "luasmtp.delivery"
local dns = require "luasmtp.dns"
local H = require "spec.helper"
local fake = require "spec.fake_smtp"

local BODY = "From: a@sender.test\r\nSubject: reuse\r\n\r\nhello\r\n"

local function trail_text(r)
  local out = {}
  for _, step in ipairs(r.trail or {}) do out[#out + 1] = step.event .. ": " .. tostring(step.text) end
  return table.concat(out, "\n")
end

after_each(fake.cleanup)

describe("delivery over kept sessions", function()
  local dns_pid, resolver_port
  lazy_setup(function()
    H.need("python3")
    dns_pid, resolver_port = H.fake_dns("127.0.0.1", { "mx:kept.test=10:mx.kept.test", "mx:second.test=10:mx.kept.test",
      "mx.kept.test=127.0.0.1" }, "delivery_reuse", 120)
  end)
  lazy_teardown(function()
    dns.configure {}
    if dns_pid then H.kill(dns_pid) end
  end)
  before_each(function()
    assert(dns.configure { servers = { "127.0.0.1:" .. resolver_port }, timeout = 2, tries = 2 })
  end)

  local function send(port, sessions, to, level)
    return delivery.deliver { from = "a@sender.test", to = { to }, body = BODY, port = port, dns = dns,
      tls_policy = level or "may", sessions = sessions, helo = "relay.test" }
  end

  it("sends the next message to the domain over the kept session, without new lookups", function()
    H.run(function()
      local srv, port, log = fake.start {}
      local pool = client.pool { idle_timeout = 30 }
      local r1 = send(port, pool, "a@kept.test").recipients[1]
      assert.is_true(r1.ok, trail_text(r1))
      assert.is_false(r1.reused)
      assert.is_true(r1.dsn) -- the fake server advertises DSN: the queue sends no "relayed" notice
      assert.equal(1, pool:stats().idle)
      local r2 = send(port, pool, "b@kept.test").recipients[1]
      assert.is_true(r2.ok, trail_text(r2))
      assert.is_true(r2.reused)
      assert.is_true(r2.dsn)
      assert.equal("mx.kept.test", r2.mx)
      assert.equal("127.0.0.1", r2.ip)
      assert.equal(r1.tls_policy, r2.tls_policy)
      assert.equal("reuse", r2.trail[1].event)
      assert.matches("session reused %(message 2 on it%), verified for kept.test", r2.trail[1].text)
      for _, step in ipairs(r2.trail) do
        assert.is_not.equal("destinations", step.event) -- no MX lookup
        assert.is_not.equal("connect", step.event)
      end
      -- another domain on the same host, and another level: sessions of their own
      local r3 = send(port, pool, "c@second.test").recipients[1]
      assert.is_true(r3.ok, trail_text(r3))
      assert.is_false(r3.reused)
      local r4 = send(port, pool, "d@kept.test", "none").recipients[1]
      assert.is_true(r4.ok, trail_text(r4))
      assert.is_false(r4.reused)
      assert.equal(3, log.connections)
      assert.equal(4, #log.messages)
      -- RSET went between the two messages of the first session
      assert.same({ "EHLO relay.test", "MAIL FROM:<a@sender.test>", "RCPT TO:<a@kept.test>", "DATA",
        "RSET", "MAIL FROM:<a@sender.test>", "RCPT TO:<b@kept.test>", "DATA" }, (function()
          local cmds = {}
          for _, c in ipairs(log.sessions[1].commands) do cmds[#cmds + 1] = c:gsub(" SIZE=%d+", "") end
          return cmds
        end)())
      pool:close()
      srv:close()
    end, 30)
  end)

  it("closes a kept session when its idle time has run out and forgets the domain", function()
    H.run(function()
      local srv, port, log = fake.start {}
      local pool = client.pool { idle_timeout = 0.2 }
      assert.is_true(send(port, pool, "a@kept.test").recipients[1].ok)
      local deadline = luasmtp.update_now() + 10
      local function quit_seen()
        local cmds = log.sessions[1].commands
        return cmds[#cmds] == "QUIT"
      end
      while not quit_seen() and luasmtp.update_now() < deadline do luasmtp.sleep(0.05) end
      assert.is_true(quit_seen(), "the pool sent QUIT")
      assert.equal(0, pool:stats().idle)
      assert.is_nil(next(pool.kept))
      -- the next message opens a new session
      local r = send(port, pool, "b@kept.test").recipients[1]
      assert.is_true(r.ok)
      assert.is_false(r.reused)
      assert.equal(2, log.connections)
      pool:close()
      srv:close()
    end, 30)
  end)

  it("gives way to a new session when the kept one was closed before the message went", function()
    H.run(function()
      -- the server drops the session at the RSET that starts a second transaction
      local srv, port, log = fake.start { on = { RSET = function() return "close" end } }
      local pool = client.pool { idle_timeout = 30 }
      assert.is_true(send(port, pool, "a@kept.test").recipients[1].ok)
      local r = send(port, pool, "b@kept.test").recipients[1]
      assert.is_true(r.ok, trail_text(r))
      assert.is_false(r.reused)
      assert.matches("the kept session failed", trail_text(r), 1, true)
      assert.equal(2, log.connections)
      assert.equal(2, #log.messages)
      assert.same({ "b@kept.test" }, log.messages[2].rcpts)
      pool:close()
      srv:close()
    end, 30)
  end)
end)

describe("delivery over kept sessions with DANE", function()
  local rig_mod = require "spec.dnssec_rig"
  local rig, port

  lazy_setup(function()
    H.need("nsd", "unbound", "ldnsutils")
    port = H.free_port()
    rig = rig_mod.start {
      records = {
        "reuse-dane IN MX 10 mx-reuse",
        "mx-reuse IN A 127.0.0.34",
        rig_mod.tlsa_record("_" .. port .. "._tcp.mx-reuse", 3, 1, 1, H.certs() .. "/server.pem"),
      },
    }
  end)
  lazy_teardown(function()
    dns.configure {}
    if rig then rig:stop() end
  end)

  it("carries the DANE verification of the session to the next message; another level opens its own", function()
    assert(dns.configure { servers = { rig.server } })
    H.run(function()
      local sessions, messages = 0, 0
      local srv = assert(server.new { listen = { "127.0.0.34:" .. port }, hostname = "mx.test", log_level = "error",
        tls = (H.tls_contexts()),
        hooks = { on_connect = function() sessions = sessions + 1 end,
          on_data = function() messages = messages + 1 end } })
      local pool = client.pool { idle_timeout = 30 }
      local function send(to, level)
        return delivery.deliver { from = "a@sender.test", to = { to }, body = BODY, port = port,
          tls_policy = level, sessions = pool, helo = "relay.test", timeouts = { connect = 10 } }.recipients[1]
      end
      local r1 = send("a@reuse-dane.example.test", "dane-only")
      assert.is_true(r1.ok, trail_text(r1))
      assert.is_table(r1.dane)
      assert.equal(3, r1.dane.matched.usage)
      assert.is_false(r1.dsn) -- our server without dsn = true
      local r2 = send("b@reuse-dane.example.test", "dane-only")
      assert.is_true(r2.ok, trail_text(r2))
      assert.is_true(r2.reused)
      assert.equal(r1.tls_policy, r2.tls_policy)
      assert.equal(r1.tls_why, r2.tls_why)
      assert.same(r1.dane.matched, r2.dane.matched)
      assert.equal(1, sessions)
      -- "dane" is another policy: verified again on a session of its own
      local r3 = send("c@reuse-dane.example.test", "dane")
      assert.is_true(r3.ok, trail_text(r3))
      assert.is_false(r3.reused)
      assert.is_table(r3.dane)
      assert.equal(2, sessions)
      assert.equal(3, messages)
      pool:close()
      srv:close()
    end, 60)
  end)
end)
