--- HTTP client (src/http.c): luasmtp.http.request against
-- spec/https_server.py on loopback, over TLS with the test PKI and in
-- plain HTTP.
local luasmtp = require "luasmtp"
local dkjson = require "dkjson"
local H = require "spec.helper"

local request = luasmtp.http.request

describe("http", function()
  local tls, plain, ca, base, pbase

  lazy_setup(function()
    ca = H.certs() .. "/ca.pem"
    tls = H.https_server { tag = "http_tls" }
    os.execute("rm -rf '" .. H.tmp .. "/http_root'")
    plain = H.https_server { tag = "http_plain", tls = false, root = H.tmp .. "/http_root" }
    base = "https://localhost:" .. tls.port
    pbase = "http://127.0.0.1:" .. plain.port
  end)

  lazy_teardown(function()
    if tls then H.kill(tls.pid) end
    if plain then H.kill(plain.pid) end
  end)

  after_each(function()
    assert.equal(0, luasmtp.stats().http_requests)
    H.assert_no_leaks()
  end)

  local function get(path, extra)
    local o = { url = base .. path, cafile = ca, timeout = 10 }
    for k, v in pairs(extra or {}) do o[k] = v end
    return request(o)
  end

  it("fetches over HTTPS with the test CA and over plain HTTP", function()
    H.run(function()
      local status, headers, body = get("/hello")
      assert.equal(200, status)
      assert.equal("hello", body)
      assert.equal("text/plain", headers["content-type"])
      assert.equal("5", headers["content-length"])
      local _
      status, _, body = request { url = pbase .. "/hello", timeout = 10 }
      assert.equal(200, status)
      assert.equal("hello", body)
      -- an error status is a status, not a failure
      status, _, body = get("/status/503")
      assert.equal(503, status)
      assert.equal("status 503", body)
    end)
  end)

  it("works from the main chunk too (runs the loop until done)", function()
    local status, _, body = get("/hello")
    assert.equal(200, status)
    assert.equal("hello", body)
  end)

  it("verifies the certificate chain and the host name", function()
    H.run(function()
      -- the system trust store does not know the test CA
      local ok, token, detail = request { url = base .. "/hello", timeout = 10, capath = "/nonexistent",
        cafile = H.certs() .. "/other-ca.pem" }
      assert.is_nil(ok)
      assert.equal("tls", token)
      assert.matches("certificate", detail)
      -- the right CA, the wrong name (localhost's certificate for wrong.test)
      ok, token, detail = request { url = "https://wrong.test:" .. tls.port .. "/hello", cafile = ca,
        timeout = 10, resolve = { "wrong.test:" .. tls.port .. ":127.0.0.1" } }
      assert.is_nil(ok)
      assert.equal("tls", token)
      assert.matches("wrong.test", detail)
      -- verify = false accepts it (tests only)
      local status = request { url = "https://wrong.test:" .. tls.port .. "/hello", verify = false,
        timeout = 10, resolve = { "wrong.test:" .. tls.port .. ":127.0.0.1" } }
      assert.equal(200, status)
    end)
  end)

  it("maps a host name to loopback for one request only (resolve)", function()
    H.run(function()
      local d = H.certs()
      local srv = H.https_server { tag = "http_sni2", cert = "sni2" } -- mail.example.test
      local url = "https://mail.example.test:" .. srv.port .. "/hello"
      local status, _, body = request { url = url, cafile = d .. "/ca.pem", timeout = 10,
        resolve = { "mail.example.test:" .. srv.port .. ":127.0.0.1" } }
      assert.equal(200, status)
      assert.equal("hello", body)
      -- IPv6 addresses go in brackets by themselves
      status = request { url = url, cafile = d .. "/ca.pem", timeout = 10,
        resolve = { "mail.example.test:" .. srv.port .. ":::1" } }
      assert.is_nil(status) -- the server listens on 127.0.0.1 only: refused
      H.kill(srv.pid)
    end)
  end)

  it("sends method, headers and body as given, and nothing curl would add", function()
    H.run(function()
      local status, _, body = get("/echo", { method = "POST", body = "a=1\r\nb\0c",
        headers = { ["X-Test"] = "yes", ["X-Number"] = 42, ["X-Empty"] = "" } })
      assert.equal(200, status)
      local doc = dkjson.decode(body)
      assert.equal("POST", doc.method)
      assert.equal("a=1\r\nb\0c", doc.body)
      local seen = {}
      for _, kv in ipairs(doc.headers) do
        seen[kv[1]:lower()] = kv[2]
      end
      assert.equal("yes", seen["x-test"])
      assert.equal("42", seen["x-number"])
      assert.equal("", seen["x-empty"])
      assert.equal("8", seen["content-length"])
      assert.is_nil(seen["content-type"]) -- no form type behind the caller's back
      assert.is_nil(seen["expect"])
      assert.matches("^luasmtp/", seen["user-agent"])
      -- a body alone means POST; PUT and HEAD
      local _
      _, _, body = get("/echo", { body = "x" })
      assert.equal("POST", dkjson.decode(body).method)
      status, _, body = request { url = pbase .. "/", method = "PUT", body = "put body", timeout = 10 }
      assert.equal(200, status)
      assert.matches("^stored", body)
      local headers
      status, headers, body = get("/hello", { method = "HEAD" })
      assert.equal(200, status)
      assert.equal("", body)
      assert.equal("5", headers["content-length"])
    end)
  end)

  it("returns response headers by lowercase name, repeated ones joined, all listed in order", function()
    H.run(function()
      local status, h = get("/headers")
      assert.equal(200, status)
      assert.equal("a=1, b=2", h["set-cookie"])
      assert.equal("one, two", h["x-multi"])
      assert.equal("padded value", h["x-spaces"])
      local list = {}
      for _, f in ipairs(h) do
        if f.name == "set-cookie" or f.name == "x-multi" then
          list[#list + 1] = f.name .. "=" .. f.value
        end
      end
      assert.same({ "set-cookie=a=1", "x-multi=one", "set-cookie=b=2", "x-multi=two" }, list)
    end)
  end)

  it("caps the body at max_size, announced or not, and the header block", function()
    H.run(function()
      local status, _, body = get("/size/1000", { max_size = 1000 })
      assert.equal(200, status)
      assert.equal(1000, #body)
      local ok, token, detail = get("/size/1001", { max_size = 1000 })
      assert.same({ nil, "limit" }, { ok, token })
      assert.matches("max_size", detail)
      ok, token = get("/stream/5000", { max_size = 1000 })
      assert.same({ nil, "limit" }, { ok, token })
      status, _, body = get("/stream/5000", { max_size = 5000 })
      assert.equal(200, status)
      assert.equal(string.rep("b", 5000), body)
      -- the default cap is 1 MiB
      ok, token = get("/size/" .. (1024 * 1024 + 1))
      assert.same({ nil, "limit" }, { ok, token })
      ok, token, detail = get("/bigheaders")
      assert.same({ nil, "limit" }, { ok, token })
      assert.matches("header", detail)
    end)
  end)

  it("times out a server that stalls, before or during the body", function()
    H.run(function()
      local ok, token = get("/stall", { timeout = 0.5 })
      assert.same({ nil, "timeout" }, { ok, token })
      ok, token = get("/stall-body", { timeout = 0.5 })
      assert.same({ nil, "timeout" }, { ok, token })
      -- a listener that never accepts: the TLS handshake never starts
      local l, port = H.listen()
      ok, token = request { url = "https://127.0.0.1:" .. port .. "/", timeout = 0.5, cafile = ca }
      assert.same({ nil, "timeout" }, { ok, token })
      l:close()
      -- the server is still fine afterwards
      assert.equal(200, (get("/hello")))
    end)
  end)

  it("does not follow redirects unless asked, and then within a limit", function()
    H.run(function()
      local status, h = get("/redirect")
      assert.equal(302, status)
      assert.equal("/hello", h.location)
      local _, body
      status, _, body = get("/redirect", { follow_redirects = true })
      assert.equal(200, status)
      assert.equal("hello", body)
      local ok, token = get("/loop", { follow_redirects = 3 })
      assert.same({ nil, "limit" }, { ok, token })
      -- only http and https, also when redirected
      ok, token = get("/redirect-ftp", { follow_redirects = true })
      assert.same({ nil, "protocol" }, { ok, token })
      for _, url in ipairs { "ftp://127.0.0.1/", "file:///etc/passwd", "gopher://127.0.0.1/",
        "not a url" } do
        ok, token = request { url = url, timeout = 5 }
        assert.is_nil(ok, url)
        assert.equal("protocol", token, url)
      end
    end)
  end)

  it("reports a refused connection", function()
    H.run(function()
      local ok, token = request { url = "http://127.0.0.1:" .. H.free_port() .. "/", timeout = 5 }
      assert.same({ nil, "refused" }, { ok, token })
    end)
  end)

  it("runs many requests concurrently", function()
    H.run(function()
      local n, tasks = 60, {}
      for i = 1, n do
        tasks[i] = luasmtp.spawn(function()
          local path = i % 3 == 0 and "/sleep/0.2" or "/echo?n=" .. i
          local status, _, body = get(path, { timeout = 20 })
          return status, body
        end)
      end
      -- tasks run in spawn order and every request waits for the loop:
      -- by the time this one runs, all n are open at once
      local peak
      local sampler = luasmtp.spawn(function() peak = luasmtp.stats().http_requests end)
      for i = 1, n do
        local ok, status, body = tasks[i]:join(30)
        assert(ok, status)
        assert.equal(200, status)
        if i % 3 == 0 then
          assert.equal("slept", body)
        else
          assert.equal("/echo?n=" .. i, dkjson.decode(body).path)
        end
      end
      assert(sampler:join(1))
      assert.equal(n, peak)
    end, 40)
  end)

  it("ends the requests still open when the Lua state closes", function()
    local script = H.tmp .. "/http_exit.lua"
    local f = assert(io.open(script, "w"))
    f:write([[
local luasmtp = require "luasmtp"
local url = ...
for _ = 1, 3 do
  luasmtp.spawn(function() luasmtp.http.request { url = url, timeout = 30 } end)
end
for _ = 1, 5 do luasmtp.step(0.05) end
print(luasmtp.stats().http_requests)
]])
    f:close()
    -- lua5.4 closes the state at exit: the multi handle's finalizer frees them
    local p = assert(io.popen("timeout 20 lua5.4 " .. H.shquote(script) .. " " ..
      H.shquote(pbase .. "/stall") .. " 2>&1; echo \"rc=$?\""))
    local out = p:read("a")
    p:close()
    assert.equal("3\nrc=0\n", out)
  end)

  it("checks its arguments", function()
    local bad = {
      {},
      { url = "" },
      { url = base, method = "get" },
      { url = base, headers = { ["Bad Name"] = "x" } },
      { url = base, headers = { ["X-Inject"] = "a\r\nX-Other: b" } },
      { url = base, body = 42 },
      { url = base, timeout = -1 },
      { url = base, timeout = 0 },
      { url = base, max_size = -1 },
      { url = base, follow_redirects = 100 },
      { url = base, verify = "no" },
      { url = base, resolve = { "no-port" } },
      { url = base, resolve = { "host:port:127.0.0.1" } },
      { url = base, resolve = { "host:1:127.0.0.1\r\n" } },
      { url = "http://a\0b/" },
    }
    for i, o in ipairs(bad) do
      assert.has_error(function() request(o) end, nil, "case " .. i)
    end
    assert.has_error(function() request("http://x/") end)
  end)
end)

describe("gzip", function()
  it("round-trips, caps the output and refuses damaged input", function()
    local data = string.rep("luasmtp ", 10000)
    local gz = luasmtp.gzip(data)
    assert.equal("\31\139", gz:sub(1, 2))
    assert.is_true(#gz < #data / 10)
    assert.equal(data, luasmtp.gunzip(gz))
    assert.equal(data, luasmtp.gunzip(gz, #data))
    assert.same({ nil, "limit" }, { (function(a, b) return a, b end)(luasmtp.gunzip(gz, #data - 1)) })
    assert.equal("", luasmtp.gunzip(luasmtp.gzip("")))
    assert.equal(data, luasmtp.gunzip(luasmtp.gzip(data, 9)))
    local ok, token = luasmtp.gunzip(gz:sub(1, #gz - 5))
    assert.same({ nil, "protocol" }, { ok, token })
    ok, token = luasmtp.gunzip(gz .. "trailing")
    assert.same({ nil, "protocol" }, { ok, token })
    ok, token = luasmtp.gunzip("not gzip at all")
    assert.same({ nil, "protocol" }, { ok, token })
    assert.has_error(function() luasmtp.gzip(data, 10) end)
    -- Python's gzip reads ours
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    f:write(luasmtp.gzip("from lua\n"))
    f:close()
    H.need("python3 https server")
    local p = assert(io.popen(H.python3 ..
      " -c 'import gzip,sys; sys.stdout.write(gzip.open(sys.argv[1]).read().decode())' " .. path))
    local out = p:read("a")
    p:close()
    os.remove(path)
    assert.equal("from lua\n", out)
  end)
end)
