--- luasmtp.mailauth.dmarc: the Public Suffix List binding, record
-- parsing, discovery through spec/fake_dns.py, alignment, p/sp/pct, and
-- the aggregate report data.
local luasmtp = require "luasmtp"
local core = require "luasmtp.core"
local dns = require "luasmtp.dns"
local dmarc = require "luasmtp.mailauth.dmarc"
local H = require "spec.helper"

local RECORDS = {
  "txt:_dmarc.example.test=v=DMARC1; p=reject; sp=quarantine; rua=mailto:agg@example.test",
  "txt:_dmarc.strict.test=v=DMARC1; p=quarantine; adkim=s; aspf=s",
  "txt:_dmarc.half.test=v=DMARC1; p=reject; pct=50",
  "txt:_dmarc.two.test=v=DMARC1; p=reject", "txt:_dmarc.two.test=v=DMARC1; p=none",
  "txt:_dmarc.other.test=spf2.0/pra",
  "txt:_dmarc.badp.test=v=DMARC1; p=bogus; rua=mailto:a@badp.test",
  "txt:_dmarc.nop.test=v=DMARC1; pct=20",
  "txt:_dmarc.example.co.uk=v=DMARC1; p=none",
}

describe("dmarc", function()
  local pid, port

  lazy_setup(function()
    pid, port = H.fake_dns("127.0.0.1", RECORDS, "dmarc", 120)
  end)

  lazy_teardown(function()
    assert(luasmtp.dns_configure {})
    if pid then H.kill(pid) end
  end)

  before_each(function()
    assert(dns.configure { servers = { "127.0.0.1:" .. port }, timeout = 2, tries = 2 })
  end)
  after_each(H.assert_no_leaks)

  it("finds organizational domains with the Public Suffix List", function()
    assert.equal("example.org", dmarc.organizational_domain("a.b.Example.ORG."))
    assert.equal("example.co.uk", dmarc.organizational_domain("mail.example.co.uk"))
    assert.equal("co.uk", dmarc.organizational_domain("co.uk")) -- a public suffix is its own
    assert.equal("example.github.io", dmarc.organizational_domain("x.example.github.io"))
    assert.is_true(core.psl_is_public_suffix("co.uk"))
    assert.is_false(core.psl_is_public_suffix("example.co.uk"))
    local none, why = core.psl_organizational_domain("com")
    assert.is_nil(none)
    assert.equal("invalid", why)
    assert.is_nil(core.psl_organizational_domain(string.rep("a", 300) .. ".com"))
    assert.is_nil(core.psl_organizational_domain("bad\0name.com"))
  end)

  it("aligns strictly and relaxed", function()
    assert.is_true(dmarc.aligned("mail.example.org", "example.org", "r"))
    assert.is_true(dmarc.aligned("a.example.org", "b.example.org", "r"))
    assert.is_false(dmarc.aligned("mail.example.org", "example.org", "s"))
    assert.is_true(dmarc.aligned("Example.org.", "example.org", "s"))
    assert.is_false(dmarc.aligned("example.co.uk", "other.co.uk", "r"))
    assert.is_false(dmarc.aligned(nil, "example.org", "r"))
  end)

  it("parses records as section 6.3 says", function()
    local r = assert(dmarc.parse_record("v=DMARC1; p=Reject; pct=30; adkim=s; rua=mailto:a@x.test, mailto:b@x.test;"))
    assert.same({ "reject", "reject", "s", "r", 30 }, { r.p, r.sp, r.adkim, r.aspf, r.pct })
    assert.same({ "mailto:a@x.test", "mailto:b@x.test" }, r.rua)
    assert.is_nil(dmarc.parse_record("v=DMARC1"))
    assert.is_nil(dmarc.parse_record("p=reject; v=DMARC1"))
    assert.is_nil(dmarc.parse_record("v=DMARC1; p=reject; pct=101"))
    assert.is_nil(dmarc.parse_record("v=DMARC1; p=reject; adkim=x"))
    assert.is_nil(dmarc.parse_record("v=DMARC1; pct=20")) -- no p, no rua
    assert.equal("none", dmarc.parse_record("v=DMARC1; p=bogus; rua=mailto:a@x.test").p)
  end)

  it("discovers the record at the From domain, then at the organizational domain", function()
    H.run(function()
      local rec, at = dmarc.discover("example.test")
      assert.equal("reject", rec.p)
      assert.equal("example.test", at)
      rec, at = dmarc.discover("deep.sub.example.test")
      assert.equal("example.test", at)
      assert.equal("quarantine", rec.sp)
      rec, at = dmarc.discover("www.example.co.uk")
      assert.equal("example.co.uk", at)
      assert.equal("none", rec.p)
      assert.is_nil(dmarc.discover("nothing.test"))
      local none, token, why = dmarc.discover("two.test")
      assert.is_nil(none)
      assert.is_nil(token)
      assert.matches("more than one", why)
      assert.is_nil(dmarc.discover("other.test"))
      assert.is_nil(dmarc.discover("nop.test"))
      assert.equal("none", dmarc.discover("badp.test").p)
    end, 20)
  end)

  it("evaluates SPF and DKIM alignment, p, sp and pct into a disposition", function()
    H.run(function()
      local v = dmarc.evaluate { from_domain = "example.test",
        spf = { result = "pass", domain = "bounce.example.test" }, dkim = {} }
      assert.same({ "pass", "reject", "none", true, false },
        { v.result, v.policy, v.disposition, v.spf_aligned, v.dkim_aligned })
      v = dmarc.evaluate { from_domain = "example.test", spf = { result = "fail", domain = "example.test" },
        dkim = { { result = "fail", domain = "example.test" }, { result = "pass", domain = "mail.example.test" } } }
      assert.same({ "pass", false, true, "mail.example.test" },
        { v.result, v.spf_aligned, v.dkim_aligned, v.dkim_domain })
      v = dmarc.evaluate { from_domain = "example.test", spf = { result = "pass", domain = "evil.test" },
        dkim = { { result = "pass", domain = "evil.test" } } }
      assert.same({ "fail", "reject", "reject" }, { v.result, v.policy, v.disposition })
      -- below the organizational domain sp applies
      v = dmarc.evaluate { from_domain = "news.example.test",
        spf = { result = "softfail", domain = "news.example.test" } }
      assert.same({ "fail", "quarantine", "quarantine", "example.test" },
        { v.result, v.policy, v.disposition, v.policy_domain })
      -- strict alignment wants the same name
      v = dmarc.evaluate { from_domain = "strict.test", spf = { result = "pass", domain = "mail.strict.test" },
        dkim = { { result = "pass", domain = "mail.strict.test" } } }
      assert.equal("fail", v.result)
      v = dmarc.evaluate { from_domain = "strict.test", dkim = { { result = "pass", domain = "STRICT.test" } } }
      assert.equal("pass", v.result)
      -- pct=50: sampled failures get the policy, the others the next weaker one
      v = dmarc.evaluate { from_domain = "half.test", random = function() return 0.2 end }
      assert.same({ "fail", "reject", "reject" }, { v.result, v.policy, v.disposition })
      v = dmarc.evaluate { from_domain = "half.test", random = function() return 0.7 end }
      assert.same({ "fail", "reject", "quarantine", true }, { v.result, v.policy, v.disposition, v.sampled_out })
      assert.equal("none", dmarc.evaluate { from_domain = "nothing.test" }.result)
      local function failing() return nil, "dns", "_dmarc.x.test TXT: SERVFAIL" end
      local t = dmarc.evaluate { from_domain = "x.test", query = failing }
      assert.same({ "temperror", "_dmarc.x.test TXT: SERVFAIL" }, { t.result, t.reason })
      assert.equal("permerror", dmarc.evaluate { from_domain = "not a domain" }.result)
    end, 30)
  end)

  it("records aggregate report data, one line per message, by UTC day", function()
    local dir = H.tmp .. "/dmarc_agg"
    os.execute("rm -rf " .. H.shquote(dir))
    local rec = dmarc.new { dir = dir }
    H.run(function()
      local v = dmarc.evaluate { from_domain = "example.test", spf = { result = "pass", domain = "example.test" } }
      assert(rec:record(v, { source_ip = "2001:db8::1", envelope_from = "example.test", time = 86400 * 3 + 5,
        spf = { result = "pass", domain = "example.test" },
        dkim = { { result = "fail", domain = "example.test", selector = "s1" } } }))
      local w = dmarc.evaluate { from_domain = "example.test", spf = { result = "fail", domain = "example.test" } }
      assert(rec:record(w, { source_ip = "192.0.2.1", time = 86400 * 3 + 10, spf = { result = "fail" } }))
      assert(rec:record(dmarc.evaluate { from_domain = "nothing.test" }, { source_ip = "192.0.2.2" }))
    end, 20)
    local day = H.readfile(dir .. "/1970-01-04.dmarc")
    assert.equal(2, select(2, day:gsub("\n", "")))
    local got = rec:records(86400 * 3, 86400 * 4)
    assert.equal(2, #got)
    assert.same({ "2001:db8::1", "example.test", "example.test", "reject", "none", "fail", "pass" },
      { got[1].source_ip, got[1].header_from, got[1].policy_domain, got[1].p, got[1].disposition, got[1].dkim,
        got[1].spf })
    assert.same({ { domain = "example.test", selector = "s1", result = "fail" } }, got[1].dkim_results)
    assert.same({ "fail", "fail", "reject" }, { got[2].dkim, got[2].spf, got[2].disposition })
    assert.same({}, rec:records(86400 * 4, 86400 * 5))
  end)
end)
