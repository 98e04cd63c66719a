-- The client's body paths: the C body scanner (size, bare CR/LF growth,
-- content class) and large file bodies over DATA, BDAT and TLS, with
-- dots and line ends at the 64 KiB block edges.
local core = require "luasmtp.core"
local client = require "luasmtp.client"
local H = require "spec.helper"
local fake = require "spec.fake_smtp"

local shquote = H.shquote
local TMP = H.tmp .. "/client"
local BLOCK = 64 * 1024

-- What the scanner must find, the slow way on the whole string.
local function reference(s)
  local crlf = select(2, s:gsub("\r\n", ""))
  local lf = select(2, s:gsub("\n", "")) - crlf
  local cr = select(2, s:gsub("\r", "")) - crlf
  local kind = s:find("%z") and "binarymime" or s:find("[\128-\255]") and "8bitmime" or "7bit"
  local last = s:sub(-1)
  return #s, lf + cr, last == "\n" or last == "\r", kind
end

local function write_file(name, content)
  os.execute("mkdir -p " .. shquote(TMP))
  local path = TMP .. "/" .. name
  local f = assert(io.open(path, "wb"))
  f:write(content)
  f:close()
  return path
end

-- A text body of about `size` octets: bare LF, CRLF and bare CR line
-- ends, lines starting with "." and ".." at block edges, and a CRLF
-- split over an edge.
local function edgy_body(size)
  local parts, n, i = {}, 0, 0
  local ends = { "\n", "\r\n", "\r\n", "\r" }
  while n < size do
    i = i + 1
    local line = ("%d "):format(i) .. ("t"):rep(i % 90) .. ends[i % #ends + 1]
    parts[#parts + 1] = line
    n = n + #line
  end
  local body = table.concat(parts)
  local function put(at, s) body = body:sub(1, at - 1) .. s .. body:sub(at + #s) end
  put(BLOCK, "\n.")              -- a dot line starts at the first octet of a block
  put(2 * BLOCK - 1, "\n..")     -- ".." over the edge
  put(3 * BLOCK, "\r\n")         -- CRLF split over the edge
  put(4 * BLOCK, "\r\r")         -- bare CR at the edge
  put(5 * BLOCK - 2, "\n.\r\n")  -- a lone dot line, CRLF over the edge
  return body
end

-- What arrives for a text body: every line end CRLF, a final one added.
local function on_the_wire(s)
  s = s:gsub("\r\n", "\n"):gsub("\r", "\n"):gsub("\n", "\r\n")
  if s ~= "" and s:sub(-2) ~= "\r\n" then s = s .. "\r\n" end
  return s
end

describe("client bodies", function()
  after_each(function()
    fake.cleanup()
    H.assert_no_leaks()
  end)

  it("scans strings and files in C as the slow reference does", function()
    local cases = { "", "a", "a\n", "a\r", "a\r\n", "\r\r\n\n", "x\0y", "caf\195\169\n", edgy_body(5 * BLOCK + 10) }
    math.randomseed(14)
    for _ = 1, 20 do
      local t, len = {}, math.random(0, 3 * BLOCK)
      local alphabet = { "a", "b", "\r", "\n", ".", "\200", "\0" }
      local top = math.random(5, #alphabet)
      for k = 1, len do t[k] = alphabet[math.random(1, top)] end
      cases[#cases + 1] = table.concat(t)
    end
    -- a CRLF split exactly at the scanner's block edge: one line end
    cases[#cases + 1] = ("x"):rep(BLOCK - 1) .. "\r\n" .. ("y"):rep(10)
    for i, s in ipairs(cases) do
      local want = { reference(s) }
      assert.same(want, { core.body_scan(s) }, "string case " .. i)
      local path = write_file("scan.txt", s)
      local f = assert(io.open(path, "rb"))
      assert.same(want, { core.body_scan(f) }, "file case " .. i)
      -- from where the file is, to its end
      if #s > 3 then
        f:seek("set", 3)
        assert.same({ reference(s:sub(4)) }, { core.body_scan(f) }, "file case " .. i .. " from 3")
      end
      f:close()
    end
    local f = assert(io.open(write_file("scan.txt", "x"), "rb"))
    f:close()
    assert.has_error(function() core.body_scan(f) end)
  end)

  it("sends a large file body with DATA, SIZE declared, to our own server", function()
    H.run(function()
      local body = edgy_body(3 * 1024 * 1024) .. "last line without end"
      local path = write_file("large.txt", body)
      local srv, port, log = fake.start {}
      local f = assert(io.open(path, "rb"))
      local res = assert(client.send { host = "127.0.0.1", port = port, tls = "none",
        from = "a@x.test", to = "b@y.test", body = f })
      f:close()
      assert.is_true(res.ok)
      local want = on_the_wire(body)
      assert.is_true(want == log.messages[1].body, "the body differs")
      assert.equal("MAIL FROM:<a@x.test> SIZE=" .. #want, log.messages[1].mail)
      srv:close()
    end, 30)
  end)

  it("sends a large file body with BDAT, and a binary one with BINARYMIME", function()
    H.run(function()
      local body = edgy_body(2 * 1024 * 1024)
      local srv, port, log = fake.start { ext = { "PIPELINING", "CHUNKING", "BINARYMIME", "8BITMIME", "SIZE" } }
      local f = assert(io.open(write_file("large.txt", body), "rb"))
      assert(client.send { host = "127.0.0.1", port = port, tls = "none", chunking = true,
        from = "a@x.test", to = "b@y.test", body = f })
      f:close()
      local want = on_the_wire(body)
      assert.is_true(want == log.messages[1].body, "the text body differs")
      assert.equal("MAIL FROM:<a@x.test> SIZE=" .. #want, log.messages[1].mail)
      local blob = {}
      for n = 1, 3 * BLOCK + 7 do blob[n] = string.char((n * 7) % 256) end
      blob = table.concat(blob)
      f = assert(io.open(write_file("blob.bin", blob), "rb"))
      assert(client.send { host = "127.0.0.1", port = port, tls = "none",
        from = "a@x.test", to = "b@y.test", body = f })
      f:close()
      assert.is_true(blob == log.messages[2].body, "the binary body differs")
      assert.equal("MAIL FROM:<a@x.test> SIZE=" .. #blob .. " BODY=BINARYMIME", log.messages[2].mail)
      srv:close()
    end, 30)
  end)

  it("sends a large 8-bit file body over STARTTLS to aiosmtpd", function()
    H.run(function()
      local body = "Subject: caf\195\169\r\n\r\n" .. edgy_body(2 * 1024 * 1024)
      local port, log = fake.aiosmtpd("--tls starttls")
      local f = assert(io.open(write_file("large8.txt", body), "rb"))
      local res = assert(client.send { host = "localhost", port = port, tls = "starttls",
        cafile = H.certs() .. "/ca.pem", from = "a@x.test", to = "b@y.test", body = f })
      f:close()
      assert.is_true(res.ok)
      local m = fake.messages(log)[1]
      assert.is_true(m.tls)
      assert.same({ "SIZE=" .. #on_the_wire(body), "BODY=8BITMIME" }, m.mail_options)
      local got = m.data
      local want = on_the_wire(body)
      -- latin-1 in the log: compare the octets
      local octets = got:gsub("[\194\195][\128-\191]", function(c)
        return string.char(((c:byte(1) & 3) << 6) | (c:byte(2) & 63))
      end)
      assert.is_true(want == octets, "the body differs")
    end, 40)
  end)
end)
