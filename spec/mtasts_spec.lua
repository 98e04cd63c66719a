--- MTA-STS (lua/luasmtp/delivery/mtasts.lua): parsing, the one-label
-- wildcard, and policy(): TXT lookups through an injected DNS function
-- (and once through the resolve_txt fallback against spec/fake_dns.py),
-- policies fetched from spec/https_server.py over HTTPS with the test PKI
-- (mta-sts.<domain>.test mapped to 127.0.0.1), the persistent cache.
local luasmtp = require "luasmtp"
local mtasts = require "luasmtp.delivery.mtasts"
local txt = require "luasmtp.delivery.txt"
local H = require "spec.helper"

local ENFORCE = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.mx.example.test\r\n" ..
  "max_age: 86400\r\n"

describe("mtasts parsing", function()
  it("reads TXT records strictly", function()
    assert.equal("20160831085700Z", mtasts.parse_txt("v=STSv1; id=20160831085700Z;"))
    assert.equal("abc", mtasts.parse_txt("v=STSv1;id=abc"))
    assert.equal("abc", mtasts.parse_txt("v=STSv1 ;\tid=abc ; ext-1.x=va:lue ;"))
    assert.equal(string.rep("a", 32), mtasts.parse_txt("v=STSv1; id=" .. string.rep("a", 32)))
    for _, bad in ipairs {
      "v=STSv1;", "v=STSv1", "v=STSv1; id=", "v=STSv1; id=" .. string.rep("a", 33), "v=STSv1; id=ab-c",
      "v=STSv1; id=a; id=b", "id=abc; v=STSv1", "v=STSv2; id=abc", "v=STSv1 id=abc", "v=STSv1; id=abc;;",
      "v=STSv1; =x; id=abc", "v=STSv1; id=abc; e=a=b", "v=STSv1; id=abc; e=\128", "V=STSv1; id=abc",
    } do
      assert.is_nil(mtasts.parse_txt(bad), bad)
    end
    -- exactly one record starting with v=STSv1 counts; others are ignored
    assert.equal("x1", mtasts.select_txt { "v=spf1 -all", "v=STSv1; id=x1" })
    assert.is_nil(mtasts.select_txt { "v=STSv1; id=x1", "v=STSv1; id=x2" })
    assert.is_nil(mtasts.select_txt { "v=spf1 -all" })
    assert.is_nil(mtasts.select_txt {})
    local id, why = mtasts.select_txt { "v=STSv1; id=" }
    assert.is_nil(id)
    assert.matches("invalid", why)
  end)

  it("reads policies strictly, CRLF or LF", function()
    local p = assert(mtasts.parse_policy(ENFORCE))
    assert.same({ version = "STSv1", mode = "enforce", max_age = 86400,
      mx = { "mx1.example.test", "*.mx.example.test" } }, p)
    assert.same(p, mtasts.parse_policy((ENFORCE:gsub("\r\n", "\n"))))
    assert.same(p, mtasts.parse_policy((ENFORCE:gsub("\r\n$", "")))) -- no final line end
    assert.same(p, mtasts.parse_policy(ENFORCE:gsub("mode: enforce", "mode:enforce \t")))
    assert.same(p, mtasts.parse_policy(ENFORCE .. "ext_1: some value\r\n"))
    assert.same(p, mtasts.parse_policy((ENFORCE:gsub("mx1", "MX1"))))
    assert.same({ version = "STSv1", mode = "none", max_age = 0, mx = {} },
      mtasts.parse_policy("version: STSv1\nmode: none\nmax_age: 0\n"))
    assert.equal(31557600, mtasts.parse_policy("version: STSv1\nmode: testing\nmx: a.test\nmax_age: 31557600").max_age)
    local bad = {
      "",
      "mode: enforce\r\nversion: STSv1\r\nmx: a.test\r\nmax_age: 1\r\n", -- version not first
      ENFORCE:gsub("STSv1", "STSv2"),
      ENFORCE:gsub("mode: enforce", "mode: Enforce"),
      ENFORCE:gsub("max_age: 86400", "max_age: 31557601"),
      ENFORCE:gsub("max_age: 86400", "max_age: 00000000001"),
      ENFORCE:gsub("max_age: 86400", "max_age: -1"),
      ENFORCE:gsub("max_age: 86400", "max_age: 1e3"),
      ENFORCE:gsub("max_age: 86400\r\n", ""),
      ENFORCE:gsub("mode: enforce\r\n", ""),
      "version: STSv1\nmode: enforce\nmax_age: 10\n", -- no mx
      ENFORCE .. "mode: testing\r\n",
      ENFORCE .. "\r\n",                              -- empty line
      ENFORCE:gsub("\r\nmode", "\rmode"),             -- bare CR
      ENFORCE .. "mx: *.*.example.test\r\n",
      ENFORCE .. "mx: *example.test\r\n",
      ENFORCE .. "mx: mx..example.test\r\n",
      ENFORCE .. "mx: mx.example.test.\r\n",
      ENFORCE .. "mx: -mx.example.test\r\n",
      ENFORCE .. "mx:\r\n",
      ENFORCE .. "not a field\r\n",
      ENFORCE .. "ext: bad\1value\r\n",
      ENFORCE .. " folded: x\r\n",
      "version: STSv1\0\nmode: none\nmax_age: 1\n",
      ENFORCE .. string.rep("x: y\n", 14000), -- past 64 KiB
    }
    for i, text in ipairs(bad) do
      assert.is_nil(mtasts.parse_policy(text), "case " .. i)
    end
  end)

  it("matches MX names with the one-label wildcard", function()
    local p = { mx = { "mx1.example.test", "*.mx.example.test" } }
    assert.is_true(mtasts.mx_matches(p, "mx1.example.test"))
    assert.is_true(mtasts.mx_matches(p, "MX1.Example.Test."))
    assert.is_true(mtasts.mx_matches(p, "a.mx.example.test"))
    assert.is_false(mtasts.mx_matches(p, "a.b.mx.example.test"))
    assert.is_false(mtasts.mx_matches(p, "mx.example.test"))
    assert.is_false(mtasts.mx_matches(p, ".mx.example.test"))
    assert.is_false(mtasts.mx_matches(p, "mx2.example.test"))
    assert.is_false(mtasts.mx_matches(p, "xmx1.example.test"))
    assert.is_false(mtasts.mx_matches(p, "amx.example.test"))
    assert.is_false(mtasts.mx_matches({ mx = {} }, "mx1.example.test"))
  end)
end)

