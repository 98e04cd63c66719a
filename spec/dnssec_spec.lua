--- luasmtp.dns against a real validating resolver: spec/dnssec_rig.lua
-- (zones signed with ldns-signzone, served by nsd, validated by unbound,
-- all on loopback).
local luasmtp = require "luasmtp"
local dns = require "luasmtp.dns"
local H = require "spec.helper"
local rig = require "spec.dnssec_rig"

local HEX = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

local function unhex(s)
  return (s:gsub("..", function(x) return string.char(tonumber(x, 16)) end))
end

describe("dns.query with DNSSEC", function()
  local r

  lazy_setup(function()
    r = rig.start {
      records = {
        "@ IN MX 10 mx1",
        "@ IN MX 20 mx2.example.test.",
        "mx1 IN A 127.0.0.2",
        "mx1 IN AAAA ::1",
        "mx2 60 IN A 127.0.0.3",
        "alias IN CNAME alias2",
        "alias2 IN CNAME mx1",
        "loop1 IN CNAME loop2",
        "loop2 IN CNAME loop1",
        "gone IN CNAME nothing-here",
        "txt IN TXT \"v=spf1 \" \"-all\"",
        "txt IN TXT \"second\"",
        "nullmx IN MX 0 .",
        "_25._tcp.mx1 IN TLSA 3 1 1 " .. HEX,
        "_25._tcp.mx1 IN TLSA 2 0 0 30820102",
        "short 5 IN A 127.0.0.9",
      },
      zones = {
        { name = "plain.example.test", signed = false, records = { "host IN A 127.0.0.4", "@ IN MX 5 host" } },
        { name = "sub.example.test", records = { "host IN A 127.0.0.5" } },
        { name = "bad.example.test", bogus = "ds", records = { "host IN A 127.0.0.6" } },
        { name = "forged.example.test", bogus = "tamper", records = { "host IN A 127.0.0.7" } },
      },
    }
  end)

  lazy_teardown(function()
    if r then r:stop() end
    assert(dns.configure {})
  end)

  before_each(function()
    assert(dns.configure { servers = { r.server }, timeout = 3, tries = 2 })
  end)
  after_each(H.assert_no_leaks)

  it("answers signed data as authentic, with every record type", function()
    H.run(function()
      local mx = assert(dns.query("example.test", "MX"))
      assert.same({ name = "example.test", qtype = "MX", rcode = "NOERROR", authentic = true },
        { name = mx.name, qtype = mx.qtype, rcode = mx.rcode, authentic = mx.authentic })
      table.sort(mx.answers, function(a, b) return a.preference < b.preference end)
      assert.same({ { preference = 10, exchange = "mx1.example.test" },
                    { preference = 20, exchange = "mx2.example.test" } }, mx.answers)
      assert.is_nil(mx.cname)
      assert.is_true(mx.ttl > 0 and mx.ttl <= 300)

      assert.same({ "127.0.0.2" }, assert(dns.query("mx1.example.test", "A")).answers)
      assert.same({ "::1" }, assert(dns.query("mx1.example.test.", "AAAA")).answers)
      local a2 = assert(dns.query("MX2.Example.Test", "A"))
      assert.same({ "127.0.0.3" }, a2.answers)
      assert.is_true(a2.ttl <= 60)

      local txt = assert(dns.query("txt.example.test", "TXT"))
      table.sort(txt.answers)
      assert.same({ "second", "v=spf1 -all" }, txt.answers)
      assert.is_true(txt.authentic)

      local null = assert(dns.query("nullmx.example.test", "MX"))
      assert.same({ { preference = 0, exchange = "" } }, null.answers)
    end)
  end)

  it("parses TLSA records from the raw answer", function()
    H.run(function()
      local t = assert(dns.query("_25._tcp.mx1.example.test", "TLSA"))
      assert.is_true(t.authentic)
      table.sort(t.answers, function(a, b) return a.usage > b.usage end)
      assert.same({
        { usage = 3, selector = 1, mtype = 1, data = unhex(HEX) },
        { usage = 2, selector = 0, mtype = 0, data = unhex("30820102") },
      }, t.answers)
      local none = assert(dns.query("_25._tcp.mx2.example.test", "TLSA"))
      assert.same({}, none.answers)
      assert.equal("NXDOMAIN", none.rcode)
      assert.is_true(none.authentic)
    end)
  end)

  it("follows CNAME chains in the answer and reports the canonical name", function()
    H.run(function()
      local a = assert(dns.query("alias.example.test", "A"))
      assert.same({ "127.0.0.2" }, a.answers)
      assert.equal("mx1.example.test", a.cname)
      assert.is_true(a.authentic)
      local c = assert(dns.query("alias.example.test", "CNAME"))
      assert.same({ "alias2.example.test" }, c.answers)
      assert.is_nil(c.cname)
      local gone = assert(dns.query("gone.example.test", "A"))
      assert.equal("NXDOMAIN", gone.rcode)
      assert.equal("nothing-here.example.test", gone.cname)
      assert.same({}, gone.answers)
      -- unbound answers a CNAME loop with SERVFAIL or the loop itself
      local l, err, detail = dns.query("loop1.example.test", "A")
      if l then
        assert.same({}, l.answers)
      else
        assert.equal("dns", err)
        assert.matches("loop1.example.test A: ", detail, 1, true)
      end
    end)
  end)

  it("gives NXDOMAIN and NODATA as empty results with the SOA's negative TTL", function()
    H.run(function()
      local nx = assert(dns.query("nope.example.test", "A"))
      assert.same({ rcode = "NXDOMAIN", answers = {}, authentic = true },
        { rcode = nx.rcode, answers = nx.answers, authentic = nx.authentic })
      assert.is_true(nx.ttl > 0 and nx.ttl <= 60) -- SOA minimum 60, SOA TTL 300
      local nodata = assert(dns.query("mx2.example.test", "AAAA"))
      assert.same({ rcode = "NOERROR", answers = {}, authentic = true },
        { rcode = nodata.rcode, answers = nodata.answers, authentic = nodata.authentic })
      assert.is_true(nodata.ttl > 0 and nodata.ttl <= 60)
    end)
  end)

  it("marks data of an insecure delegation as not authentic", function()
    H.run(function()
      local a = assert(dns.query("host.plain.example.test", "A"))
      assert.same({ "127.0.0.4" }, a.answers)
      assert.is_false(a.authentic)
      local mx = assert(dns.query("plain.example.test", "MX"))
      assert.is_false(mx.authentic)
      assert.same({ { preference = 5, exchange = "host.plain.example.test" } }, mx.answers)
      local sub = assert(dns.query("host.sub.example.test", "A"))
      assert.is_true(sub.authentic) -- a signed delegation with its DS
      assert.same({ "127.0.0.5" }, sub.answers)
    end)
  end)

  it("fails temporarily on bogus signatures (SERVFAIL), never caching them", function()
    H.run(function()
      for _, name in ipairs { "host.bad.example.test", "host.forged.example.test" } do
        local res, err, detail = dns.query(name, "A")
        assert.is_nil(res)
        assert.equal("dns", err)
        assert.matches(name .. " A: the server answered SERVFAIL", detail, 1, true)
      end
      local before = dns.cache_stats()
      assert.is_nil((dns.query("host.bad.example.test", "A")))
      assert.equal(before.misses + 1, dns.cache_stats().misses)
      -- names outside the rig are refused by unbound, not looked up
      local res, err, detail = dns.query("example.com", "A")
      assert.same({ nil, "dns" }, { res, err })
      assert.matches("REFUSED", detail, 1, true)
    end)
    assert.matches("validation failure <host.forged.example.test. A IN>", r:unbound_log(), 1, true)
  end)

  it("trusts AD only from loopback resolvers unless trust_ad is set", function()
    H.run(function()
      -- The same unbound reached through 127.0.0.1 counts as loopback; a
      -- server list with a non-loopback entry does not (the first server
      -- is the one asked, the other is never tried).
      assert(dns.configure { servers = { r.server, "192.0.2.1:53" }, timeout = 3, tries = 1 })
      local a = assert(dns.query("mx1.example.test", "A"))
      assert.is_false(a.authentic)
      assert(dns.configure { servers = { r.server, "192.0.2.1:53" }, trust_ad = true, timeout = 3, tries = 1 })
      assert.is_true(assert(dns.query("mx1.example.test", "A")).authentic)
    end)
  end)

  it("caches answers for their TTL and negative answers too", function()
    H.run(function()
      dns.cache_clear()
      local first = assert(dns.query("mx1.example.test", "A"))
      first.answers[1] = "changed by the caller"
      local second = assert(dns.query("MX1.example.test.", "A"))
      assert.same({ "127.0.0.2" }, second.answers)
      assert.same({ entries = 1, hits = 1, misses = 1, joined = 0 }, dns.cache_stats())
      assert(dns.query("nope.example.test", "A"))
      local nx = assert(dns.query("nope.example.test", "A"))
      assert.equal("NXDOMAIN", nx.rcode)
      assert.same({ entries = 2, hits = 2, misses = 2, joined = 0 }, dns.cache_stats())
      -- a 5 s TTL runs out (the loop time is compared, no timing assertion)
      assert(dns.query("short.example.test", "A"))
      assert(dns.query("short.example.test", "A"))
      assert.equal(3, dns.cache_stats().hits)
      luasmtp.sleep(5.5)
      local again = assert(dns.query("short.example.test", "A"))
      assert.same({ "127.0.0.9" }, again.answers)
      assert.equal(4, dns.cache_stats().misses)
      -- max_ttl caps the cache time
      assert(dns.configure { servers = { r.server }, max_ttl = 0 })
      assert(dns.query("mx1.example.test", "A"))
      assert(dns.query("mx1.example.test", "A"))
      assert.same({ entries = 0, hits = 0, misses = 2, joined = 0 }, dns.cache_stats())
      -- luasmtp.dns_configure (the same servers for resolve*) empties it too
      assert(dns.configure { servers = { r.server } })
      assert(dns.query("mx1.example.test", "A"))
      assert.equal(1, dns.cache_stats().entries)
      assert(luasmtp.dns_configure { servers = { r.server } })
      assert.same({ entries = 0, hits = 0, misses = 0, joined = 0 }, dns.cache_stats())
    end, 30)
  end)

  it("sends one query for tasks that ask the same question at once", function()
    H.run(function()
      dns.cache_clear()
      local tasks, answers = {}, {}
      for i = 1, 5 do
        tasks[i] = luasmtp.spawn(function()
          local res = assert(dns.query("mx2.example.test", "A"))
          answers[i] = res.answers[1]
          res.answers[1] = "changed by task " .. i
        end)
      end
      for i = 1, 5 do
        assert(tasks[i]:join(10))
      end
      assert.same({ "127.0.0.3", "127.0.0.3", "127.0.0.3", "127.0.0.3", "127.0.0.3" }, answers)
      assert.same({ entries = 1, hits = 0, misses = 1, joined = 4 }, dns.cache_stats())
      -- failures are shared too, and not cached
      for i = 1, 3 do
        tasks[i] = luasmtp.spawn(function()
          local res, err = dns.query("host.bad.example.test", "A")
          answers[i] = tostring(res) .. " " .. err
        end)
      end
      for i = 1, 3 do
        assert(tasks[i]:join(10))
      end
      assert.same({ "nil dns", "nil dns", "nil dns" }, { answers[1], answers[2], answers[3] })
      assert.same({ entries = 1, hits = 0, misses = 2, joined = 6 }, dns.cache_stats())
    end)
  end)

  it("times out and refuses invalid names as temporary failures", function()
    H.run(function()
      -- a loopback port where nothing answers
      local port = H.free_port()
      assert(dns.configure { servers = { "127.0.0.1:" .. port }, timeout = 0.2, tries = 1 })
      local res, err = dns.query("mx1.example.test", "A", { timeout = 5 })
      assert.same({ nil, "dns" }, { res, err })
      res, err = dns.query("mx1.example.test", "A", { timeout = 0.05 })
      assert.same({ nil, "dns" }, { res, err })
      local bad = { "", "a..b", string.rep("x", 64) .. ".test", string.rep("abcdefg.", 40) .. "test", "a\\.b" }
      for _, name in ipairs(bad) do
        local r1, e1, d1 = dns.query(name, "A")
        assert.same({ nil, "dns" }, { r1, e1 }, name)
        assert.is_string(d1)
      end
      assert.has_error(function() dns.query("example.test", "SRV") end)
    end)
  end)
end)
