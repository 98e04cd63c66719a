--- DANE (RFC 7671, RFC 7672) in sock:starttls / connect: TLSA records
-- from the DNSSEC rig (spec/dnssec_rig.lua), a TLS server of ours with
-- the test certificates (spec/certs.sh), and each verdict checked again
-- against the same server and records by ldns-dane (ldnsutils) or
-- openssl s_client (see external_verdict).
local luasmtp = require "luasmtp"
local dns = require "luasmtp.dns"
local H = require "spec.helper"
local rig = require "spec.dnssec_rig"
local dane = require "luasmtp.dane"

local shquote = H.shquote

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

describe("DANE", function()
  local r, srv, port, certs, client_ctx, chain_file
  local served = 0

  -- Hosts of the rig, each with its own TLSA set at _PORT._tcp.HOST.
  -- The server picks the certificate by SNI (the TLSA base domain).
  local function tlsa(host, usage, selector, mtype, cert)
    return rig.tlsa_record("_" .. port .. "._tcp." .. host, usage, selector, mtype, cert)
  end

  lazy_setup(function()
    certs = H.certs()
    -- mail.example.test with its issuer, so DANE-TA digests can match
    chain_file = H.tmp .. "/dane-chain.pem"
    H.writefile(chain_file, H.readfile(certs .. "/sni2.pem") .. H.readfile(certs .. "/ca.pem"))
    local wrong_chain = H.tmp .. "/dane-wronghost-chain.pem"
    H.writefile(wrong_chain, H.readfile(certs .. "/wronghost.pem") .. H.readfile(certs .. "/ca.pem"))
    local server_ctx = luasmtp.tls.context {
      mode = "server", certificate = chain_file, key = certs .. "/sni2.key",
      certificates = {
        { certificate = wrong_chain, key = certs .. "/wronghost.key",
          hosts = { "tawrong.example.test", "eewrong.example.test" } },
        -- the leaf alone: the trust anchor comes from the TLSA record
        { certificate = certs .. "/sni2.pem", key = certs .. "/sni2.key",
          hosts = { "tafull.example.test", "tafull2.example.test" } },
      },
    }
    client_ctx = luasmtp.tls.context { mode = "client", dane = true, cafile = certs .. "/other-ca.pem" }
    local l
    l, port = H.listen()
    l:close()
    srv = assert(luasmtp.serve {
      listen = "127.0.0.1:" .. port,
      tls = server_ctx,
      handler = function(sock)
        served = served + 1
        sock:send("220 dane test\r\n")
        sock:receiveline(512, 5)
      end,
    })
    local sni2, server, ca, other_ca = certs .. "/sni2.pem", certs .. "/server.pem", certs .. "/ca.pem",
      certs .. "/other-ca.pem"
    local records = {
      "ns2 IN A 127.0.0.1",
      "cn IN CNAME ee",
      tlsa("ee", 3, 1, 1, sni2),          -- the server's key: match
      tlsa("ee0", 3, 0, 0, sni2),         -- the whole certificate
      tlsa("ee2", 3, 1, 2, sni2),         -- SHA-512
      tlsa("eewrong", 3, 1, 1, certs .. "/wronghost.pem"), -- names do not matter for DANE-EE
      tlsa("eebad", 3, 1, 1, server),     -- another key: mismatch
      tlsa("eebad", 3, 0, 1, server),
      tlsa("mail", 2, 0, 1, ca),          -- the issuer: DANE-TA, name mail.example.test
      tlsa("mail", 3, 1, 1, server),      -- a non-matching record next to it
      tlsa("ta1", 2, 1, 1, ca),           -- the issuer's key, but the name is not ta1
      tlsa("tawrong", 2, 0, 1, ca),       -- certificate for other.test
      tlsa("taother", 2, 0, 1, other_ca), -- an unrelated CA
      tlsa("tafull", 2, 0, 0, ca),        -- the whole CA certificate; the server sends only its leaf
      tlsa("tafull2", 2, 0, 1, ca),       -- a digest needs the CA in the chain: it is not sent
      tlsa("unusable", 0, 0, 1, ca),      -- PKIX-TA: not for SMTP
      tlsa("unusable", 1, 1, 1, sni2),    -- PKIX-EE: not for SMTP
      "_" .. port .. "._tcp.unusable IN TLSA 3 1 1 00112233", -- a SHA-256 of 4 bytes
      "_" .. port .. "._tcp.unusable IN TLSA 3 2 1 " .. string.rep("ab", 32), -- selector 2
    }
    local ee_tlsa = "_" .. port .. "._tcp.mx IN TLSA 3 1 1 " .. rig.tlsa_hex(sni2, 1, 1)
    r = rig.start {
      records = records,
      zones = {
        { name = "plain.example.test", signed = false, records = { ee_tlsa } },
        { name = "bad.example.test", bogus = "ds", records = { ee_tlsa } },
      },
    }
  end)

  lazy_teardown(function()
    if srv then srv:close() end
    if r then r:stop() end
    assert(dns.configure {})
    -- the server lives for the whole file: the leak check comes last
    H.run(function() luasmtp.sleep(0.1) end)
    H.assert_no_leaks()
  end)

  before_each(function()
    assert(dns.configure { servers = { r.server }, timeout = 3, tries = 2 })
  end)

  local function records_of(host)
    local res = assert(dns.query("_" .. port .. "._tcp." .. host .. ".example.test", "TLSA"))
    assert.is_true(res.authentic)
    assert.is_true(#res.answers > 0)
    return res.answers
  end

  --- Connect with implicit TLS and DANE; returns the socket or nil, err, detail.
  local function dane_connect(host, names)
    local tlsa_list = records_of(host)
    return luasmtp.connect("127.0.0.1", port, {
      tls = client_ctx, timeout = 10,
      dane = { base_domain = host .. ".example.test", tlsa = tlsa_list, names = names },
    })
  end

  --- Run cmd in the background (our server answers it from this loop)
  -- and wait for its exit status; returns ok, output.
  local function background(cmd, tag)
    local out = H.tmp .. "/dane-" .. tag .. ".out"
    local rcfile = out .. ".rc"
    os.remove(rcfile)
    H.start(string.format("sh -c %s", shquote(string.format("timeout 20 %s >%s 2>&1 </dev/null; echo $? >%s",
      cmd, shquote(out), shquote(rcfile)))))
    local deadline = luasmtp.update_now() + 30
    while luasmtp.update_now() < deadline do
      local rf = io.open(rcfile)
      local rc = rf and rf:read("l")
      if rf then rf:close() end
      if rc and rc ~= "" then
        return tonumber(rc) == 0, H.readfile(out)
      end
      luasmtp.sleep(0.05)
    end
    error(cmd .. " did not finish")
  end

  --- The verdict of a verifier not written here, for the same records
  -- (as the rig serves them) and the same server: openssl s_client's
  -- DANE options, or ldns-dane -n (-n: no name checks for DANE-EE, as
  -- RFC 7672 3.1.1; -d: the records are DNSSEC-valid, they came
  -- authentic from the rig). ldns-dane -t takes the reference name and
  -- SNI from the TLSA owner with its final dot, which no certificate
  -- name and no SNI entry matches: it is asked only about DANE-EE
  -- records for hosts served with the default certificate.
  local function external_verdict(host, verifier)
    local list = records_of(host)
    local name = host .. ".example.test"
    if verifier == "ldns-dane" then
      local file = H.tmp .. "/dane-" .. host .. ".tlsa"
      local f = assert(io.open(file, "w"))
      for _, rec in ipairs(list) do
        f:write(string.format("_%d._tcp.%s. 300 IN TLSA %d %d %d %s\n", port, name,
          rec.usage, rec.selector, rec.mtype, hex(rec.data)))
      end
      f:close()
      return background("ldns-dane -n -d -a 127.0.0.1 -t " .. shquote(file) .. " verify", host)
    end
    local args = {}
    for _, rec in ipairs(list) do
      args[#args + 1] = "-dane_tlsa_rrdata " .. shquote(string.format("%d %d %d %s", rec.usage,
        rec.selector, rec.mtype, hex(rec.data)))
    end
    return background(string.format("openssl s_client -brief -connect 127.0.0.1:%d -servername %s "
      .. "-dane_tlsa_domain %s %s -dane_ee_no_namechecks -verify_return_error", port, name, name,
      table.concat(args, " ")), host)
  end

  local function assert_dane_ok(host, expect, names)
    local sock, err, detail = dane_connect(host, names)
    assert(sock, tostring(err) .. ": " .. tostring(detail))
    assert.equal("220 dane test", sock:receiveline())
    local info = sock:tlsinfo()
    assert.is_true(info.verified)
    assert.equal(host .. ".example.test", info.servername)
    assert.same(expect.matched, info.dane.matched)
    assert.equal(expect.depth, info.dane.depth)
    assert.equal(expect.usable, info.dane.usable)
    sock:send("QUIT\r\n")
    sock:close()
  end

  local function assert_dane_fails(host, pattern, names)
    local before = served
    local sock, err, detail = dane_connect(host, names)
    assert.is_nil(sock)
    assert.equal("tls", err)
    assert.matches(pattern, detail)
    return before
  end

  it("authenticates DANE-EE(3) records: SPKI SHA-256, full certificate, SHA-512", function()
    H.run(function()
      assert_dane_ok("ee", { matched = { usage = 3, selector = 1, mtype = 1 }, depth = 0, usable = 1 })
      assert_dane_ok("ee0", { matched = { usage = 3, selector = 0, mtype = 0 }, depth = 0, usable = 1 })
      assert_dane_ok("ee2", { matched = { usage = 3, selector = 1, mtype = 2 }, depth = 0, usable = 1 })
      -- RFC 7672 3.1.1: no name checks for DANE-EE
      assert_dane_ok("eewrong", { matched = { usage = 3, selector = 1, mtype = 1 }, depth = 0, usable = 1 })
      for _, host in ipairs { "ee", "ee0", "ee2", "eewrong" } do
        local ok, out = external_verdict(host)
        assert(ok, "openssl s_client disagrees for " .. host .. ": " .. out)
      end
      for _, host in ipairs { "ee", "ee0", "ee2" } do
        local ok, out = external_verdict(host, "ldns-dane")
        assert(ok, "ldns-dane disagrees for " .. host .. ": " .. out)
      end
    end, 60)
  end)

  it("refuses a certificate that matches no TLSA record", function()
    H.run(function()
      assert_dane_fails("eebad", "^DANE: no TLSA record of eebad%.example%.test matches the certificate chain "
        .. "%(2 usable records%)")
      assert_dane_fails("taother", "^DANE: no TLSA record of taother%.example%.test matches")
      for _, host in ipairs { "eebad", "taother" } do
        local ok, out = external_verdict(host)
        assert(not ok, "openssl s_client accepts " .. host .. ": " .. out)
      end
      local ok, out = external_verdict("eebad", "ldns-dane")
      assert(not ok, "ldns-dane accepts eebad: " .. out)
    end, 60)
  end)

  it("authenticates DANE-TA(2) with the name checks of RFC 7672", function()
    H.run(function()
      -- the CA certificate's digest matches at depth 1; the leaf names
      -- mail.example.test, the base domain
      assert_dane_ok("mail", { matched = { usage = 2, selector = 0, mtype = 1 }, depth = 1, usable = 2 })
      assert(external_verdict("mail"))
      -- the leaf does not name the base domain ta1.example.test ...
      assert_dane_fails("ta1", "^DANE: the certificate matches a DANE%-TA record but names neither "
        .. "ta1%.example%.test")
      -- ... unless that name is one the caller allows (e.g. the MX host
      -- name before a secure CNAME expansion to the base domain)
      assert_dane_ok("ta1", { matched = { usage = 2, selector = 1, mtype = 1 }, depth = 1, usable = 1 },
        { "mail.example.test" })
      assert_dane_fails("tawrong", "^DANE: the certificate matches a DANE%-TA record")
      assert_dane_ok("tafull", { matched = { usage = 2, selector = 0, mtype = 0 }, depth = 1, usable = 1 },
        { "mail.example.test" })
      assert_dane_fails("tafull2", "^DANE: no TLSA record of tafull2%.example%.test matches", { "mail.example.test" })
      for _, host in ipairs { "ta1", "tawrong" } do
        local ok, out = external_verdict(host)
        assert(not ok, "the external verifier accepts " .. host .. ": " .. out)
      end
    end, 60)
  end)

  it("reports a TLSA set without any usable record", function()
    H.run(function()
      local list = records_of("unusable")
      assert.equal(4, #list)
      assert.same({ 0, 4 }, { luasmtp.tls.dane_usable(list) })
      assert.same({ 2, 2 }, { luasmtp.tls.dane_usable(records_of("mail")) })
      local before = served
      local sock, err, detail = dane_connect("unusable")
      assert.same({ nil, "tls" }, { sock, err })
      assert.equal("DANE: none of the 4 TLSA records of unusable.example.test is usable "
        .. "(RFC 7672: usages 2 and 3, selectors 0 and 1, matching types 0-2)", detail)
      -- the caller then does unauthenticated TLS, as RFC 7672 2.2 says
      local plain = luasmtp.tls.context { mode = "client", verify = false }
      local s2 = assert(luasmtp.connect("127.0.0.1", port, { tls = plain, servername = "unusable.example.test" }))
      assert.equal("220 dane test", s2:receiveline())
      assert.is_nil(s2:tlsinfo().dane)
      s2:close()
      assert.is_true(served >= before + 1)
    end, 30)
  end)

  it("works for STARTTLS and refuses bad arguments", function()
    H.run(function()
      -- a plain listener that upgrades after its greeting, like an SMTP server
      local server_ctx = luasmtp.tls.context { mode = "server", certificate = chain_file, key = certs .. "/sni2.key" }
      local l, pport = H.listen()
      local t = luasmtp.spawn(function()
        local s = assert(l:accept(5))
        s:send("220 ready\r\n")
        if s:starttls(server_ctx, { timeout = 5 }) then
          s:send("250 over tls\r\n")
          s:receiveline(512, 5)
        end
        s:close()
      end)
      local c = assert(luasmtp.connect("127.0.0.1", pport, { timeout = 5 }))
      assert.equal("220 ready", c:receiveline())
      assert.has_error(function()
        c:starttls(client_ctx, { dane = { tlsa = {} } })
      end, "luasmtp: opts.dane.base_domain must be a host name")
      assert.has_error(function()
        c:starttls(client_ctx, { dane = { base_domain = "x.test", tlsa = { { usage = 3 } } } })
      end)
      local nodane = luasmtp.tls.context { mode = "client" }
      assert.has_error(function()
        c:starttls(nodane, { dane = { base_domain = "x.test", tlsa = {} } })
      end, "luasmtp: opts.dane needs a client context made with dane = true")
      assert(c:starttls(client_ctx, { dane = { base_domain = "ee.example.test", tlsa = records_of("ee") } }))
      assert.equal("250 over tls", c:receiveline())
      assert.same({ usage = 3, selector = 1, mtype = 1 }, c:tlsinfo().dane.matched)
      c:send("QUIT\r\n")
      c:close()
      assert(t:join(5))
      l:close()
      assert.has_error(function()
        luasmtp.tls.context { mode = "server", dane = true, certificate = chain_file, key = certs .. "/sni2.key" }
      end)
    end, 30)
  end)

  it("finds the TLSA records of an MX host (RFC 7672 2.2.2) and the names to check", function()
    H.run(function()
      local t = assert(dane.lookup("ee.example.test", { port = port }))
      assert.same({ "ee.example.test", true, 1, 1 }, { t.base_domain, t.authentic, t.usable, #t.tlsa })
      -- a secure CNAME: the expanded name's records come first
      t = assert(dane.lookup("cn.example.test", { port = port, expanded = "ee.example.test." }))
      assert.same({ "ee.example.test", 1 }, { t.base_domain, t.usable })
      -- no records (an authentic denial): no DANE, base domain the host
      t = assert(dane.lookup("cn.example.test", { port = port, expanded = "ns2.example.test" }))
      assert.same({ "cn.example.test", true, 0 }, { t.base_domain, t.authentic, #t.tlsa })
      -- records of an insecure zone are ignored
      t = assert(dane.lookup("mx.plain.example.test", { port = port }))
      assert.same({ false, 0, 0 }, { t.authentic, #t.tlsa, t.usable })
      -- a bogus TLSA lookup is a (temporary) failure
      local res, err, detail = dane.lookup("mx.bad.example.test", { port = port })
      assert.same({ nil, "dns" }, { res, err })
      assert.matches("SERVFAIL", detail, 1, true)
      -- the default port is 25
      t = assert(dane.lookup("ee.example.test"))
      assert.same({ 0, "ee.example.test" }, { #t.tlsa, t.base_domain })

      assert.same({ "mx.example.org" }, dane.names { base_domain = "mx.example.org", host = "MX.example.org." })
      assert.same({ "mx2.example.net", "mx.example.org", "example.org" }, dane.names {
        base_domain = "mx2.example.net", host = "mx.example.org", next_hop = "example.org", mx_authentic = true })
      assert.same({ "mx.example.org" }, dane.names {
        base_domain = "mx.example.org", host = "mx.example.org", next_hop = "example.org", mx_authentic = false })
      -- the names go to starttls: here the certificate names the MX host
      -- (mail) while the TLSA records were found at the CNAME target (ta1)
      assert_dane_ok("ta1", { matched = { usage = 2, selector = 1, mtype = 1 }, depth = 1, usable = 1 },
        dane.names { base_domain = "ta1.example.test", host = "mail.example.test" })
    end, 30)
  end)

  it("authenticates our SMTP server after STARTTLS, and refuses it when the records do not match", function()
    H.run(function()
      local server = require "luasmtp.server"
      local smtp_server = assert(server.new {
        listen = "127.0.0.1:0", hostname = "mail.example.test", logger = function() end,
        tls = luasmtp.tls.context { mode = "server", certificate = chain_file, key = certs .. "/sni2.key" },
      })
      local sport = smtp_server:addresses()[1].port
      -- the rig's records are for our TLS port: the record set is what
      -- matters here, not its owner name
      local function session(host)
        local c = assert(luasmtp.connect("127.0.0.1", sport, { timeout = 5 }))
        assert.matches("^220 ", c:receiveline())
        c:send("EHLO client.example.test\r\n")
        local line
        repeat
          line = assert(c:receiveline())
        until line:sub(4, 4) == " "
        c:send("STARTTLS\r\n")
        assert.matches("^220 ", c:receiveline())
        local ok, err, detail = c:starttls(client_ctx, { timeout = 5, dane = {
          base_domain = host .. ".example.test", tlsa = records_of(host),
          names = dane.names { base_domain = host .. ".example.test", host = "mail.example.test" } } })
        if not ok then
          c:close()
          return nil, err, detail
        end
        c:send("EHLO client.example.test\r\n")
        assert.matches("^250", c:receiveline())
        local info = c:tlsinfo()
        c:close()
        return info
      end
      local ok, failure = pcall(function()
        local info = assert(session("ee"))
        assert.same({ usage = 3, selector = 1, mtype = 1 }, info.dane.matched)
        info = assert(session("mail"))
        assert.same({ { usage = 2, selector = 0, mtype = 1 }, 1 }, { info.dane.matched, info.dane.depth })
        local none, err, detail = session("eebad")
        assert.same({ nil, "tls" }, { none, err })
        assert.matches("^DANE: no TLSA record of eebad%.example%.test matches", detail)
      end)
      smtp_server:close()
      assert(ok, failure)
    end, 30)
  end)
end)
