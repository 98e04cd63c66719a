--- luasmtp.mailauth.ar: Authentication-Results formatting and the
-- authserv-id of incoming fields (RFC 8601).
local ar = require "luasmtp.mailauth.ar"

describe("authentication-results", function()
  it("writes values bare when RFC 8601 allows it, quoted otherwise", function()
    assert.equal("example.org", ar.value("example.org"))
    assert.equal("alice@example.org", ar.value("alice@example.org"))
    assert.equal("a.b+tag@example.org", ar.value("a.b+tag@example.org"))
    assert.equal("@example.org", ar.value("@example.org"))
    assert.equal('"a b@example.org"', ar.value("a b@example.org"))
    assert.equal('"\\"q\\"@example.org"', ar.value('"q"@example.org'))
    assert.equal('"abc/+=="', ar.value("abc/+=="))  -- tspecials in a b= prefix
    assert.equal('"x;y"', ar.value("x;y"))
    assert.equal('"a..b@example.org"', ar.value("a..b@example.org"))
    assert.equal("(a \\(nested\\) \\\\ comment)", ar.comment("a (nested) \\ comment"))
    assert.equal("(no  line break)", ar.comment("no\r\nline break"))
  end)

  it("formats SPF, DKIM and DMARC results, one per folded line", function()
    local v = ar.format("mx.example.net", {
      ar.spf("pass", { mailfrom = "alice@example.org", helo = "mail.example.org" }),
      ar.spf("none", { helo = "mail.example.org" }),
      ar.dkim { result = "pass", domain = "example.org", selector = "s1", header_b = "dGhp/cyBp c2ln" },
      ar.dkim { result = "fail", reason = "body hash did not verify", domain = "example.org", selector = "s2",
                header_b = "abcdefghijk" },
      ar.dmarc { result = "fail", from_domain = "example.org", policy = "reject", disposition = "quarantine" },
    })
    assert.equal(table.concat({
      "mx.example.net",
      "spf=pass smtp.mailfrom=alice@example.org",
      "spf=none smtp.helo=mail.example.org",
      'dkim=pass header.d=example.org header.s=s1 header.b="dGhp/cyB"',
      'dkim=fail reason="body hash did not verify" header.d=example.org header.s=s2 header.b=abcdefgh',
      "dmarc=fail (P=REJECT DIS=QUARANTINE) header.from=example.org",
    }, ";\r\n\t"), v)
    assert.equal("mx.example.net; none", ar.format("mx.example.net", {}):gsub("\r\n\t", " "))
    assert.equal('spf=fail reason="SPF \\"fail\\" from 192.0.2.1"',
      ar.format("x", { ar.spf("fail", { detail = 'SPF "fail" from 192.0.2.1' }) }):match("spf=.*"))
    assert.has_error(function() ar.format("x", { { method = "bad method", result = "pass" } }) end)
  end)

  it("reads the authserv-id of a field, also quoted and after comments", function()
    assert.equal("mx.example.net", ar.authserv_id("mx.example.net; spf=pass smtp.mailfrom=a@b.example"))
    assert.equal("mx.example.net", ar.authserv_id(" (a (nested) comment) mx.example.net 1; none"))
    assert.equal("mx example", ar.authserv_id('"mx \\example"; none'))
    assert.equal("mx.example.net", ar.authserv_id("\r\n\tmx.example.net;\r\n\tdkim=pass"))
    assert.is_nil(ar.authserv_id('"unterminated; none'))
    assert.is_true(ar.ours("MX.Example.NET; none", "mx.example.net"))
    assert.is_false(ar.ours("mx.example.net.evil; none", "mx.example.net"))
  end)
end)
