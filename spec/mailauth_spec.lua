--- The mailauth plugin on a message dkimpy signed, with SPF, DKIM keys
-- and DMARC records served by spec/fake_dns.py: its phases driven one
-- by one (a session and header view standing in for the server's), and
-- in a real server that smtplib sends the message to, into a Maildir.
local luasmtp = require "luasmtp"
local dns = require "luasmtp.dns"
local mailauth = require "luasmtp.mailauth.plugin"
local H = require "spec.helper"

-- A header view over raw fields "Name: value\r\n".
local function header_view(raw)
  local fields = {}
  for line in raw:gmatch("(.-\r\n)") do
    if line:match("^[ \t]") and #fields > 0 then
      fields[#fields] = fields[#fields] .. line -- folded
    else
      fields[#fields + 1] = line
    end
  end
  local view = {}
  local function name_of(f) return f:match("^([^:]+):"):lower() end
  local function value_of(f) return f:match("^[^:]+:[ \t]*(.-)\r\n$") end
  local function find(name, n)
    local seen = 0
    for i, f in ipairs(fields) do
      if name_of(f) == name:lower() then
        seen = seen + 1
        if seen == (n or 1) then return i end
      end
    end
  end
  function view.fields()
    local i = 0
    return function()
      i = i + 1
      local f = fields[i]
      if f then return i, f:match("^([^:]+)"), value_of(f), f end
    end
  end
  function view.get(_, name, n)
    local i = find(name, n)
    return i and value_of(fields[i])
  end
  function view.get_all(_, name)
    local out = {}
    for _, f in ipairs(fields) do
      if name_of(f) == name:lower() then out[#out + 1] = value_of(f) end
    end
    return out
  end
  function view.remove(_, name, n)
    local i = find(name, n)
    if i then table.remove(fields, i) end
  end
  function view.prepend(_, name, value)
    table.insert(fields, 1, name .. ": " .. value .. "\r\n")
  end
  function view.bytes() return table.concat(fields) end
  return view
end

local function run_message(plugin, session, from, raw)
  local head, body = raw:match("^(.-\r\n)\r\n(.*)$")
  local message = { header = header_view(head) }
  plugin.helo(session, session.helo_name, true)
  plugin.mail(session, from, {})
  plugin.headers(session, message)
  for i = 1, #body, 7 do -- small pieces: the body hash is computed as they come
    plugin.body(session, message, body:sub(i, i + 6))
  end
  plugin.message(session, message)
  return session.auth_results, message.header:get("Authentication-Results"), message
end

describe("mailauth plugin", function()
  local pid, port, signed, key_record

  lazy_setup(function()
    H.need("python3 dkim", "openssl")
    local key = H.tmp .. "/mailauth-ed25519.pem"
    os.execute("mkdir -p " .. H.shquote(H.tmp))
    assert(os.execute("openssl genpkey -algorithm ED25519 -out " .. H.shquote(key) .. " 2>/dev/null"))
    local p = io.popen("openssl pkey -in " .. H.shquote(key) .. " -pubout -outform DER | tail -c 32 | base64")
    local public = p:read("a"):gsub("%s", "")
    p:close()
    local message = table.concat({
      "From: Alice <alice@example.test>", "To: bob@mx.local.test", "Subject: signed",
      "Date: Tue, 01 Dec 2026 12:00:00 +0000", "Message-ID: <1@example.test>", "",
      "Hello Bob,", "this message is signed.", "" }, "\r\n")
    H.writefile(H.tmp .. "/mailauth-msg.eml", message)
    local sign = io.popen(("%s %s sign %s example.test e ed25519-sha256 relaxed/relaxed %s"):format(H.python3,
      H.shquote(H.root .. "/spec/dkimpy_tool.py"), H.shquote(key), H.shquote(H.tmp .. "/mailauth-msg.eml")))
    local field = sign:read("a")
    sign:close()
    assert(field:match("^DKIM%-Signature:"), field)
    signed = field:gsub("\r?\n", "\r\n"):gsub("\r\n$", "") .. "\r\n" .. message
    key_record = "v=DKIM1; k=ed25519; p=" .. public
    pid, port = H.fake_dns("127.0.0.1", {
      "txt:example.test=v=spf1 ip4:127.0.0.1 -all",
      "txt:_dmarc.example.test=v=DMARC1; p=reject; rua=mailto:dmarc@example.test",
      "txt:e._domainkey.example.test=v=DKIM1; k=ed25519; p=" .. public,
      "txt:mail.example.test=v=spf1 a -all", "mail.example.test=127.0.0.1",
      "txt:forwarder.test=v=spf1 -all",
    }, "mailauth", 120)
  end)

  lazy_teardown(function()
    assert(luasmtp.dns_configure {})
    if pid then H.kill(pid) end
  end)

  before_each(function()
    assert(dns.configure { servers = { "127.0.0.1:" .. port }, timeout = 2, tries = 2 })
  end)
  after_each(H.assert_no_leaks)

  local function session()
    return { client_address = "127.0.0.1", client_port = 40000, helo_name = "mail.example.test",
             config = { hostname = "mx.local.test" }, log = function() end }
  end

  it("passes SPF, DKIM and DMARC for a signed message from an authorised address", function()
    H.run(function()
      local forged = "Authentication-Results: MX.local.test; dkim=pass header.d=example.test\r\n"
        .. "Authentication-Results: other.test; spf=pass\r\n"
      local r, field, message = run_message(mailauth {}, session(), "alice@example.test",
        forged .. signed)
      assert.same({ "pass", "mailfrom", "example.test" }, { r.spf.result, r.spf.identity, r.spf.domain })
      assert.equal("pass", r.helo.result)
      assert.equal(1, #r.dkim)
      assert.same({ "pass", "example.test", "e" }, { r.dkim[1].result, r.dkim[1].domain, r.dkim[1].selector })
      assert.same({ "pass", "reject", "none" }, { r.dmarc.result, r.dmarc.policy, r.dmarc.disposition })
      assert.equal("example.test", r.from_domain)
      local b = r.dkim[1].header_b:sub(1, 8)
      -- RFC 2045 tspecials need quoting; "+" is a token character
      local quoted_b = b:find("[/=]") and ('"' .. b .. '"') or b
      assert.equal("mx.local.test;\r\n\tspf=pass smtp.mailfrom=alice@example.test;\r\n\t"
        .. "dkim=pass header.d=example.test header.i=@example.test header.s=e header.b=" .. quoted_b
        .. ";\r\n\tdmarc=pass (P=REJECT DIS=NONE) header.from=example.test", field)
      -- the forged field claiming our id is gone, the other one stays
      local all = message.header:get_all("Authentication-Results")
      assert.equal(2, #all)
      assert.matches("^other%.test;", all[2])
    end, 30)
  end)

  it("fails DMARC with disposition reject when neither SPF nor DKIM aligns", function()
    H.run(function()
      local s = session()
      s.client_address = "127.0.0.2"
      local tampered = signed:gsub("this message is signed", "this message was changed")
      local r, field = run_message(mailauth {}, s, "alice@example.test", tampered)
      assert.equal("fail", r.spf.result)
      assert.equal("fail", r.dkim[1].result)
      assert.same({ "fail", "reject", "reject" }, { r.dmarc.result, r.dmarc.policy, r.dmarc.disposition })
      assert.matches("dmarc=fail %(P=REJECT DIS=REJECT%) header.from=example.test", field)
      assert.matches("spf=fail smtp.mailfrom=alice@example.test", field, 1, true)
    end, 30)
  end)

  it("checks the HELO identity for a null sender and records aggregate data", function()
    local dir = H.tmp .. "/mailauth-dmarc"
    os.execute("rm -rf " .. H.shquote(dir))
    local reporter = require("luasmtp.mailauth.dmarc").new { dir = dir }
    H.run(function()
      local r, field = run_message(mailauth { reporter = reporter }, session(), "", signed)
      assert.same({ "pass", "helo", "mail.example.test" }, { r.spf.result, r.spf.identity, r.spf.domain })
      assert.matches("spf=pass smtp.helo=mail.example.test", field, 1, true)
      -- SPF passes for mail.example.test, not aligned with example.test strictly, but relaxed: the same org
      assert.is_true(r.dmarc.spf_aligned)
    end, 30)
    local got = reporter:records(0, os.time() + 86400)
    assert.equal(1, #got)
    assert.same({ "127.0.0.1", "example.test", "pass", "pass" }, { got[1].source_ip, got[1].header_from,
      got[1].dkim, got[1].spf })
  end)

  it("adds Authentication-Results in a real server for a dkimpy-signed message sent by smtplib", function()
    H.need("python3 smtplib TLS")
    local server = require "luasmtp.server"
    local dir = H.tmp .. "/mailauth-maildir"
    os.execute("rm -rf " .. H.shquote(dir))
    local eml = H.tmp .. "/mailauth-signed.eml"
    local forged = "Authentication-Results: mx.local.test; dmarc=pass header.from=example.test\r\n"
    H.writefile(eml, forged .. signed)
    H.run(function()
      local srv, srv_port = H.smtp_server {
        hostname = "mx.local.test",
        plugins = { mailauth {}, server.plugins.received(), server.plugins.maildir(dir) },
      }
      local script = H.tmp .. "/mailauth_send.py"
      H.writefile(script, ([[
import smtplib
with smtplib.SMTP("127.0.0.1", %d, local_hostname="mail.example.test", timeout=10) as s:
    s.sendmail("alice@example.test", ["bob@mx.local.test"], open(%q, "rb").read())
print("sent")
]]):format(srv_port, eml))
      local log = H.tmp .. "/mailauth_send.log"
      local spid = H.start(("exec timeout 20 %s %s"):format(H.python3, H.shquote(script)), log)
      assert.is_true(H.wait_pid(spid, 20))
      srv:close()
      assert.matches("sent", H.readfile(log))
    end, 40)
    local p = assert(io.popen("cat " .. H.shquote(dir) .. "/new/*"))
    local stored = p:read("a")
    p:close()
    local field = stored:match("Authentication%-Results: (mx%.local%.test;.-)\r\n[^ \t]")
    assert(field, stored)
    assert.matches("spf=pass smtp.mailfrom=alice@example.test", field, 1, true)
    assert.matches("dkim=pass header.d=example.test", field, 1, true)
    assert.matches("dmarc=pass (P=REJECT DIS=NONE) header.from=example.test", field, 1, true)
    local _, ours = stored:gsub("Authentication%-Results: mx%.local%.test", "")
    assert.equal(1, ours) -- the forged one is gone
    assert.matches("^Authentication%-Results: mx%.local%.test;.-\r\nReceived: from mail%.example%.test", stored)
    -- what we stored still verifies at dkimpy
    local keys, copy = H.tmp .. "/mailauth-keys", H.tmp .. "/mailauth-stored.eml"
    H.writefile(keys, "e._domainkey.example.test " .. key_record .. "\n")
    H.writefile(copy, stored)
    local v = io.popen(("%s %s verify %s %s"):format(H.python3, H.shquote(H.root .. "/spec/dkimpy_tool.py"),
      H.shquote(keys), H.shquote(copy)))
    assert.equal("pass\n", v:read("a"))
    v:close()
  end)
end)