describe("mtasts policy", function()
  local server, root, cache_dir, ca
  local records, queries, fetches, clock

  local DOMAINS = { "example", "testing", "none", "redirect", "big", "invalid", "missing", "refresh", "ctype",
    "nocert" }

  local function write(path, data)
    os.execute("mkdir -p " .. H.shquote(path:match("^(.*)/")))
    local f = assert(io.open(path, "wb"))
    f:write(data)
    f:close()
  end

  local function policy_path(domain)
    return root .. "/mta-sts." .. domain .. "/.well-known/mta-sts.txt"
  end

  local function fake_query(name, qtype)
    assert.equal("TXT", qtype)
    queries[#queries + 1] = name
    local r = records[name]
    if r == "SERVFAIL" then
      return { rcode = "SERVFAIL", authentic = false, answers = {} }
    elseif r == "TIMEOUT" then
      return nil, "dns", name .. ": timeout"
    elseif r == nil then
      return { rcode = "NXDOMAIN", authentic = false, answers = {} }
    end
    return { rcode = "NOERROR", authentic = false, ttl = 60, answers = r }
  end

  local function counting_request(o)
    fetches[#fetches + 1] = o.url
    return luasmtp.http.request(o)
  end

  local function new(extra)
    local resolve = {}
    for _, d in ipairs(DOMAINS) do
      resolve[#resolve + 1] = "mta-sts." .. d .. ".test:" .. server.port .. ":127.0.0.1"
    end
    local o = {
      cache_dir = cache_dir, dns_query = fake_query, http_request = counting_request, cafile = ca,
      port = server.port, resolve = resolve, timeout = 10, now = function() return clock end,
    }
    for k, v in pairs(extra or {}) do o[k] = v end
    return mtasts.new(o)
  end

  lazy_setup(function()
    ca = H.certs() .. "/ca.pem"
    root = H.tmp .. "/mtasts_root"
    os.execute("rm -rf " .. H.shquote(root))
    server = H.https_server { tag = "mtasts_https", cert = "mtasts", root = root }
    write(policy_path("example.test"), ENFORCE)
    write(policy_path("testing.test"), (ENFORCE:gsub("enforce", "testing")))
    write(policy_path("none.test"), "version: STSv1\nmode: none\nmax_age: 86400\n")
    write(policy_path("redirect.test") .. ".redirect",
      "https://mta-sts.example.test:" .. server.port .. "/.well-known/mta-sts.txt")
    write(policy_path("big.test"), ENFORCE .. string.rep("ext: " .. string.rep("x", 94) .. "\n", 700))
    write(policy_path("invalid.test"), "version: STSv1\nmode: strict\nmax_age: 86400\nmx: a.test\n")
    write(policy_path("ctype.test"), ENFORCE)
    write(policy_path("ctype.test") .. ".ctype", "text/html")
    write(policy_path("nocert.test"), ENFORCE)
  end)

  lazy_teardown(function()
    if server then H.kill(server.pid) end
  end)

  before_each(function()
    cache_dir = H.tmp .. "/mtasts_cache"
    os.execute("rm -rf " .. H.shquote(cache_dir))
    records, queries, fetches, clock = {}, {}, {}, 1700000000
    for _, d in ipairs(DOMAINS) do
      records["_mta-sts." .. d .. ".test"] = { "v=spf1 -all", "v=STSv1; id=id1" }
    end
    write(policy_path("refresh.test"), ENFORCE)
  end)

  after_each(function()
    assert.equal(0, luasmtp.stats().http_requests)
    H.assert_no_leaks()
  end)

  it("fetches an enforce policy, then answers from the cache while the id holds", function()
    H.run(function()
      local sts = new()
      local p = assert(sts:policy("example.test"))
      assert.equal("enforce", p.mode)
      assert.same({ "mx1.example.test", "*.mx.example.test" }, p.mx)
      assert.equal(86400, p.max_age)
      assert.equal("id1", p.id)
      assert.equal("fetched", p.source)
      assert.equal(clock + 86400, p.expires)
      assert.same({ "https://mta-sts.example.test:" .. server.port .. "/.well-known/mta-sts.txt" }, fetches)
      assert.same({ "_mta-sts.example.test" }, queries)
      assert.is_true(mtasts.mx_matches(p, "mx1.example.test"))
      assert.is_true(mtasts.mx_matches(p, "a.mx.example.test"))
      -- again, and with the name spelt differently: the cache, one more TXT lookup, no fetch
      clock = clock + 3600
      p = assert(sts:policy("Example.Test."))
      assert.equal("cache", p.source)
      assert.equal(1, #fetches)
      assert.equal(2, #queries)
      -- the cache file is there, complete
      local data = H.readfile(cache_dir .. "/example.test")
      assert.matches("^luasmtp mta%-sts cache 1\n", data)
      assert.equal(ENFORCE, data:sub(-#ENFORCE))
    end)
  end)

  it("keeps the cache across a restart, refetches when the id changes, keeps it when that fails", function()
    H.run(function()
      assert(new():policy("refresh.test"))
      -- a new object (a restarted process): the cache file serves, no fetch
      fetches = {}
      local sts = new()
      local p = assert(sts:policy("refresh.test"))
      assert.equal("cache", p.source)
      assert.same({}, fetches)
      -- the id changes: refetched
      write(policy_path("refresh.test"), (ENFORCE:gsub("mx1", "mx9")))
      records["_mta-sts.refresh.test"] = { "v=STSv1; id=id2" }
      p = assert(sts:policy("refresh.test"))
      assert.equal("fetched", p.source)
      assert.equal("id2", p.id)
      assert.same({ "mx9.example.test", "*.mx.example.test" }, p.mx)
      assert.equal(1, #fetches)
      -- the id changes again but the policy is gone: the cached one is kept
      os.remove(policy_path("refresh.test"))
      records["_mta-sts.refresh.test"] = { "v=STSv1; id=id3" }
      p = assert(sts:policy("refresh.test"))
      assert.equal("cache", p.source)
      assert.equal("id2", p.id)
      assert.matches("sts%-policy%-fetch%-error.*HTTP 404", p.refresh_error)
      -- and so it is after a restart, and when the TXT record is gone or the lookup fails
      p = assert(new():policy("refresh.test"))
      assert.equal("id2", p.id)
      records["_mta-sts.refresh.test"] = nil
      assert.equal("id2", assert(new():policy("refresh.test")).id)
      records["_mta-sts.refresh.test"] = "SERVFAIL"
      assert.equal("id2", assert(new():policy("refresh.test")).id)
      -- until max_age has passed
      clock = clock + 86401
      assert.same({ nil, "dns" }, { (function(a, b) return a, b end)(new():policy("refresh.test")) })
      records["_mta-sts.refresh.test"] = nil
      assert.same({ nil, "none" }, { (function(a, b) return a, b end)(new():policy("refresh.test")) })
      records["_mta-sts.refresh.test"] = { "v=STSv1; id=id3" }
      local ok, token, detail = new():policy("refresh.test")
      assert.is_nil(ok)
      assert.equal("sts-policy-fetch-error", token)
      assert.matches("404", detail)
    end)
  end)

  it("refetches an expired policy even when the id is the same", function()
    H.run(function()
      local sts = new()
      assert.equal("fetched", assert(sts:policy("example.test")).source)
      clock = clock + 86400
      local p = assert(sts:policy("example.test"))
      assert.equal("fetched", p.source)
      assert.equal(2, #fetches)
    end)
  end)

  it("reports testing and none modes as they are", function()
    H.run(function()
      local sts = new()
      assert.equal("testing", assert(sts:policy("testing.test")).mode)
      local p = assert(sts:policy("none.test"))
      assert.equal("none", p.mode)
      assert.same({}, p.mx)
    end)
  end)

  it("says none without a valid TXT record, dns when the lookup fails", function()
    H.run(function()
      local sts = new()
      local cases = {
        { nil, "none", "no v=STSv1" },
        { { "v=spf1 -all" }, "none", "no v=STSv1" },
        { { "v=STSv1; id=a", "v=STSv1; id=b" }, "none", "exactly one" },
        { { "v=STSv1; id=" }, "none", "invalid TXT" },
        { "SERVFAIL", "dns", "SERVFAIL" },
        { "TIMEOUT", "dns", "timeout" },
      }
      for _, c in ipairs(cases) do
        records["_mta-sts.example.test"] = c[1]
        local ok, token, detail = sts:policy("example.test")
        assert.is_nil(ok)
        assert.equal(c[2], token)
        assert.matches(c[3], detail)
      end
      assert.same({}, fetches)
      assert.same({ nil, "none", "invalid domain name" }, { sts:policy("bad_name.test") })
      assert.same({ nil, "none", "invalid domain name" }, { sts:policy("") })
    end)
  end)

  it("refuses redirects, oversized and invalid policies, wrong media types and bad certificates", function()
    H.run(function()
      local sts = new()
      local cases = {
        { "redirect.test", "sts-policy-fetch-error", "redirect" },
        { "big.test", "sts-policy-fetch-error", "limit" },
        { "missing.test", "sts-policy-fetch-error", "HTTP 404" },
        { "invalid.test", "sts-policy-invalid", "mode" },
        { "ctype.test", "sts-policy-invalid", "text/html" },
        { "nocert.test", "sts-webpki-invalid", "nocert" },
      }
      for _, c in ipairs(cases) do
        local ok, token, detail = sts:policy(c[1])
        assert.is_nil(ok, c[1])
        assert.equal(c[2], token, c[1])
        assert.matches(c[3], detail, 1, true)
      end
      -- a CA the system does not have, and one not the issuer
      for _, o in ipairs { { cafile = false }, { cafile = H.certs() .. "/other-ca.pem" } } do
        local ok, token = new(o):policy("example.test")
        assert.is_nil(ok)
        assert.equal("sts-webpki-invalid", token)
      end
      -- nothing of this was cached
      local p = io.open(cache_dir .. "/redirect.test")
      assert.is_nil(p)
    end)
  end)

  it("times out a policy host that stalls", function()
    H.run(function()
      local l, port = H.listen() -- accepts nothing: the TLS handshake never starts
      local sts = new { port = port, timeout = 0.5,
        resolve = { "mta-sts.example.test:" .. port .. ":127.0.0.1" } }
      local ok, token, detail = sts:policy("example.test")
      assert.is_nil(ok)
      assert.equal("sts-policy-fetch-error", token)
      assert.matches("timeout", detail)
      l:close()
    end)
  end)

  it("shares one lookup among concurrent callers", function()
    H.run(function()
      local sts = new()
      local tasks = {}
      for i = 1, 5 do
        tasks[i] = luasmtp.spawn(function() return sts:policy("example.test") end)
      end
      for i = 1, 5 do
        local ok, p = tasks[i]:join(20)
        assert.is_true(ok)
        assert.equal("enforce", p.mode)
      end
      assert.equal(1, #fetches)
    end, 30)
  end)

  it("looks TXT records up with the resolve_txt fallback against a DNS server", function()
    H.run(function()
      local pid, port = H.fake_dns("127.0.0.1", { "txt:_mta-sts.example.test=v=STSv1; id=fromdns",
        "txt:_mta-sts.testing.test=v=STSv1; |id=split" }, "mtasts", 30)
      assert(luasmtp.dns_configure { servers = { "127.0.0.1:" .. port }, timeout = 1, tries = 2 })
      local ok, err = pcall(function()
        local sts = new { dns_query = txt.resolve_txt_query }
        local p = assert(sts:policy("example.test"))
        assert.equal("fromdns", p.id)
        assert.equal("enforce", p.mode)
        assert.equal("split", assert(sts:policy("testing.test")).id)
        assert.same({ nil, "none" }, { (function(a, b) return a, b end)(sts:policy("none.test")) })
      end)
      assert(luasmtp.dns_configure {})
      H.kill(pid)
      assert(ok, err)
    end, 20)
  end)
end)
