-- The DKIM signing plugin in a real server: what it signs on the way
-- into the store verifies at dkimpy and with luasmtp.dkim.
local H = require "spec.helper"
local core = require "luasmtp.core"
local dkim = require "luasmtp.dkim"
local client = require "luasmtp.client"
local server = require "luasmtp.server"
local sign = require "luasmtp.mailauth.sign"

local function command(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  return out, ok
end

local function key(kind)
  H.mkdir(H.tmp)
  local path = H.tmp .. "/dkim-sign-" .. kind .. ".pem"
  local cmd = kind == "rsa" and "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "
    or "openssl genpkey -algorithm ED25519 -out "
  local out, ok = command(cmd .. path)
  assert(ok, out)
  local pem = H.readfile(path)
  local priv = assert(core.dkim_privkey(pem))
  return { path = path, record = ("v=DKIM1; k=%s; p=%s"):format(priv:kind(), core.b64encode(priv:public())) }
end

local MESSAGE = "From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: signed  on the way\r\n"
  .. "\tthrough\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\n\r\nHello\r\n.. a dotted line\r\n\r\n"

-- Send MESSAGE through a server with the plugins made by plugins(dir)
-- into a new Maildir dir; the stored file.
local function relay(dir, plugins)
  os.execute("rm -rf " .. H.shquote(dir))
  plugins = plugins(dir)
  H.run(function()
    local srv, port = H.smtp_server { hostname = "relay.test", plugins = plugins }
    local body = MESSAGE .. (("x"):rep(76) .. "\r\n"):rep(3000) -- several body chunks
    local res, token, err = client.send { server = "127.0.0.1:" .. port, tls = "none",
      from = "alice@example.org", to = "bob@example.net", body = body }
    assert(res, tostring(token) .. " " .. tostring(err))
    srv:close()
  end, 30)
  local p = assert(io.popen("cat " .. H.shquote(dir) .. "/new/*"))
  local stored = p:read("a")
  p:close()
  return stored
end

describe("DKIM signing plugin", function()
  after_each(function() H.close_servers() end)

  it("signs relayed mail with rsa-sha256 and ed25519-sha256; dkimpy and luasmtp.dkim verify it", function()
    H.need("python3 dkim")
    local rsa, ed = key("rsa"), key("ed25519")
    local dir = H.tmp .. "/dkim-sign-maildir"
    local stored = relay(dir, function() return {
      server.plugins.received(),
      sign { when = function() return true end, domains = { ["example.org"] = {
        { selector = "r", key_file = rsa.path },
        { selector = "e", key_file = ed.path, canonicalization = "simple/simple" },
      } } },
      server.plugins.maildir(dir),
    } end)
    -- both signatures on top, the rsa one first, then the Received field
    assert.matches("^DKIM%-Signature: v=1; a=rsa%-sha256;.-\r\nDKIM%-Signature: v=1; a=ed25519%-sha256;"
      .. ".-\r\nReceived: ", stored)
    local keys, copy = H.tmp .. "/dkim-sign-keys", H.tmp .. "/dkim-sign-stored.eml"
    H.writefile(keys, ("r._domainkey.example.org %s\ne._domainkey.example.org %s\n"):format(rsa.record, ed.record))
    H.writefile(copy, stored)
    local out, ok = command(("%s %s verify %s %s"):format(H.python3, H.shquote(H.root .. "/spec/dkimpy_tool.py"),
      H.shquote(keys), H.shquote(copy)))
    assert(ok, out)
    assert.equal("pass\npass\n", out)
    local records = { ["r._domainkey.example.org"] = rsa.record, ["e._domainkey.example.org"] = ed.record }
    local results = dkim.verify_message(stored, { query = function(name)
      local r = records[name:lower()]
      return { name = name, qtype = "TXT", rcode = r and "NOERROR" or "NXDOMAIN", answers = { r } }
    end })
    assert.equal(2, #results)
    for _, r in ipairs(results) do assert.equal("pass", r.result, r.reason) end
  end)

  it("signs only authenticated sessions by default, and only listed From domains", function()
    local rsa = key("rsa")
    local dir = H.tmp .. "/dkim-sign-maildir2"
    local stored = relay(dir, function() return {
      sign { domains = { ["example.org"] = { selector = "r", key_file = rsa.path } } },
      server.plugins.maildir(dir),
    } end)
    assert.is_nil(stored:find("DKIM-Signature", 1, true))
    stored = relay(dir, function() return {
      sign { when = function() return true end,
             domains = { ["other.example"] = { selector = "r", key_file = rsa.path } } },
      server.plugins.maildir(dir),
    } end)
    assert.is_nil(stored:find("DKIM-Signature", 1, true))
  end)
end)
