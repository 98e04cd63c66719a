local luasmtp = require "luasmtp"
local core = require "luasmtp.core"
local sasl = require "luasmtp.sasl"
local gs2 = require "luasmtp.sasl.gs2"
local H = require "spec.helper"

local b64, unb64 = core.b64encode, core.b64decode

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

-- A verifier over a plain table: users[name] = { password =, token = }.
-- Certificates with the email SAN client@example.test log in as
-- "certuser"; "admin" may act as anyone, others only as themselves.
local function table_verifier(users, opts)
  opts = opts or {}
  local keys_cache = {}
  local v = { calls = {} }
  function v.verify_password(_, user, password)
    local u = users[user]
    return u ~= nil and u.password ~= nil and core.equal(core.digest("sha256", u.password),
      core.digest("sha256", password))
  end
  function v.scram_keys(_, user, mech)
    local u = users[user]
    if not u or not u.password then return nil end
    local k = mech .. "\0" .. user
    keys_cache[k] = keys_cache[k] or sasl.derive_scram_keys(mech, u.password, "salt of " .. user,
      opts.iterations or 4096)
    return keys_cache[k]
  end
  function v.cram_md5(_, user)
    local u = users[user]
    if not u or not u.password then return nil end
    return function(challenge) return hex(core.hmac("md5", u.password, challenge)) end
  end
  function v.verify_token(_, user, token, mech)
    v.calls[#v.calls + 1] = mech
    local u = users[user]
    if u and u.token == token then return true end
    for name, entry in pairs(users) do
      if user == "" and entry.token == token then return name end
    end
    return false
  end
  function v.external(_, identity, authzid)
    v.identity, v.external_authzid = identity, authzid
    if sasl.certificate_identity(identity) == "client@example.test" then
      return "certuser"
    end
    return nil
  end
  function v.authorize(_, user, authzid)
    return user == "admin" or user == authzid
  end
  return v
end

local USERS = {
  user = { password = "pencil" },
  admin = { password = "admin secret" },
  tokenuser = { token = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==" },
}

-- io over a script of client lines; records what the server sends.
local function script_io(lines)
  local io = { sent = {}, n = 0 }
  function io.send_line(self, line)
    self.sent[#self.sent + 1] = line
    return true
  end
  function io.receive_line(self)
    self.n = self.n + 1
    local l = lines[self.n]
    if l == nil then return nil, "closed" end
    if type(l) == "function" then return l(self) end
    return l
  end
  return io
end

local function policy(extra)
  local p = { verifier = table_verifier(USERS), failure_delay = 0.01, allow_plaintext = true }
  for k, v in pairs(extra or {}) do p[k] = v end
  return p
end

-- Run a server exchange driven by a client mechanism in-process (no
-- socket): the io answers each challenge with the client's step.
local function direct(client, pol)
  local ir = client:start()
  local io = {}
  function io.send_line(self, line)
    local challenge = assert(unb64(line:match("^334 (.*)$")))
    local resp = client:step(challenge)
    self.next = resp and b64(resp) or "*"
    return true
  end
  function io.receive_line(self) return self.next end
  local arg = ir and (ir == "" and "=" or b64(ir)) or nil
  return sasl.server_exchange(io, client.name, arg, pol)
end

-- TLS over a fresh loopback pair.
local function tls_pair(server_extra, client_extra)
  local sctx, cctx = H.tls_contexts(server_extra, client_extra)
  local c, s = H.tcp_pair()
  local st = luasmtp.spawn(function() return s:starttls(sctx, { timeout = 5 }) end)
  assert(c:starttls(cctx, { servername = "localhost", timeout = 5 }))
  assert(st:join(5))
  return c, s
end

-- A minimal AUTH-only SMTP server on sock: serves AUTH commands until the
-- client closes; returns the results.
local function serve_auth(sock, pol)
  local io = sasl.socket_io(sock, 5)
  local results = {}
  while true do
    local line = io:receive_line()
    if not line then return results end
    local mech, ir = line:match("^AUTH (%S+) ?(%S*)$")
    assert(mech, "not an AUTH command: " .. line)
    local res = assert(sasl.server_exchange(io, mech, ir ~= "" and ir or nil, sasl.tls_policy(sock, pol)))
    results[#results + 1] = res
    if res.ok then
      sock:send("235 2.7.0 Authentication successful\r\n")
    else
      sock:send(("%d %s %s\r\n"):format(res.code, res.enhanced, res.text))
    end
  end
end

-- Authenticate once over (c, s): returns the client and server results.
local function auth_once(c, s, pol, mech)
  local st = luasmtp.spawn(serve_auth, s, pol)
  local cres, err, detail = sasl.client_exchange(sasl.socket_io(c, 5), mech)
  assert(cres, detail or err)
  c:close()
  local ok, sres = st:join(5)
  assert(ok, sres)
  s:close()
  return cres, sres[1]
end

describe("SASL", function()
  after_each(H.assert_no_leaks)

  describe("known answers", function()
    it("SCRAM-SHA-1 client: RFC 5802 section 5", function()
      local m = assert(sasl.client("SCRAM-SHA-1", { user = "user", password = "pencil" },
        { nonce = "fyko+d2lbbFgONRv9qkxdawL" }))
      assert.equal("n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL", m:start())
      assert.equal("c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        m:step("r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"))
      assert.is_false(m:complete())
      assert.equal("", m:step("v=rmF9pqV8S7suAoZWja4dJRkFsKQ="))
      assert.is_true(m:complete())
    end)

    it("SCRAM-SHA-256 client: RFC 7677 section 3", function()
      local m = assert(sasl.client("SCRAM-SHA-256", { user = "user", password = "pencil" },
        { nonce = "rOprNGfwEbeRWgbNEkqO" }))
      assert.equal("n,,n=user,r=rOprNGfwEbeRWgbNEkqO", m:start())
      assert.equal("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        .. "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        m:step("r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"))
      assert.is_true(m:finish("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="))
      assert.is_true(m:complete())
    end)

    local function server_kat(mech, salt, snonce, cfirst, sfirst, cfinal, sfinal)
      H.run(function()
        local keys = sasl.derive_scram_keys(mech, "pencil", unb64(salt), 4096)
        local verifier = { scram_keys = function(_, user, m)
          assert.equal("user", user)
          assert.equal(mech, m)
          return keys
        end }
        local io = script_io { b64(cfirst), b64(cfinal), "" }
        local res = sasl.server_exchange(io, mech, nil,
          { verifier = verifier, tls = true, nonce = snonce, failure_delay = 0 })
        assert.same({ "334 ", "334 " .. b64(sfirst), "334 " .. b64(sfinal) }, io.sent)
        assert.same({ ok = true, user = "user", mechanism = mech, code = 235, enhanced = "2.7.0",
          text = "Authentication successful" }, res)
      end)
    end

    it("SCRAM-SHA-1 server: RFC 5802 section 5", function()
      server_kat("SCRAM-SHA-1", "QSXCR+Q6sek8bf92", "3rfcNHYJY1ZVvWVs7j",
        "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
        "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
        "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")
    end)

    it("SCRAM-SHA-256 server: RFC 7677 section 3", function()
      server_kat("SCRAM-SHA-256", "W22ZaJ0SNY7soEsUEjb6gQ==", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
          .. "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    end)

    it("CRAM-MD5: RFC 2195 section 2, both sides", function()
      local challenge = "<1896.697170952@postoffice.reston.mci.net>"
      local m = sasl.client("CRAM-MD5", { user = "tim", password = "tanstaaftanstaaf" })
      assert.is_nil(m:start())
      assert.equal("tim b913a602c7eda7a495b4e6e7334d3890", m:step(challenge))
      H.run(function()
        local io = script_io { b64("tim b913a602c7eda7a495b4e6e7334d3890") }
        local res = sasl.server_exchange(io, "CRAM-MD5", nil, policy {
          verifier = table_verifier { tim = { password = "tanstaaftanstaaf" } },
          challenge = challenge,
        })
        assert.equal("334 PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+", io.sent[1])
        assert.is_true(res.ok)
        assert.equal("tim", res.user)
      end)
    end)

    it("PLAIN: RFC 4616 section 4, both sides", function()
      local m = sasl.client("PLAIN", { user = "tim", password = "tanstaaftanstaaf" })
      assert.equal("\0tim\0tanstaaftanstaaf", m:start())
      m = sasl.client("PLAIN", { authzid = "Ursel", user = "Kurt", password = "xipj3plmq" })
      assert.equal("Ursel\0Kurt\0xipj3plmq", m:start())
      H.run(function()
        local users = { tim = { password = "tanstaaftanstaaf" }, Kurt = { password = "xipj3plmq" } }
        local res = sasl.server_exchange(script_io {}, "PLAIN", b64("\0tim\0tanstaaftanstaaf"),
          policy { verifier = table_verifier(users) })
        assert.same({ ok = true, user = "tim", mechanism = "PLAIN", code = 235, enhanced = "2.7.0",
          text = "Authentication successful" }, res)
        -- Kurt may not act as Ursel with this verifier
        res = sasl.server_exchange(script_io {}, "PLAIN", b64("Ursel\0Kurt\0xipj3plmq"),
          policy { verifier = table_verifier(users) })
        assert.same({ 535, "5.7.8" }, { res.code, res.enhanced })
        assert.equal("authorization denied", res.reason)
      end)
    end)
  end)

  describe("SASLprep and names", function()
    it("maps spaces, drops ignorable characters, refuses controls", function()
      assert.equal("user", sasl.saslprep("user"))
      assert.equal("IX", sasl.saslprep("I\u{AD}X")) -- RFC 4013 section 3 example
      assert.equal("a b", sasl.saslprep("a\u{A0}b"))
      assert.equal("a b", sasl.saslprep("a\u{3000}b"))
      assert.equal("\u{E9}t\u{E9}", sasl.saslprep("\u{E9}t\u{E9}"))
      assert.is_nil(sasl.saslprep("a\7b")) -- RFC 4013: <U+0007> is prohibited
      assert.is_nil(sasl.saslprep("a\0b"))
      assert.is_nil(sasl.saslprep("a\u{202E}b"))
      assert.is_nil(sasl.saslprep("a\u{E000}b"))
      assert.is_nil(sasl.saslprep("\xff\xfe"))
      assert.is_nil(sasl.saslprep(""))
      assert.is_nil(sasl.saslprep("\u{AD}"))
    end)

    it("escapes user names in SCRAM messages", function()
      assert.equal("a=2Cb=3Dc", gs2.encode_name("a,b=c"))
      assert.equal("a,b=c", gs2.decode_name("a=2Cb=3Dc"))
      assert.is_nil(gs2.decode_name("a=2Xb"))
      assert.is_nil(gs2.decode_name("a="))
      assert.is_nil(gs2.decode_name("a,b"))
      assert.is_nil(gs2.decode_name(""))
      local m = assert(sasl.client("SCRAM-SHA-256", { user = "a,b=c", password = "p", authzid = "x=y" },
        { nonce = "abc" }))
      assert.equal("n,a=x=3Dy,n=a=2Cb=3Dc,r=abc", m:start())
    end)

    it("refuses credentials SASLprep refuses", function()
      local m, err, detail = sasl.client("SCRAM-SHA-1", { user = "u", password = "bad\1" })
      assert.is_nil(m)
      assert.equal("invalid", err)
      assert.matches("password", detail)
    end)
  end)

  describe("server_mechanisms", function()
    local store = table_verifier(USERS)

    it("offers nothing before TLS unless plaintext is allowed", function()
      assert.same({}, sasl.server_mechanisms { verifier = store, tls = false })
      assert.same({ "SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2" },
        sasl.server_mechanisms { verifier = store, allow_plaintext = true })
    end)

    it("offers -PLUS only with channel binding, EXTERNAL only with a verified certificate", function()
      local cb = function(kind) return kind == "tls-exporter" and string.rep("x", 32) or nil end
      local list = sasl.server_mechanisms { verifier = store, tls = true, channel_binding = cb,
        tlsinfo = { version = "TLSv1.3", verified = true, peer = { common_name = "x" } } }
      assert.same({ "SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-1", "CRAM-MD5",
        "PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2", "EXTERNAL" }, list)
      -- TLS 1.3 has no tls-unique: no -PLUS when only that is allowed
      list = sasl.server_mechanisms { verifier = store, tls = true, channel_binding = cb,
        cb_types = { "tls-unique" }, tlsinfo = { version = "TLSv1.3", verified = false, peer = {} } }
      assert.same({ "SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2" },
        list)
    end)

    it("follows the verifier's capabilities and the allow-list", function()
      local v = { verify_password = function() return false end, scram_keys = function() end,
        cram_md5 = function() end,
        capabilities = function() return { plaintext = true, cram_md5 = false,
          scram = { ["SCRAM-SHA-256"] = true } } end }
      assert.same({ "SCRAM-SHA-256", "PLAIN", "LOGIN" }, sasl.server_mechanisms { verifier = v, tls = true })
      assert.same({ "PLAIN" }, sasl.server_mechanisms { verifier = v, tls = true, mechanisms = { "plain", "x" } })
      assert.same({}, sasl.server_mechanisms { tls = true })
    end)
  end)

  describe("choose", function()
    local creds = { user = "user", password = "pencil" }
    local cb = { type = "tls-exporter", data = string.rep("c", 32) }
    local all = "PLAIN LOGIN CRAM-MD5 SCRAM-SHA-1 SCRAM-SHA-1-PLUS SCRAM-SHA-256 SCRAM-SHA-256-PLUS"

    it("picks the strongest mechanism both sides have", function()
      assert.equal("SCRAM-SHA-256-PLUS", sasl.choose(all, creds, { tls = true, channel_binding = cb }).name)
      assert.equal("SCRAM-SHA-256", sasl.choose(all, creds, { tls = true }).name)
      assert.equal("SCRAM-SHA-1", sasl.choose({ "PLAIN", "SCRAM-SHA-1" }, creds, { tls = true }).name)
      assert.equal("CRAM-MD5", sasl.choose({ "LOGIN", "cram-md5" }, creds, { tls = true }).name)
      assert.equal("PLAIN", sasl.choose({ "LOGIN", "PLAIN" }, creds, { tls = true }).name)
      assert.equal("LOGIN", sasl.choose({ "LOGIN" }, creds, { tls = true }).name)
      assert.equal("LOGIN", sasl.choose(all, creds, { tls = true, mechanisms = { "LOGIN" } }).name)
    end)

    it("refuses PLAIN and LOGIN without TLS unless allowed", function()
      local m, err, detail = sasl.choose({ "PLAIN", "LOGIN" }, creds, { tls = false })
      assert.is_nil(m)
      assert.equal("unsupported", err)
      assert.matches("PLAIN %(no TLS%)", detail)
      assert.equal("CRAM-MD5", sasl.choose({ "PLAIN", "CRAM-MD5" }, creds, {}).name)
      assert.equal("PLAIN", sasl.choose({ "PLAIN" }, creds, { allow_plaintext = true }).name)
    end)

    it("never downgrades from -PLUS when it has channel binding", function()
      -- SCRAM-SHA-256 is offered but only SCRAM-SHA-1 with -PLUS
      local m = sasl.choose({ "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "PLAIN" }, creds,
        { tls = true, channel_binding = cb })
      assert.equal("SCRAM-SHA-1-PLUS", m.name)
      assert.matches("^p=tls%-exporter,,", m:start())
      -- no -PLUS offered: plain SCRAM with "y" (we support it, the server does not)
      m = sasl.choose({ "SCRAM-SHA-256" }, creds, { tls = true, channel_binding = cb })
      assert.matches("^y,,", m:start())
      -- without channel binding: "n"
      m = sasl.choose({ "SCRAM-SHA-256-PLUS", "SCRAM-SHA-256" }, creds, { tls = true })
      assert.equal("SCRAM-SHA-256", m.name)
      assert.matches("^n,,", m:start())
    end)

    it("uses tokens and EXTERNAL when given them", function()
      local tok = { user = "u", token = "abc" }
      assert.equal("OAUTHBEARER", sasl.choose({ "XOAUTH2", "OAUTHBEARER", "PLAIN" }, tok, { tls = true }).name)
      assert.equal("XOAUTH2", sasl.choose({ "XOAUTH2", "PLAIN" }, tok, { tls = true }).name)
      assert.is_nil(sasl.choose({ "XOAUTH2" }, tok, { tls = false }))
      assert.equal("EXTERNAL", sasl.choose({ "PLAIN", "EXTERNAL" }, { external = true }, { tls = true }).name)
      assert.is_nil(sasl.choose({ "PLAIN", "EXTERNAL" }, {}, { tls = true }))
    end)

    it("raises on programming errors", function()
      assert.has_error(function() sasl.client("NOPE", creds) end)
      assert.has_error(function() sasl.client("PLAIN", { user = "u" }) end)
      assert.has_error(function() sasl.client("SCRAM-SHA-256-PLUS", creds, {}) end)
      assert.has_error(function() sasl.client("SCRAM-SHA-1", creds, { nonce = "a,b" }) end)
    end)
  end)

  describe("end to end over TLS", function()
    local MECHS = { "SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-1", "CRAM-MD5",
      "PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER" }

    local function creds_for(mech)
      if mech == "XOAUTH2" or mech == "OAUTHBEARER" then
        return { user = "tokenuser", token = USERS.tokenuser.token }
      end
      return { user = "user", password = "pencil" }
    end

    local function every_mechanism(server_extra, version, cb_type)
      H.run(function()
        for _, mech in ipairs(MECHS) do
          local c, s = tls_pair(server_extra)
          assert.equal(version, c:tlsinfo().version)
          -- a client with channel binding would send "y" for a plain SCRAM
          -- to this server (which offers -PLUS) and be refused: see below
          local opts = { tls = true, channel_binding = mech:find("PLUS") and sasl.tls_binding(c) or nil }
          assert.equal(cb_type, sasl.tls_binding(c).type)
          local m = assert(sasl.choose({ mech }, creds_for(mech), opts))
          local cres, sres = auth_once(c, s, policy(), m)
          assert.is_true(cres.ok, mech .. ": " .. tostring(cres.client_error or cres.text))
          assert.same({ 235, "2.7.0", "Authentication successful" }, { cres.code, cres.enhanced, cres.text })
          assert.is_true(sres.ok)
          assert.equal(mech, sres.mechanism)
          assert.equal(creds_for(mech).user, sres.user)
          if mech:find("PLUS") then
            assert.equal(cb_type, sres.channel_binding)
          end
        end
      end, 30)
    end

    it("every mechanism on TLS 1.3 (tls-exporter)", function()
      every_mechanism(nil, "TLSv1.3", "tls-exporter")
    end)

    it("every mechanism on TLS 1.2 (tls-unique)", function()
      every_mechanism({ max_version = "tls1.2" }, "TLSv1.2", "tls-unique")
    end)

    it("EXTERNAL with a verified client certificate", function()
      H.run(function()
        local d = H.certs()
        local c, s = tls_pair({ cafile = d .. "/ca.pem", verify = "optional" },
          { certificate = d .. "/client.pem", key = d .. "/client.key" })
        local pol = policy()
        assert.same("EXTERNAL", sasl.server_mechanisms(sasl.tls_policy(s, pol))[10])
        local m = assert(sasl.choose({ "PLAIN", "EXTERNAL" }, { external = true }, { tls = true }))
        local cres, sres = auth_once(c, s, pol, m)
        assert.is_true(cres.ok)
        assert.same({ true, "certuser", "EXTERNAL" }, { sres.ok, sres.user, sres.mechanism })
        assert.equal("client@example.test", pol.verifier.identity.sans.email[1])
        assert.is_nil(pol.verifier.external_authzid)

        -- asking to act as someone else: the verifier's authorize says no
        c, s = tls_pair({ cafile = d .. "/ca.pem", verify = "optional" },
          { certificate = d .. "/client.pem", key = d .. "/client.key" })
        m = sasl.client("EXTERNAL", { authzid = "admin" })
        cres, sres = auth_once(c, s, pol, m)
        assert.same({ false, 535 }, { cres.ok, cres.code })
        assert.equal("admin", pol.verifier.external_authzid)
        assert.equal("authorization denied", sres.reason)
      end)
    end)

    it("no EXTERNAL without a verified certificate", function()
      H.run(function()
        local c, s = tls_pair({ verify = "optional" })
        local pol = sasl.tls_policy(s, policy())
        for _, m in ipairs(sasl.server_mechanisms(pol)) do
          assert.not_equal("EXTERNAL", m)
        end
        local res = sasl.server_exchange(script_io {}, "EXTERNAL", "=", pol)
        assert.same({ 504, "5.5.4" }, { res.code, res.enhanced })
        c:close()
        s:close()
      end)
    end)

    it("works with a luasmtp.credentials table store as the verifier", function()
      local ok, credentials = pcall(require, "luasmtp.credentials")
      if not ok then return end
      H.run(function()
        local store = credentials.table { user = "pencil", other = "{PLAIN}secret" }
        for _, mech in ipairs { "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN" } do
          local c, s = tls_pair()
          local m = assert(sasl.client(mech, { user = "user", password = "pencil" },
            { channel_binding = mech:find("PLUS") and sasl.tls_binding(c) or nil }))
          local cres, sres = auth_once(c, s, { verifier = store, failure_delay = 0.01 }, m)
          assert.is_true(cres.ok, mech)
          assert.equal("user", sres.user)
        end
        local c, s = tls_pair()
        local cres = auth_once(c, s, { verifier = store, failure_delay = 0.01 },
          sasl.client("SCRAM-SHA-256", { user = "user", password = "wrong" }))
        assert.same({ false, 535, "5.7.8" }, { cres.ok, cres.code, cres.enhanced })
      end, 20)
    end)

    it("fails on a channel binding mismatch", function()
      H.run(function()
        local c, s = tls_pair()
        local cb = sasl.tls_binding(c)
        cb.data = cb.data:sub(1, -2) .. string.char((cb.data:byte(-1) + 1) % 256)
        local m = sasl.client("SCRAM-SHA-256-PLUS", { user = "user", password = "pencil" },
          { channel_binding = cb })
        local cres, sres = auth_once(c, s, policy(), m)
        assert.same({ false, 535, "5.7.8" }, { cres.ok, cres.code, cres.enhanced })
        assert.equal("server error: channel-bindings-dont-match", cres.client_error)
        assert.equal("channel binding mismatch", sres.reason)

        -- tls-unique asked for on TLS 1.3
        c, s = tls_pair()
        m = sasl.client("SCRAM-SHA-1-PLUS", { user = "user", password = "pencil" },
          { channel_binding = { type = "tls-unique", data = string.rep("u", 12) } })
        cres, sres = auth_once(c, s, policy(), m)
        assert.same({ false, 535 }, { cres.ok, cres.code })
        assert.matches("unsupported channel binding type", sres.reason)
      end)
    end)

    it("detects a downgrade: a server offering -PLUS refuses y", function()
      H.run(function()
        local c, s = tls_pair()
        local m = sasl.client("SCRAM-SHA-256", { user = "user", password = "pencil" },
          { channel_binding = sasl.tls_binding(c) })
        local cres, sres = auth_once(c, s, policy(), m)
        assert.same({ false, 535 }, { cres.ok, cres.code })
        assert.matches("downgrade", sres.reason)
        -- a server that does not offer -PLUS takes y
        c, s = tls_pair()
        m = sasl.client("SCRAM-SHA-256", { user = "user", password = "pencil" },
          { channel_binding = sasl.tls_binding(c) })
        cres = auth_once(c, s, policy { mechanisms = { "SCRAM-SHA-256" } }, m)
        assert.is_true(cres.ok)
      end)
    end)

    it("answers a wrong password and an unknown user alike", function()
      H.run(function()
        for _, mech in ipairs { "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN" } do
          local replies = {}
          for _, cr in ipairs { { user = "user", password = "wrong" }, { user = "nobody", password = "pencil" } } do
            local c, s = tls_pair()
            local m = sasl.client(mech, cr, { channel_binding = mech:find("PLUS") and sasl.tls_binding(c) or nil })
            local cres, sres = auth_once(c, s, policy(), m)
            assert.is_false(cres.ok)
            assert.is_false(sres.ok)
            replies[#replies + 1] = { cres.code, cres.enhanced, cres.text, cres.client_error, sres.reason }
          end
          assert.same({ 535, "5.7.8", "Authentication credentials invalid" },
            { replies[1][1], replies[1][2], replies[1][3] })
          assert.same(replies[1], replies[2])
        end
      end, 30)
    end)

    it("refuses a bad token with the OAuth error exchange", function()
      H.run(function()
        for _, mech in ipairs { "OAUTHBEARER", "XOAUTH2" } do
          local c, s = tls_pair()
          local m = sasl.client(mech, { user = "tokenuser", token = "wrongtoken" }, { host = "localhost", port = 25 })
          local pol = policy { oauth_scope = "mail", oauth_configuration = "https://example.test/.well-known/x" }
          local cres, sres = auth_once(c, s, pol, m)
          assert.same({ false, 535, "5.7.8" }, { cres.ok, cres.code, cres.enhanced })
          assert.equal('{"status":"invalid_token","scope":"mail",'
            .. '"openid-configuration":"https://example.test/.well-known/x"}', cres.oauth_error)
          assert.is_false(sres.ok)
        end
      end)
    end)
  end)

  describe("server exchange with bad input", function()
    local function run(lines, mech, ir, pol)
      local io = script_io(lines)
      local res, err = sasl.server_exchange(io, mech, ir, pol or policy())
      return res, io, err
    end

    it("cancels on *", function()
      H.run(function()
        local res, io = run({ "*" }, "LOGIN")
        assert.same({ false, 501, "5.0.0", "Authentication cancelled" }, { res.ok, res.code, res.enhanced, res.text })
        assert.same({ "334 VXNlcm5hbWU6" }, io.sent)
        res = run({ b64("n,,n=user,r=abcdefgh"), "*" }, "SCRAM-SHA-256")
        assert.same({ 501, "5.0.0" }, { res.code, res.enhanced })
      end)
    end)

    it("refuses malformed base64", function()
      H.run(function()
        for _, bad in ipairs { "dXNlcg", "dXNl cg==", "dXNlcg==\0", "=", "****", "Zm9v=" } do
          local res = run({ bad }, "LOGIN")
          assert.same({ 501, "5.5.2", "Invalid base64 data" }, { res.code, res.enhanced, res.text }, bad)
        end
        local res = run({}, "PLAIN", "not base64!")
        assert.same({ 501, "5.5.2" }, { res.code, res.enhanced })
      end)
    end)

    it("refuses oversized messages before decoding them", function()
      H.run(function()
        local big = b64(string.rep("x", sasl.MAX_MESSAGE + 1))
        local res = run({ big }, "PLAIN")
        assert.same({ 500, "5.5.6" }, { res.code, res.enhanced })
        res = run({}, "PLAIN", string.rep("A", 16388))
        assert.same({ 500, "5.5.6" }, { res.code, res.enhanced })
        -- exactly the limit is fine (and then a failed password)
        res = run({}, "PLAIN", b64("\0user\0" .. string.rep("x", sasl.MAX_MESSAGE - 6)))
        assert.same({ 535, "5.7.8" }, { res.code, res.enhanced })
        -- a lower limit from the policy
        res = run({}, "PLAIN", b64("\0user\0pencil"), policy { max_message = 8 })
        assert.equal(500, res.code)
        -- the socket's own line cap: nil, "limit" from receive_line
        res = run({ function() return nil, "limit" end }, "LOGIN")
        assert.same({ 500, "5.5.6" }, { res.code, res.enhanced })
      end)
    end)

    it("refuses an oversized line over a socket and keeps the connection usable", function()
      H.run(function()
        local c, s = H.tcp_pair()
        local st = luasmtp.spawn(function()
          local io = sasl.socket_io(s, 5)
          local r1 = sasl.server_exchange(io, "PLAIN", nil, policy())
          local r2 = sasl.server_exchange(io, "PLAIN", b64("\0user\0pencil"), policy())
          return r1, r2
        end)
        assert.equal("334 ", c:receiveline(nil, 5))
        c:send(string.rep("A", 40000) .. "\r\n")
        local ok, r1, r2 = st:join(5)
        assert.is_true(ok)
        assert.same({ 500, "5.5.6" }, { r1.code, r1.enhanced })
        assert.is_true(r2.ok)
        c:close()
        s:close()
      end)
    end)

    it("refuses empty and malformed messages", function()
      H.run(function()
        local cases = {
          { "PLAIN", "=" }, { "PLAIN", b64("user\0pencil") }, { "PLAIN", b64("\0\0pencil") },
          { "PLAIN", b64("\0user\0") }, { "PLAIN", b64("\0us\xffer\0pencil") },
          { "SCRAM-SHA-256", "=" }, { "SCRAM-SHA-1", b64("n,,") }, { "SCRAM-SHA-1", b64("x,,n=user,r=abc") },
          { "SCRAM-SHA-1", b64("n,,r=abc,n=user") }, { "SCRAM-SHA-1", b64("n,,n=us=er,r=abc") },
          { "SCRAM-SHA-1", b64("n,,m=ext,n=user,r=abc") }, { "SCRAM-SHA-1", b64("n,,n=user,r=a\1b") },
          { "SCRAM-SHA-1", b64("n,,n=us\7er,r=abc") }, { "SCRAM-SHA-1", b64("p=tls-exporter,,n=user,r=abc") },
          { "CRAM-MD5", b64("tim b913a602c7eda7a495b4e6e7334d3890") },
          { "OAUTHBEARER", b64("n,,\1auth=Bearer\1\1") }, { "OAUTHBEARER", b64("p=x,,\1auth=Bearer abc\1\1") },
          { "XOAUTH2", b64("user=u\1auth=Basic abc\1\1") }, { "XOAUTH2", "=" },
        }
        for _, case in ipairs(cases) do
          local res = run({}, case[1], case[2])
          assert.same({ false, 501, "5.5.2" }, { res.ok, res.code, res.enhanced }, case[1] .. " " .. case[2])
        end
        -- an empty continuation line is an empty message
        local res = run({ "" }, "PLAIN")
        assert.same({ 501, "5.5.2" }, { res.code, res.enhanced })
      end)
    end)

    it("refuses SCRAM messages out of order", function()
      H.run(function()
        -- client-final first
        local res = run({}, "SCRAM-SHA-256", b64("c=biws,r=abcdef,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="))
        assert.same({ 501, "5.5.2" }, { res.code, res.enhanced })
        -- client-first twice
        local first = b64("n,,n=user,r=abcdefgh")
        res = run({ first }, "SCRAM-SHA-256", first)
        assert.same({ 501, "5.5.2" }, { res.code, res.enhanced })
        -- a client-final with a nonce that is not the server's
        local io = script_io { b64("c=biws,r=abcdefghXXXX,p=" .. b64(string.rep("p", 32))) }
        res = sasl.server_exchange(io, "SCRAM-SHA-256", first, policy())
        assert.same({ 501, "5.5.2" }, { res.code, res.enhanced })
        assert.equal("nonce mismatch", res.reason)
      end)
    end)

    it("answers 504 to mechanisms it does not offer", function()
      H.run(function()
        local res = run({}, "DIGEST-MD5")
        assert.same({ false, 504, "5.5.4" }, { res.ok, res.code, res.enhanced })
        res = run({}, "PLAIN", b64("\0user\0pencil"), { verifier = table_verifier(USERS) }) -- no TLS
        assert.equal(504, res.code)
        res = run({}, "SCRAM-SHA-256-PLUS", nil, policy())
        assert.equal(504, res.code)
      end)
    end)

    it("answers 454 when the verifier's backend fails", function()
      H.run(function()
        local v = {
          verify_password = function() return nil, "io", "database down" end,
          scram_keys = function() return nil, "timeout", "ldap timeout" end,
        }
        local res = run({}, "PLAIN", b64("\0user\0pencil"), policy { verifier = v })
        assert.same({ 454, "4.7.0", "database down" }, { res.code, res.enhanced, res.reason })
        res = run({}, "SCRAM-SHA-1", b64("n,,n=user,r=abcdefgh"), policy { verifier = v })
        assert.same({ 454, "4.7.0", "ldap timeout" }, { res.code, res.enhanced, res.reason })
      end)
    end)

    it("waits failure_delay before a 535", function()
      H.run(function()
        local t0 = luasmtp.update_now()
        local res = run({}, "PLAIN", b64("\0user\0wrong"), policy { failure_delay = 0.2 })
        assert.equal(535, res.code)
        assert.is_true(luasmtp.update_now() - t0 >= 0.19)
      end)
    end)

    it("gives a stable salt for unknown SCRAM users", function()
      H.run(function()
        local function salt_of(user)
          local io = script_io {}
          sasl.server_exchange(io, "SCRAM-SHA-256", b64("n,,n=" .. user .. ",r=abcdefgh"), policy())
          return unb64(io.sent[1]:sub(5)):match(",s=([^,]+),i=(%d+)$")
        end
        local s1, i1 = salt_of("ghost")
        assert.equal(s1, (salt_of("ghost")))
        assert.not_equal(s1, (salt_of("phantom")))
        assert.equal("4096", i1)
      end)
    end)

    it("lets admin act for another user and nobody else", function()
      H.run(function()
        local res = run({}, "PLAIN", b64("user\0admin\0admin secret"))
        assert.same({ true, "admin", "user" }, { res.ok, res.user, res.authzid })
        res = run({}, "PLAIN", b64("admin\0user\0pencil"))
        assert.same({ false, 535 }, { res.ok, res.code })
        res = direct(sasl.client("SCRAM-SHA-256", { user = "admin", password = "admin secret", authzid = "user" }),
          policy())
        assert.same({ true, "admin", "user" }, { res.ok, res.user, res.authzid })
      end)
    end)

    it("takes the user from the token when OAUTHBEARER has no a=", function()
      H.run(function()
        local m = sasl.client("OAUTHBEARER", { token = USERS.tokenuser.token })
        assert.equal("n,,\1auth=Bearer " .. USERS.tokenuser.token .. "\1\1", m:start())
        local pol = policy()
        local res = direct(sasl.client("OAUTHBEARER", { token = USERS.tokenuser.token }), pol)
        assert.same({ true, "tokenuser", "OAUTHBEARER" }, { res.ok, res.user, res.mechanism })
        assert.same({ "OAUTHBEARER" }, pol.verifier.calls)
        -- the client answers the error status with ^A, then the server fails
        local io = script_io { b64("\1") }
        res = sasl.server_exchange(io, "OAUTHBEARER", b64("n,,\1auth=Bearer bad\1\1"), policy())
        assert.equal("334 " .. b64('{"status":"invalid_token"}'), io.sent[1])
        assert.same({ false, 535 }, { res.ok, res.code })
      end)
    end)

    it("returns I/O failures as values", function()
      H.run(function()
        local res, _, err = run({}, "LOGIN")
        assert.same({ nil, "closed" }, { res, err })
        local io = { send_line = function() return nil, "reset", "peer reset" end, receive_line = function() end }
        assert.same({ nil, "reset", "peer reset" }, { sasl.server_exchange(io, "LOGIN", nil, policy()) })
      end)
    end)
  end)

  describe("client against a misbehaving server", function()
    -- A scripted server: `replies` are the lines it sends, in order.
    local function against(mech, replies)
      local io = script_io(replies)
      local res, err, detail = sasl.client_exchange(io, mech)
      return res, io.sent, err, detail
    end

    local function scram(opts)
      return assert(sasl.client("SCRAM-SHA-256", { user = "user", password = "pencil" },
        opts or { nonce = "rOprNGfwEbeRWgbNEkqO" }))
    end

    it("checks that the server nonce extends the client nonce", function()
      for _, first in ipairs { "r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096" } do
        local res, sent = against(scram(), { "334 " .. b64(first), "501 5.0.0 Authentication cancelled" })
        assert.equal("*", sent[2])
        assert.same({ false, 501 }, { res.ok, res.code })
        assert.matches("does not extend", res.client_error)
      end
    end)

    it("checks iteration counts and salts", function()
      local cases = {
        { "i=0", "invalid iteration count" }, { "i=-1", "invalid iteration count" },
        { "i=abc", "invalid iteration count" }, { "i=4095", "below the minimum" },
        { "i=1000001", "above the maximum" }, { "i=99999999999", "invalid iteration count" },
      }
      for _, case in ipairs(cases) do
        local first = "r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==," .. case[1]
        local res = against(scram(), { "334 " .. b64(first), "501 5.0.0 cancelled" })
        assert.matches(case[2], res.client_error, 1, true)
      end
      local m = scram { nonce = "abc", min_iterations = 1 }
      m:start()
      assert.is_string(m:step("r=abcdef,s=c2FsdA==,i=1"))
      m = scram { nonce = "abc", max_iterations = 5000 }
      m:start()
      assert.is_nil(m:step("r=abcdef,s=c2FsdA==,i=5001"))
      for _, first in ipairs { "r=abcdef,i=4096", "r=abcdef,s=,i=4096", "r=abcdef,s=###,i=4096",
        "s=c2FsdA==,r=abcdef,i=4096", "m=x,r=abcdef,s=c2FsdA==,i=4096", "garbage", "" } do
        m = scram { nonce = "abc" }
        m:start()
        local r, err = m:step(first)
        assert.is_nil(r, first)
        assert.is_string(err)
      end
    end)

    it("verifies the server signature", function()
      local first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
      local bad = "v=" .. b64(string.rep("\0", 32))
      local res, sent = against(scram(), { "334 " .. b64(first), "334 " .. b64(bad), "501 5.0.0 cancelled" })
      assert.equal("*", sent[3])
      assert.is_false(res.ok)
      assert.matches("signature mismatch", res.client_error)
      -- a success before the server has proved itself is not a success
      res = against(scram(), { "334 " .. b64(first), "235 2.7.0 ok" })
      assert.same({ false, 235 }, { res.ok, res.code })
      assert.matches("before the exchange was complete", res.client_error)
      -- the server's e= is answered with an empty response
      res, sent = against(scram(), { "334 " .. b64(first), "334 " .. b64("e=invalid-proof"),
        "535 5.7.8 Authentication credentials invalid" })
      assert.equal("", sent[3])
      assert.same({ false, 535, "5.7.8" }, { res.ok, res.code, res.enhanced })
      assert.equal("server error: invalid-proof", res.client_error)
      -- an unexpected server-final
      local m = scram()
      m:start()
      assert.is_nil(m:finish("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="))
    end)

    it("reads multi-line replies and refuses garbage", function()
      local res = against(sasl.client("PLAIN", { user = "u", password = "p" }),
        { "535-5.7.8 first line", "535 5.7.8 second line" })
      assert.same({ false, 535, "5.7.8", "first line\nsecond line" }, { res.ok, res.code, res.enhanced, res.text })
      local r, _, err = against(sasl.client("PLAIN", { user = "u", password = "p" }), { "hello" })
      assert.same({ nil, "protocol" }, { r, err })
      r, _, err = against(sasl.client("PLAIN", { user = "u", password = "p" }), { "535-a", "250 b" })
      assert.same({ nil, "protocol" }, { r, err })
      r, _, err = against(sasl.client("PLAIN", { user = "u", password = "p" }), {})
      assert.same({ nil, "closed" }, { r, err })
      -- a challenge that is not base64
      res = against(sasl.client("LOGIN", { user = "u", password = "p" }), { "334 ***", "501 cancelled" })
      assert.equal("invalid base64 in server challenge", res.client_error)
    end)

    it("sends a long initial response after an empty challenge", function()
      local m = sasl.client("PLAIN", { user = "u", password = string.rep("p", 600) })
      local res, sent = against(m, { "334 ", "235 2.7.0 ok" })
      assert.is_true(res.ok)
      assert.equal("AUTH PLAIN", sent[1])
      assert.equal(b64("\0u\0" .. string.rep("p", 600)), sent[2])
      res, sent = against(sasl.client("PLAIN", { user = "u", password = "p" }), { "235 2.7.0 ok" })
      assert.is_true(res.ok)
      assert.equal("AUTH PLAIN " .. b64("\0u\0p"), sent[1])
      res, sent = against(sasl.client("EXTERNAL"), { "235 2.7.0 ok" })
      assert.is_true(res.ok)
      assert.equal("AUTH EXTERNAL =", sent[1])
    end)
  end)
end)
