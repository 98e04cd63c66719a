-- Delivery to MX hosts: destinations, Happy Eyeballs, TLS policy.
-- Unit tests run against a mock resolver; the sessions are real, with
-- the project's own server as MX host on loopback addresses.
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local delivery = require "luasmtp.delivery"
local destinations = require "luasmtp.delivery.destinations"
local policy = require "luasmtp.delivery.policy"
local happy = require "luasmtp.delivery.connect"
local mtasts = require "luasmtp.delivery.mtasts"
local tlsrpt = require "luasmtp.delivery.tlsrpt"
local H = require "spec.helper"

-- A mock resolver over a table: zone[name] = { secure = bool (default
-- zone.secure), cname = target, MX = {...}, A = {...}, AAAA = {...},
-- TLSA = {...}, servfail = { qtype = true } }. Names not in the table
-- are NXDOMAIN.
local function mock_dns(zone)
  local log = {}
  local r = { log = log }
  function r.query(name, qtype)
    log[#log + 1] = qtype .. " " .. name
    local z = zone[name]
    local secure = zone.secure
    if type(z) == "table" and z.secure ~= nil then secure = z.secure end
    if z == nil then
      return { name = name, qtype = qtype, rcode = "NXDOMAIN", authentic = secure or false, answers = {} }
    end
    if z.servfail and z.servfail[qtype] then return nil, "dns", "SERVFAIL" end
    if z.cname then
      return { name = name, qtype = qtype, rcode = "NOERROR", authentic = secure or false, answers = {},
        cname = z.cname }
    end
    return { name = name, qtype = qtype, rcode = "NOERROR", authentic = secure or false, answers = z[qtype] or {} }
  end
  return r
end

local function mx(pref, host) return { preference = pref, exchange = host } end

local function names(dest)
  local out = {}
  for i, h in ipairs(dest.hosts) do out[i] = h.name end
  return out
end

describe("delivery destinations", function()
  it("sorts MX records by preference, in random order among equal ones", function()
    local dns = mock_dns { ["example.test"] = { MX = { mx(20, "c.example.test"), mx(10, "a.example.test"),
      mx(10, "b.example.test"), mx(30, "d.example.test.") } } }
    local seen = {}
    for _ = 1, 60 do
      local dest = assert(destinations.destinations("Example.TEST.", dns))
      assert.is_true(dest.have_mx)
      local n = names(dest)
      assert.equal("c.example.test", n[3])
      assert.equal("d.example.test", n[4])
      seen[n[1] .. "," .. n[2]] = true
    end
    assert.is_true(seen["a.example.test,b.example.test"])
    assert.is_true(seen["b.example.test,a.example.test"])
  end)

  it("uses the domain itself when it has no MX (implicit MX)", function()
    local dns = mock_dns { ["example.test"] = { A = { "192.0.2.1" } } }
    local dest = assert(destinations.destinations("example.test", dns))
    assert.is_false(dest.have_mx)
    assert.same({ "example.test" }, names(dest))
    assert.is_true(dest.hosts[1].implicit)
  end)

  it("refuses a null MX permanently with a clear error (RFC 7505)", function()
    local dns = mock_dns { ["example.test"] = { MX = { mx(0, ".") } } }
    local dest, token, err = destinations.destinations("example.test", dns)
    assert.is_nil(dest)
    assert.equal("nomail", token)
    assert.is_true(err.permanent)
    assert.is_true(err.null_mx)
    assert.matches("does not accept mail %(null MX", tostring(err))
  end)

  it("fails permanently for a domain that does not exist, temporarily on a DNS failure", function()
    local dns = mock_dns { ["broken.test"] = { servfail = { MX = true } } }
    local _, token, err = destinations.destinations("nowhere.test", dns)
    assert.equal("dns", token)
    assert.is_true(err.permanent)
    assert.matches("does not exist", tostring(err))
    local _, token2, err2 = destinations.destinations("broken.test", dns)
    assert.equal("dns", token2)
    assert.is_false(err2.permanent)
    assert.matches("SERVFAIL", tostring(err2))
  end)

  it("follows CNAME chains and tracks authenticity per step", function()
    local dns = mock_dns {
      secure = true,
      ["example.test"] = { cname = "alias.insecure.test" },
      ["alias.insecure.test"] = { cname = "final.test", secure = false },
      ["final.test"] = { MX = { mx(10, "mx.final.test") } },
    }
    local dest = assert(destinations.destinations("example.test", dns))
    assert.equal("final.test", dest.expanded)
    assert.is_true(dest.authentic)
    assert.is_false(dest.expanded_authentic)
    assert.same({ "mx.final.test" }, names(dest))
    assert.equal(3, #dest.cnames)
    assert.is_false(dest.cnames[2].authentic)
  end)

  it("refuses CNAME loops and chains that are too long", function()
    local loop = mock_dns { ["a.test"] = { cname = "b.test" }, ["b.test"] = { cname = "a.test" } }
    local _, token, err = destinations.destinations("a.test", loop)
    assert.equal("dns", token)
    assert.matches("CNAME loop", tostring(err))
    assert.is_false(err.permanent)
    local zone = {}
    for i = 1, 20 do zone["c" .. i .. ".test"] = { cname = "c" .. (i + 1) .. ".test" } end
    local _, _, err2 = destinations.destinations("c1.test", mock_dns(zone))
    assert.matches("more than 10 CNAMEs", tostring(err2))
  end)

  it("delivers to IP literals directly", function()
    local dns = mock_dns {}
    local d4 = assert(destinations.destinations("[192.0.2.1]", dns))
    assert.is_true(d4.literal)
    assert.equal("192.0.2.1", d4.hosts[1].address)
    local d6 = assert(destinations.destinations("[IPv6:2001:DB8::1]", dns))
    assert.equal("2001:db8::1", d6.hosts[1].address)
    assert.equal(0, #dns.log)
    local info = assert(destinations.addresses(d6.hosts[1], dns))
    assert.same({ { address = "2001:db8::1", family = "inet6" } }, info.addresses)
    for _, bad in ipairs { "[192.0.2.300]", "[2001:db8::1]", "[IPv6:zz]", "[]" } do
      local d, token, err = destinations.destinations(bad, dns)
      assert.is_nil(d, bad)
      assert.equal("invalid", token)
      assert.is_true(err.permanent)
    end
  end)

  it("interleaves IPv6 and IPv4 addresses and follows the host's CNAMEs", function()
    local dns = mock_dns {
      secure = true,
      ["mx.example.test"] = { cname = "host.example.test" },
      ["host.example.test"] = { A = { "192.0.2.1", "192.0.2.2", "192.0.2.3" }, AAAA = { "2001:db8::1" } },
    }
    local info = assert(destinations.addresses({ name = "mx.example.test" }, dns))
    assert.equal("host.example.test", info.expanded)
    assert.is_true(info.authentic)
    assert.is_true(info.expanded_authentic)
    local list = {}
    for i, a in ipairs(info.addresses) do list[i] = a.address end
    assert.same({ "2001:db8::1", "192.0.2.1", "192.0.2.2", "192.0.2.3" }, list)
    local v4 = assert(destinations.addresses({ name = "mx.example.test" }, dns, { family = "inet" }))
    assert.equal(3, #v4.addresses)
  end)

  it("asks for AAAA and A at once, and an error in one lookup only costs that family", function()
    H.run(function()
      local events = {}
      local resolver = { query = function(name, qtype)
        events[#events + 1] = "ask " .. qtype
        luasmtp.sleep(0.05)
        events[#events + 1] = "got " .. qtype
        if name == "broken.test" and qtype == "A" then error("resolver bug") end
        return { rcode = "NOERROR", answers = qtype == "A" and { "192.0.2.7" } or { "2001:db8::7" } }
      end }
      local info = assert(destinations.addresses({ name = "both.test" }, resolver))
      assert.equal(2, #info.addresses)
      -- both questions were out before either answer came back
      assert.same({ "ask", "ask" }, { events[1]:match("^%a+"), events[2]:match("^%a+") })
      events = {}
      info = assert(destinations.addresses({ name = "broken.test" }, resolver))
      assert.same({ { address = "2001:db8::7", family = "inet6" } }, info.addresses)
    end)
  end)

  it("reports a host without addresses permanently, a failed address lookup temporarily", function()
    local dns = mock_dns { ["empty.test"] = {}, ["half.test"] = { A = { "192.0.2.9" }, servfail = { AAAA = true } },
      ["down.test"] = { servfail = { A = true, AAAA = true } } }
    local _, _, err = destinations.addresses({ name = "empty.test" }, dns)
    assert.is_true(err.permanent)
    assert.matches("no address", tostring(err))
    local half = assert(destinations.addresses({ name = "half.test" }, dns))
    assert.equal("192.0.2.9", half.addresses[1].address)
    assert.is_false(half.authentic) -- one lookup failed: no DANE on this host
    local _, _, err2 = destinations.addresses({ name = "down.test" }, dns)
    assert.is_false(err2.permanent)
  end)
end)

describe("delivery TLS policy", function()
  local secure_dest = { domain = "example.test", expanded = "example.test", have_mx = true,
    authentic = true, expanded_authentic = true }
  local insecure_dest = { domain = "example.test", expanded = "example.test", have_mx = true,
    authentic = false, expanded_authentic = false }
  local host = { name = "mx.example.test", expanded = "mx.example.test", authentic = true, expanded_authentic = true }
  local ee = { usage = 3, selector = 1, mtype = 1, data = string.rep("\1", 32) }

  it("counts only the TLSA records DANE for SMTP can use", function()
    local pkix_ee = { usage = 1, selector = 1, mtype = 1, data = string.rep("\1", 32) }
    local short = { usage = 3, selector = 1, mtype = 1, data = string.rep("\1", 31) }
    local dns = mock_dns { secure = true,
      ["_25._tcp.mx.example.test"] = { TLSA = { ee, pkix_ee, short,
        { usage = 2, selector = 0, mtype = 2, data = string.rep("\2", 64) } } },
      ["_26._tcp.mx.example.test"] = { TLSA = { pkix_ee, short,
        { usage = 3, selector = 2, mtype = 1, data = string.rep("\1", 32) } } } }
    local t = assert(policy.tlsa(secure_dest, host, 25, dns))
    assert.same({ "usable", 2, 4 }, { t.state, t.usable, #t.records })
    t = assert(policy.tlsa(secure_dest, host, 26, dns))
    assert.same({ "unusable", 0 }, { t.state, t.usable })
  end)

  it("looks TLSA up at the port, and reports unusable, missing and failed lookups", function()
    local dns = mock_dns {
      secure = true,
      ["_2525._tcp.mx.example.test"] = { TLSA = { ee } },
      ["_25._tcp.mx.example.test"] = { TLSA = { { usage = 1, selector = 1, mtype = 1, data = string.rep("\1", 32) } } },
      ["_26._tcp.mx.example.test"] = { servfail = { TLSA = true } },
      ["_27._tcp.mx.example.test"] = { TLSA = { ee }, secure = false },
    }
    local usable = assert(policy.tlsa(secure_dest, host, 2525, dns))
    assert.equal("usable", usable.state)
    assert.equal("mx.example.test", usable.base)
    assert.same({ "mx.example.test", "example.test" }, usable.names)
    assert.equal("unusable", assert(policy.tlsa(secure_dest, host, 25, dns)).state)
    local none, token, err = policy.tlsa(secure_dest, host, 26, dns)
    assert.is_nil(none)
    assert.equal("dns", token)
    assert.matches("TLSA lookup", tostring(err))
    -- records that are not DNSSEC-signed do not count
    assert.equal("none", assert(policy.tlsa(secure_dest, host, 27, dns)).state)
    assert.equal("none", assert(policy.tlsa(secure_dest, host, 28, dns)).state)
  end)

  it("prefers the TLSA records of the CNAME-expanded host when that is secure", function()
    local dns = mock_dns { secure = true,
      ["_25._tcp.real.example.test"] = { TLSA = { ee } }, ["_25._tcp.mx.example.test"] = { TLSA = { ee } } }
    local h = { name = "mx.example.test", expanded = "real.example.test", authentic = true, expanded_authentic = true }
    local t = assert(policy.tlsa(secure_dest, h, 25, dns))
    assert.equal("real.example.test", t.base)
    assert.same({ "real.example.test", "mx.example.test", "example.test" }, t.names)
    h.expanded_authentic = false
    assert.equal("mx.example.test", assert(policy.tlsa(secure_dest, h, 25, dns)).base)
  end)

  it("decides per level", function()
    local usable = { state = "usable", records = { ee }, usable = 1, base = "mx.example.test",
      qname = "_25._tcp.mx.example.test", names = { "mx.example.test" } }
    local plan = assert(policy.decide("dane", { dest = secure_dest, hostinfo = host, tlsa = usable }))
    assert.equal("dane", plan.verify)
    assert.equal("starttls", plan.tls)
    assert.equal("mx.example.test", plan.dane.base_domain)
    assert.equal("tlsa", plan.policy_type)
    plan = assert(policy.decide("dane", { dest = secure_dest, hostinfo = host,
      tlsa = { state = "unusable", qname = "_25._tcp.mx.example.test" } }))
    assert.same({ "encrypt", "starttls", false }, { plan.level, plan.tls, plan.verify })
    assert.matches("none usable", plan.why)
    local no_tlsa = { state = "none", qname = "q" }
    plan = assert(policy.decide("dane", { dest = secure_dest, hostinfo = host, tlsa = no_tlsa }))
    assert.same({ "may", "opportunistic" }, { plan.level, plan.tls })
    plan = assert(policy.decide("dane", { dest = insecure_dest, hostinfo = host }))
    assert.equal("may", plan.level)
    assert.matches("not DNSSEC%-signed", plan.why)
    local _, token, err = policy.decide("dane", { dest = secure_dest, hostinfo = host, tlsa_error = "SERVFAIL" })
    assert.equal("policy", token)
    assert.is_false(err.permanent)
    assert.matches("TLS policy dane: TLSA lookup for mx.example.test failed", tostring(err))
    assert.equal("dnssec-invalid", err.tlsrpt)
    _, _, err = policy.decide("dane-only", { dest = insecure_dest, hostinfo = host })
    assert.matches("^TLS policy dane%-only: no DANE", tostring(err))
    _, _, err = policy.decide("dane-only", { dest = secure_dest, hostinfo = host, tlsa = no_tlsa })
    assert.matches("no TLSA records", tostring(err))
    plan = assert(policy.decide("verify", { dest = insecure_dest, hostinfo = host }))
    assert.same({ "starttls", "pkix", "mx.example.test" }, { plan.tls, plan.verify, plan.servername })
    assert.equal("none", assert(policy.decide("none", { dest = insecure_dest, hostinfo = host })).tls)
    assert.equal("starttls", assert(policy.decide("encrypt", { dest = insecure_dest, hostinfo = host })).tls)
  end)

  it("applies MTA-STS when DANE does not", function()
    local sts = { mode = "enforce", mx = { "*.example.test" } }
    local plan = assert(policy.decide("dane", { dest = insecure_dest, hostinfo = host, sts = sts }))
    assert.same({ "sts-enforce", "pkix", "sts" }, { plan.level, plan.verify, plan.policy_type })
    local other = { name = "mx.elsewhere.test", authentic = false }
    local _, _, err = policy.decide("may", { dest = insecure_dest, hostinfo = other, sts = sts })
    assert.matches("TLS policy MTA%-STS enforce: MX mx.elsewhere.test is not listed", tostring(err))
    plan = assert(policy.decide("may", { dest = insecure_dest, hostinfo = host, sts = { mode = "testing", mx = {} } }))
    assert.same({ "sts-testing", "report", "opportunistic" }, { plan.level, plan.verify, plan.tls })
    assert.is_true(plan.sts_mx_mismatch)
    -- DANE wins over MTA-STS
    local usable = { state = "usable", records = { ee }, usable = 1, base = "mx.example.test", qname = "q",
      names = {} }
    plan = assert(policy.decide("dane", { dest = secure_dest, hostinfo = host, tlsa = usable, sts = sts }))
    assert.equal("dane", plan.verify)
    assert.equal("none", assert(policy.decide("none", { dest = insecure_dest, hostinfo = host, sts = sts })).tls)
  end)

  it("lets REQUIRETLS go only to a verified next hop named by secure DNS or MTA-STS", function()
    local _, _, err = policy.decide("may", { dest = insecure_dest, hostinfo = host, requiretls = true })
    assert.matches("TLS policy REQUIRETLS: the MX records of example.test are not DNSSEC%-signed", tostring(err))
    local plan = assert(policy.decide("may", { dest = secure_dest, hostinfo = host, requiretls = true }))
    assert.same({ "starttls", "pkix" }, { plan.tls, plan.verify })
    plan = assert(policy.decide("may", { dest = insecure_dest, hostinfo = host, requiretls = true,
      sts = { mode = "enforce", mx = { "mx.example.test" } } }))
    assert.equal("pkix", plan.verify)
    _, _, err = policy.decide("none", { dest = secure_dest, hostinfo = host, requiretls = true })
    assert.matches("TLS policy none", tostring(err))
  end)

  it("maps failures to TLS-RPT result types", function()
    assert.equal("certificate-host-mismatch", policy.rpt_result({ cause = "tls: hostname mismatch" }))
    assert.equal("certificate-expired", policy.rpt_result({ cause = "certificate has expired" }))
    assert.equal("certificate-not-trusted", policy.rpt_result({ cause = "unable to get local issuer certificate" }))
    assert.equal("starttls-not-supported", policy.rpt_result({ extension = "STARTTLS" }))
    assert.equal("tlsa-invalid", policy.rpt_result({ cause = "certificate verify failed" }, { verify = "dane" }))
    assert.equal("dane-required", policy.rpt_result({ tlsrpt = "dane-required" }))
  end)
end)

-- MX servers: the project's server on several loopback addresses that
-- share one port (delivery uses one port for every host).
local started, extra = {}, {}

local function shared_port_servers(ips, opts)
  for _ = 1, 20 do
    local servers, port = {}, 0
    local ok = true
    for i, ip in ipairs(ips) do
      local o = {}
      for k, v in pairs(opts[i] or opts) do o[k] = v end
      o.listen = (ip:find(":") and ("[" .. ip .. "]") or ip) .. ":" .. port
      o.hostname = o.hostname or "mx.test"
      o.logger = o.logger or function() end
      local srv = server.new(o)
      if not srv then ok = false break end
      servers[#servers + 1] = srv
      started[#started + 1] = srv
      port = srv:addresses()[1].port
    end
    if ok then return servers, port end
    for _, s in ipairs(servers) do s:close() end
  end
  error("no shared free port")
end

local function collect()
  local got = {}
  return got, function(session, msg)
    got[#got + 1] = { from = msg.from, rcpt = msg.rcpt, data = msg:read(), tls = session.tls,
      addr = session.local_address }
  end
end

local function server_tls(name)
  local d = H.certs()
  return luasmtp.tls.context { mode = "server", certificate = d .. "/" .. name .. ".pem",
    key = d .. "/" .. name .. ".key" }
end

local function mock_tlsrpt()
  local records = {}
  return { records = records, record = function(_, r) records[#records + 1] = r end }
end

local function trail_text(r)
  local lines = {}
  for _, e in ipairs(r.trail) do lines[#lines + 1] = e.event .. ": " .. e.text end
  return table.concat(lines, "\n")
end

local BODY = "Subject: delivery test\r\n\r\nhello\r\n"

-- Close the servers and extra sockets of a test (also after_each's job
-- when the test failed half-way).
local function stop()
  for _, srv in ipairs(started) do srv:close() end
  for _, x in ipairs(extra) do x:close() end
  started, extra = {}, {}
end

describe("delivery", function()
  after_each(function()
    stop()
    local settle = luasmtp.update_now() + 2
    while luasmtp.stats().tasks > 0 and luasmtp.update_now() < settle do
      luasmtp.step(0.02)
    end
    H.assert_no_leaks()
  end)

  it("delivers to the MX, trying the next when the first does not answer, with the trail", function()
    H.run(function()
      local got, on_data = collect()
      local _, port = shared_port_servers({ "127.0.0.3" }, { hooks = { on_data = on_data } })
      local dns = mock_dns {
        ["example.test"] = { MX = { mx(10, "mx1.example.test"), mx(20, "mx2.example.test") } },
        ["mx1.example.test"] = { A = { "127.0.0.2" } },
        ["mx2.example.test"] = { A = { "127.0.0.3" } },
        ["other.test"] = { MX = { mx(0, ".") } },
        ["third.test"] = { MX = { mx(10, "mx2.example.test") } },
      }
      -- one file body for two sessions that run at the same time
      local file = assert(io.tmpfile())
      file:write(BODY)
      file:seek("set")
      local res = delivery.deliver { from = "me@sender.test",
        to = { "a@example.test", "c@other.test", "b@Example.Test", "d@third.test" },
        body = file, port = port, dns = dns, tls_policy = "may", timeouts = { connect = 5 } }
      assert.is_false(res.ok)
      -- the domains went in parallel; the results come in the order given
      assert.same({ "a@example.test", "c@other.test", "b@Example.Test", "d@third.test" },
        { res.recipients[1].address, res.recipients[2].address, res.recipients[3].address,
          res.recipients[4].address })
      assert.is_true(res.recipients[4].ok, trail_text(res.recipients[4]))
      local a = res:recipient("a@example.test")
      assert.is_true(a.ok, trail_text(a))
      assert.is_true(res:recipient("b@Example.Test").ok)
      assert.equal("mx2.example.test", a.mx)
      assert.equal("127.0.0.3", a.ip)
      assert.equal("may", a.tls_policy)
      assert.matches("250", a.text)
      local t = trail_text(a)
      assert.matches("MX for example.test: mx1.example.test %(10%), mx2.example.test %(20%)", t)
      assert.matches("mx1.example.test %[127.0.0.2%]:%d+: refused", t)
      assert.matches("mx2.example.test %[127.0.0.3%]:%d+: connected", t)
      assert.equal(2, #got) -- one transaction for both recipients of a domain
      table.sort(got, function(x, y) return x.rcpt[1] < y.rcpt[1] end)
      assert.same({ "a@example.test", "b@Example.Test" }, got[1].rcpt)
      assert.same({ "d@third.test" }, got[2].rcpt)
      for _, m in ipairs(got) do assert.matches("\r\n\r\nhello\r\n$", m.data) end
      local c = res:recipient("c@other.test")
      assert.is_false(c.ok)
      assert.is_true(c.permanent)
      assert.matches("null MX", c.text)
      stop()
    end)
  end)

  it("delivers to an implicit MX and to an address literal", function()
    H.run(function()
      local got, on_data = collect()
      local _, port = shared_port_servers({ "127.0.0.4", "::1" }, { hooks = { on_data = on_data } })
      local dns = mock_dns { ["implicit.test"] = { A = { "127.0.0.4" } } }
      local res = delivery.deliver { from = "me@sender.test", to = { "x@implicit.test", "y@[127.0.0.4]",
        "z@[IPv6:::1]" }, body = BODY, port = port, dns = dns, tls_policy = "dane" }
      assert.is_true(res.ok, trail_text(res.recipients[1]) .. "\n" .. trail_text(res.recipients[2]))
      assert.matches("no MX, implicit MX for implicit.test", trail_text(res.recipients[1]))
      assert.equal("127.0.0.4", res.recipients[2].ip)
      assert.equal("::1", res.recipients[3].ip)
      assert.matches("TLS policy dane, an address literal has no TLSA records", res.recipients[3].tls_why)
      assert.equal(3, #got)
      stop()
    end)
  end)

  it("may: a failed STARTTLS handshake is retried once in plaintext; encrypt refuses it", function()
    H.run(function()
      local fake = require "spec.fake_smtp"
      local srv, port, log = fake.start {
        tls = server_tls("server"),
        on = { STARTTLS = function(_, sock)
          sock:send("220 2.0.0 go ahead\r\n")
          sock:flush(1)
          sock:send("this is not a TLS handshake\r\n")
          return "close"
        end },
      }
      extra[#extra + 1] = srv
      local dns = mock_dns { ["fallback.test"] = { A = { "127.0.0.1" } } }
      local rpt = mock_tlsrpt()
      local r = delivery.deliver { from = "me@sender.test", to = "a@fallback.test", body = BODY, port = port,
        dns = dns, tls_policy = "may", tlsrpt = rpt }.recipients[1]
      assert.is_true(r.ok, trail_text(r))
      assert.matches("again without TLS", trail_text(r))
      assert.matches("plaintext after a failed handshake", r.tls_why)
      assert.equal(1, #log.messages)
      assert.equal(2, log.connections)
      assert.equal(1, #rpt.records)
      r = delivery.deliver { from = "me@sender.test", to = "a@fallback.test", body = BODY, port = port,
        dns = dns, tls_policy = "encrypt" }.recipients[1]
      assert.is_false(r.ok)
      assert.matches("^TLS policy encrypt: STARTTLS", r.text)
      assert.equal(1, #log.messages)
      stop()
    end)
  end)

  it("Happy Eyeballs: an IPv6 address that does not answer, then IPv4", function()
    H.run(function()
      -- [::1]:port with a full accept queue drops SYNs: it never answers
      local hole, port
      for _ = 1, 20 do
        local ls = assert(luasmtp.listen("[::1]:0", { backlog = 0 }))
        hole = ls[1]
        port = select(2, hole:getsockname())
        local srv = server.new { listen = "127.0.0.5:" .. port, hostname = "mx.test", logger = function() end }
        if srv then
          started[#started + 1] = srv
          break
        end
        hole:close()
      end
      extra[#extra + 1] = hole
      extra[#extra + 1] = assert(luasmtp.connect("::1", port, { timeout = 5 })) -- fills the queue
      local dns = mock_dns { ["he.test"] = { MX = { mx(10, "mx.he.test") } },
        ["mx.he.test"] = { AAAA = { "::1" }, A = { "127.0.0.5" } } }
      local res = delivery.deliver { from = "me@sender.test", to = "u@he.test", body = BODY, port = port,
        dns = dns, tls_policy = "may", timeouts = { connect = 20 } }
      local r = res.recipients[1]
      assert.is_true(r.ok, trail_text(r))
      assert.equal("127.0.0.5", r.ip)
      local connects = {}
      for _, e in ipairs(r.trail) do
        if e.event == "connect" then connects[#connects + 1] = e.address .. " " .. e.result end
      end
      assert.same({ "::1 abandoned", "127.0.0.5 connected" }, connects)
      stop()
    end, 30)
  end)

  it("Happy Eyeballs remembers addresses that failed within the delivery", function()
    H.run(function()
      local l, port = H.listen("127.0.0.6:0")
      l:close() -- nothing listens there any more: refused
      local failed = {}
      local sock, token, detail, attempts = happy.connect({ { address = "127.0.0.6", family = "inet" } }, port,
        { timeout = 5, failed = failed })
      assert.is_nil(sock)
      assert.equal("refused", token)
      assert.matches("127.0.0.6", detail)
      assert.equal(1, #attempts)
      local _, token2, _, attempts2 = happy.connect({ { address = "127.0.0.6", family = "inet" } }, port,
        { timeout = 5, failed = failed })
      assert.equal("unreachable", token2)
      assert.equal(0, #attempts2)
      stop()
    end)
  end)

  it("verifies the MX name under verify, and refuses a wrong certificate naming the policy", function()
    H.run(function()
      local got, on_data = collect()
      local _, port = shared_port_servers({ "127.0.0.7", "127.0.0.8" }, {
        { tls = server_tls("sni2"), hooks = { on_data = on_data } },
        { tls = server_tls("wronghost"), hooks = { on_data = on_data } },
      })
      local dns = mock_dns {
        ["good.test"] = { MX = { mx(10, "mail.example.test") } },
        ["mail.example.test"] = { A = { "127.0.0.7" } },
        ["bad.test"] = { MX = { mx(10, "mx.bad.test") } },
        ["mx.bad.test"] = { A = { "127.0.0.8" } },
      }
      local rpt = mock_tlsrpt()
      local res = delivery.deliver { from = "me@sender.test", to = { "a@good.test", "b@bad.test" }, body = BODY,
        port = port, dns = dns, tls_policy = "verify", cafile = H.certs() .. "/ca.pem", tlsrpt = rpt }
      local a, b = res:recipient("a@good.test"), res:recipient("b@bad.test")
      assert.is_true(a.ok, trail_text(a))
      assert.matches("verified", trail_text(a))
      assert.is_true(got[1].tls)
      assert.is_false(b.ok)
      assert.is_false(b.permanent)
      assert.matches("TLS policy verify", b.text)
      assert.matches("mismatch", b.text)
      assert.equal(1, #got)
      local results = {}
      for _, r in ipairs(rpt.records) do results[#results + 1] = r.policy_domain .. " " .. r.result end
      table.sort(results) -- the domains went in parallel
      assert.same({ "bad.test certificate-host-mismatch", "good.test success" }, results)
      stop()
    end)
  end)

  it("MTA-STS enforce refuses a wrong certificate; testing delivers and reports", function()
    -- the policies come over HTTPS from spec/https_server.py through
    -- luasmtp.delivery.mtasts; the results go to a TLS-RPT recorder
    local root = H.tmp .. "/delivery_sts"
    os.execute("rm -rf " .. H.shquote(root))
    local function publish(domain, mode, mx_name)
      local dir = root .. "/mta-sts." .. domain .. "/.well-known"
      os.execute("mkdir -p " .. H.shquote(dir))
      local f = assert(io.open(dir .. "/mta-sts.txt", "wb"))
      f:write(("version: STSv1\r\nmode: %s\r\nmx: %s\r\nmax_age: 86400\r\n"):format(mode, mx_name))
      f:close()
    end
    publish("example.test", "enforce", "mx.example.test")
    publish("testing.test", "testing", "*.testing.test")
    H.need("python3")
    local https = H.https_server { tag = "delivery_sts", cert = "mtasts", root = root }
    local ok, err = pcall(H.run, function()
      local got, on_data = collect()
      local _, port = shared_port_servers({ "127.0.0.9" }, { tls = server_tls("wronghost"),
        hooks = { on_data = on_data } })
      local dns = mock_dns {
        ["example.test"] = { MX = { mx(10, "mx.example.test") } }, ["mx.example.test"] = { A = { "127.0.0.9" } },
        ["testing.test"] = { MX = { mx(10, "mx.testing.test") } }, ["mx.testing.test"] = { A = { "127.0.0.9" } },
        ["_mta-sts.example.test"] = { TXT = { "v=STSv1; id=1" } },
        ["_mta-sts.testing.test"] = { TXT = { "v=STSv1; id=1" } },
      }
      local sts = mtasts.new { dns_query = dns.query, cafile = H.certs() .. "/ca.pem", port = https.port,
        resolve = { "mta-sts.example.test:" .. https.port .. ":127.0.0.1",
          "mta-sts.testing.test:" .. https.port .. ":127.0.0.1" }, timeout = 10 }
      local rec = tlsrpt.new { dir = root .. "/tlsrpt", organization = "luasmtp tests",
        contact = "postmaster@sender.test", submitter = "sender.test", sync = false }
      local res = delivery.deliver { from = "me@sender.test", to = { "a@example.test", "b@testing.test" }, body = BODY,
        port = port, dns = dns, cafile = H.certs() .. "/ca.pem", mtasts = sts, tlsrpt = rec, tls_policy = "dane" }
      local a, b = res.recipients[1], res.recipients[2]
      assert.is_false(a.ok)
      assert.is_false(a.permanent)
      assert.matches("^TLS policy sts%-enforce: STARTTLS", a.text)
      assert.matches("mismatch", a.text)
      assert.matches("MTA%-STS policy of example.test: mode enforce", trail_text(a))
      assert.is_true(b.ok, trail_text(b))
      assert.equal("sts-testing", b.tls_policy)
      assert.equal("testing", b.mta_sts)
      assert.equal("enforce", a.mta_sts)
      assert.equal(1, #got)
      assert.same({ "b@testing.test" }, got[1].rcpt)
      assert.is_true(got[1].tls)
      local now = luasmtp.time()
      local function results(domain)
        local out = {}
        for _, r in ipairs(rec:records(now - 60, now + 60, domain)) do
          out[#out + 1] = r.policy_type .. " " .. r.result .. " " .. r.mx_host
        end
        return out
      end
      assert.same({ "sts certificate-host-mismatch mx.example.test" }, results("example.test"))
      assert.same({ "sts certificate-host-mismatch mx.testing.test" }, results("testing.test"))
      local json = rec:report("testing.test", now - 60, now + 60)
      assert.matches('"policy%-type":"sts"', json)
      assert.matches('"result%-type":"certificate%-host%-mismatch"', json)
      stop()
    end, 30)
    H.kill(https.pid)
    assert(ok, err)
  end)

  it("refuses REQUIRETLS to a next hop that does not advertise it", function()
    H.run(function()
      local got, on_data = collect()
      local _, port = shared_port_servers({ "127.0.0.10", "127.0.0.11" }, {
        { tls = server_tls("sni2"), requiretls = false, hooks = { on_data = on_data } },
        { tls = server_tls("sni2"), hooks = { on_data = on_data } } })
      local dns = mock_dns { secure = true,
        ["rt.test"] = { MX = { mx(10, "mail.example.test") } }, ["mail.example.test"] = { A = { "127.0.0.10" } },
        ["rt2.test"] = { MX = { mx(10, "mail2.example.test") } }, ["mail2.example.test"] = { A = { "127.0.0.11" } } }
      local res = delivery.deliver { from = "me@sender.test", to = { "a@rt.test" }, body = BODY, port = port, dns = dns,
        tls_policy = "may", requiretls = true, cafile = H.certs() .. "/ca.pem" }
      local r = res.recipients[1]
      assert.is_false(r.ok)
      assert.is_false(r.permanent)
      assert.matches("TLS policy REQUIRETLS: mail.example.test does not advertise REQUIRETLS", r.text)
      assert.equal(0, #got)
      -- the same host name with REQUIRETLS, but PKIX still applies: sni2
      -- is for mail.example.test only
      dns = mock_dns { secure = true, ["rt2.test"] = { MX = { mx(10, "mail.example.test") } },
        ["mail.example.test"] = { A = { "127.0.0.11" } } }
      res = delivery.deliver { from = "me@sender.test", to = { "a@rt2.test" }, body = BODY, port = port, dns = dns,
        tls_policy = "may", requiretls = true, cafile = H.certs() .. "/ca.pem" }
      assert.is_true(res.ok, trail_text(res.recipients[1]))
      assert.matches("REQUIRETLS: PKIX", res.recipients[1].tls_why)
      stop()
    end)
  end)

  it("exposes destinations and policy for scripts", function()
    H.run(function()
      local dns = mock_dns { secure = true,
        ["example.test"] = { MX = { mx(10, "mx.example.test") } },
        ["mx.example.test"] = { A = { "192.0.2.1" } },
        ["_25._tcp.mx.example.test"] = { TLSA = { { usage = 3, selector = 1, mtype = 1,
          data = string.rep("\1", 32) } } } }
      local dest = assert(delivery.destinations("example.test", { dns = dns }))
      assert.equal("192.0.2.1", dest.hosts[1].addresses[1].address)
      local pol = assert(delivery.policy("example.test", { dns = dns }))
      assert.equal("dane", pol.hosts[1].plan.verify)
      assert.equal("mx.example.test", pol.hosts[1].tlsa.base)
      stop()
    end)
  end)
end)

-- A certificate for name from the test CA, with the chain (leaf, CA) in
-- one file as a DANE-TA server must send it; returns pem, key paths.
local function ca_cert(name)
  local d = H.certs()
  local dir = H.tmp .. "/delivery-certs"
  local pem, key, chain = dir .. "/" .. name .. ".pem", dir .. "/" .. name .. ".key", dir .. "/" .. name .. "-chain.pem"
  assert(os.execute(("mkdir -p '%s' && openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
    .. "-keyout '%s' -out '%s' -subj '/CN=%s' -addext 'subjectAltName=DNS:%s' -addext 'basicConstraints=CA:false' "
    .. "-CA '%s/ca.pem' -CAkey '%s/ca.key' -days 3650 2>/dev/null && cat '%s' '%s/ca.pem' > '%s'")
    :format(dir, key, pem, name, name, d, d, pem, d, chain)))
  return chain, key, pem
end

describe("delivery with the DNSSEC rig", function()
  local rig_mod = require "spec.dnssec_rig"
  local dns = require "luasmtp.dns"
  local rig, port
  local d

  lazy_setup(function()
    d = H.certs()
    port = H.free_port()
    local ta_chain, _, ta_pem = ca_cert("mx-ta.example.test")
    local p = "_" .. port .. "._tcp."
    rig = rig_mod.start {
      records = {
        "implicit IN A 127.0.0.20",
        "nullmx IN MX 0 .",
        "cnamed IN MX 10 alias",
        "alias IN CNAME mx-cn",
        "mx-cn IN A 127.0.0.21",
        "insec IN MX 10 mx.plain.example.test.",
        "bogus IN MX 10 mx.bad.example.test.",
        "dane-ee IN MX 10 mx-ee",
        "mx-ee IN A 127.0.0.23",
        rig_mod.tlsa_record(p .. "mx-ee", 3, 1, 1, d .. "/server.pem"),
        "dane-bad IN MX 10 mx-bad",
        "mx-bad IN A 127.0.0.24",
        rig_mod.tlsa_record(p .. "mx-bad", 3, 1, 1, d .. "/wronghost.pem"),
        "dane-ta IN MX 10 mx-ta",
        "mx-ta IN A 127.0.0.25",
        rig_mod.tlsa_record(p .. "mx-ta", 2, 0, 1, d .. "/ca.pem"),
        "unusable IN MX 10 mx-un",
        "mx-un IN A 127.0.0.26",
        rig_mod.tlsa_record(p .. "mx-un", 0, 0, 1, d .. "/ca.pem"),
        "tb IN MX 10 mx-tb",
        "mx-tb IN A 127.0.0.29",
        p .. "mx-tb IN CNAME " .. p .. "mx.bad.example.test.",
        "he IN MX 10 mx-he",
        "mx-he IN AAAA ::1",
        "mx-he IN A 127.0.0.27",
      },
      zones = {
        { name = "plain.example.test", signed = false, records = {
          "mx IN A 127.0.0.22",
          rig_mod.tlsa_record(p .. "mx", 3, 1, 1, d .. "/server.pem") } },
        { name = "bad.example.test", bogus = "ds", records = { "mx IN A 127.0.0.28" } },
      },
    }
    rig.ta_chain, rig.ta_pem = ta_chain, ta_pem
    assert(dns.configure { servers = { rig.server } })
  end)

  lazy_teardown(function()
    dns.configure {}
    if rig then rig:stop() end
  end)

  after_each(function()
    stop()
    local settle = luasmtp.update_now() + 2
    while luasmtp.stats().tasks > 0 and luasmtp.update_now() < settle do
      luasmtp.step(0.02)
    end
    H.assert_no_leaks()
  end)

  local function mx_server(ip, opts)
    opts = opts or {}
    local got, on_data = collect()
    opts.listen = ip .. ":" .. port
    opts.hostname = opts.hostname or "mx.test"
    opts.logger = function() end
    opts.hooks = { on_data = on_data }
    local srv = assert(server.new(opts))
    started[#started + 1] = srv
    return got
  end

  local function send(to, level, fields)
    local msg = { from = "me@sender.test", to = to, body = BODY, port = port, tls_policy = level,
      cafile = d .. "/ca.pem", timeouts = { connect = 10 } }
    for k, v in pairs(fields or {}) do msg[k] = v end
    return delivery.deliver(msg)
  end

  it("delivers to an implicit MX, refuses a null MX, follows a CNAME'd MX", function()
    H.run(function()
      local got = mx_server("127.0.0.20")
      local got_cn = mx_server("127.0.0.21")
      local res = send({ "a@implicit.example.test", "b@nullmx.example.test", "c@cnamed.example.test" }, "dane")
      local a, b, c = res.recipients[1], res.recipients[2], res.recipients[3]
      assert.is_true(a.ok, trail_text(a))
      assert.matches("no MX, implicit MX for implicit.example.test: implicit.example.test; DNSSEC secure",
        trail_text(a))
      assert.matches("no TLSA records at _%d+._tcp.implicit.example.test", a.tls_why)
      assert.is_false(b.ok)
      assert.is_true(b.permanent)
      assert.matches("nullmx.example.test does not accept mail %(null MX", b.text)
      assert.is_true(c.ok, trail_text(c))
      assert.matches("alias.example.test %(CNAME mx%-cn.example.test%): 127.0.0.21; DNSSEC secure", trail_text(c))
      assert.equal(1, #got)
      assert.equal(1, #got_cn)
      stop()
    end, 30)
  end)

  it("does no DANE for insecure address records, and dane-only refuses them", function()
    H.run(function()
      local got = mx_server("127.0.0.22", { tls = server_tls("wronghost") })
      local r = send("a@insec.example.test", "dane").recipients[1]
      assert.is_true(r.ok, trail_text(r))
      assert.equal("may", r.tls_policy)
      assert.matches("address records of mx.plain.example.test are not DNSSEC%-signed", trail_text(r))
      assert.is_nil(trail_text(r):find("TLSA _", 1, true)) -- never looked up
      assert.is_true(got[1].tls)
      r = send("a@insec.example.test", "dane-only").recipients[1]
      assert.is_false(r.ok)
      assert.is_false(r.permanent)
      assert.matches("TLS policy dane%-only: no DANE for mx.plain.example.test", r.text)
      assert.equal(1, #got)
      stop()
    end, 30)
  end)

  it("fails temporarily on a bogus signature", function()
    H.run(function()
      local got = mx_server("127.0.0.28")
      local r = send("a@bogus.example.test", "dane").recipients[1]
      assert.is_false(r.ok)
      assert.is_false(r.permanent)
      assert.matches("address lookup for mx.bad.example.test", r.text)
      assert.equal(0, #got)
      stop()
    end, 30)
  end)

  it("fails temporarily when the TLSA lookup meets a bogus signature", function()
    H.run(function()
      local got = mx_server("127.0.0.29", { tls = server_tls("server") })
      local rpt = mock_tlsrpt()
      local r = send("a@tb.example.test", "dane", { tlsrpt = rpt }).recipients[1]
      assert.is_false(r.ok)
      assert.is_false(r.permanent)
      assert.matches("^TLS policy dane: TLSA lookup for mx%-tb.example.test failed", r.text)
      assert.equal(0, #got)
      assert.equal("dnssec-invalid", rpt.records[1].result)
      assert.equal("tlsa", rpt.records[1].policy_type)
      stop()
    end, 30)
  end)

  it("mandatory unauthenticated TLS when every TLSA record is unusable", function()
    H.run(function()
      local got = mx_server("127.0.0.26", { tls = server_tls("wronghost") })
      local r = send("a@unusable.example.test", "dane").recipients[1]
      assert.is_true(r.ok, trail_text(r))
      assert.equal("encrypt", r.tls_policy)
      assert.matches("none usable", r.tls_why)
      assert.is_true(got[1].tls)
      -- and without STARTTLS it is not delivered
      stop()
      got = mx_server("127.0.0.26")
      r = send("a@unusable.example.test", "dane").recipients[1]
      assert.is_false(r.ok)
      assert.matches("STARTTLS", r.text)
      assert.equal(0, #got)
      stop()
    end, 30)
  end)

  local function dane_trail(r)
    for _, e in ipairs(r.trail) do
      if e.event == "tls" and e.tlsinfo then return e.tlsinfo.dane end
    end
  end

  it("DANE-EE: delivers when the certificate matches its TLSA record, refuses when not", function()
    H.run(function()
      -- server.pem is for localhost: DANE-EE checks the key only
      local got = mx_server("127.0.0.23", { tls = server_tls("server") })
      local bad = mx_server("127.0.0.24", { tls = server_tls("server") })
      local rpt = mock_tlsrpt()
      local res = send({ "a@dane-ee.example.test", "b@dane-bad.example.test" }, "dane", { tlsrpt = rpt })
      local a, b = res.recipients[1], res.recipients[2]
      assert.is_true(a.ok, trail_text(a))
      assert.equal("dane", a.tls_policy)
      assert.matches("DANE: 1 usable TLSA record at _%d+._tcp.mx%-ee.example.test", a.tls_why)
      local dane = assert(dane_trail(a), trail_text(a))
      assert.equal(dane, a.dane)
      assert.same({ usage = 3, selector = 1, mtype = 1 }, dane.matched)
      assert.equal(0, dane.depth)
      assert.matches("DANE matched TLSA 3 1 1 at depth 0", trail_text(a))
      assert.equal(1, #got)
      assert.is_true(got[1].tls)
      assert.is_false(b.ok)
      assert.is_false(b.permanent)
      assert.matches("^TLS policy dane: STARTTLS", b.text)
      assert.equal(0, #bad)
      local results = {}
      for _, r in ipairs(rpt.records) do
        results[#results + 1] = r.policy_domain .. " " .. r.policy_type .. " " .. r.result
      end
      table.sort(results)
      assert.same({ "mx-bad.example.test tlsa tlsa-invalid", "mx-ee.example.test tlsa success" }, results)
      stop()
    end, 30)
  end)

  it("DANE-TA: a chain to the TLSA trust anchor with an allowed name", function()
    H.run(function()
      local tls = luasmtp.tls.context { mode = "server", certificate = rig.ta_chain,
        key = rig.ta_chain:gsub("%-chain%.pem$", ".key") }
      local got = mx_server("127.0.0.25", { tls = tls })
      local r = send("a@dane-ta.example.test", "dane-only").recipients[1]
      assert.is_true(r.ok, trail_text(r))
      local dane = assert(dane_trail(r), trail_text(r))
      assert.same({ usage = 2, selector = 0, mtype = 1 }, dane.matched)
      assert.equal(1, dane.depth)
      assert.equal(1, #got)
      stop()
      -- the same anchor, a certificate for another name: refused
      got = mx_server("127.0.0.25", { tls = server_tls("sni2") })
      r = send("a@dane-ta.example.test", "dane").recipients[1]
      assert.is_false(r.ok)
      assert.matches("TLS policy dane", r.text)
      assert.equal(0, #got)
      stop()
    end, 30)
  end)

  it("luasmtp send --mx delivers over DANE and refuses a certificate that does not match", function()
    H.run(function()
      local got = mx_server("127.0.0.23", { tls = server_tls("server") })
      local bad = mx_server("127.0.0.24", { tls = server_tls("server") })
      local function cli(rcpt)
        local out = H.tmp .. "/send-mx.out"
        local cmd = ("printf 'Subject: mx\\r\\n\\r\\nhello\\r\\n' | timeout 60 lua5.4 '%s/bin/luasmtp' send --mx "
          .. "--dns-server %s --port %d --tls-policy dane -v -f me@sender.test %s >'%s' 2>&1; echo $?")
          :format(H.root, rig.server, port, rcpt, out)
        -- the command runs while this loop serves the MX: run it in the background
        local pid_file = H.tmp .. "/send-mx.status"
        os.remove(pid_file)
        H.start("sh -c " .. ("'%s'"):format(cmd:gsub("'", "'\\''")), pid_file)
        local deadline = luasmtp.update_now() + 60
        while luasmtp.update_now() < deadline do
          local f = io.open(pid_file)
          local status = f and f:read("l")
          if f then f:close() end
          if status then return tonumber(status), H.readfile(out) end
          luasmtp.sleep(0.05)
        end
        error("luasmtp send --mx did not finish")
      end
      local status, out = cli("a@dane-ee.example.test")
      assert.equal(0, status, out)
      assert.matches("DANE matched TLSA 3 1 1", out)
      assert.equal(1, #got)
      status, out = cli("b@dane-bad.example.test")
      assert.equal(75, status, out)
      assert.matches("<b@dane%-bad.example.test>: TLS policy dane", out)
      assert.equal(0, #bad)
      stop()
    end, 90)
  end)

  it("Happy Eyeballs with the rig: ::1 does not answer, IPv4 is reached", function()
    H.run(function()
      local hole = assert(luasmtp.listen("[::1]:" .. port, { backlog = 0 }))[1]
      extra[#extra + 1] = hole
      extra[#extra + 1] = assert(luasmtp.connect("::1", port, { timeout = 5 }))
      local got = mx_server("127.0.0.27")
      local r = send("a@he.example.test", "dane").recipients[1]
      assert.is_true(r.ok, trail_text(r))
      local connects = {}
      for _, e in ipairs(r.trail) do
        if e.event == "connect" then connects[#connects + 1] = e.address .. " " .. e.result end
      end
      assert.same({ "::1 abandoned", "127.0.0.27 connected" }, connects)
      assert.equal(1, #got)
      stop()
    end, 30)
  end)
end)
