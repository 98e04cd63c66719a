-- The headers and body phases while the data arrives: headers at the end
-- of the header block, body for each step of new bytes, an early refusal
-- answered after the end of the data, the one-call path without them.
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local H = require "spec.helper"

local start = H.smtp_server

local function envelope(c)
  assert.equal("220", (c.reply()))
  assert.equal("250", (c.cmd("EHLO client.test")))
  assert.equal("250", (c.cmd("MAIL FROM:<a@client.test>")))
  assert.equal("250", (c.cmd("RCPT TO:<b@mx.test>")))
end

-- Wait (bounded, generously) until cond() holds.
local function wait_for(cond, what)
  local deadline = luasmtp.update_now() + 30
  while not cond() do
    if luasmtp.update_now() > deadline then error("never happened: " .. what, 2) end
    luasmtp.sleep(0.01)
  end
end

-- A plugin that records the order of its calls and the body it saw.
local function recorder(seen, verdicts)
  verdicts = verdicts or {}
  return {
    name = "recorder",
    headers = function(_, msg)
      seen.order[#seen.order + 1] = "headers"
      seen.subject = msg.header:get("Subject")
      return verdicts.headers and verdicts.headers()
    end,
    body = function(_, _, piece)
      seen.order[#seen.order + 1] = "body"
      seen.calls = seen.calls + 1
      seen.body[#seen.body + 1] = piece
      return verdicts.body and verdicts.body(seen)
    end,
    message = function(_, msg)
      seen.order[#seen.order + 1] = "message"
      seen.size = msg:size()
      seen.subject_at_end = msg.header:get("Subject")
    end,
  }
end

local function new_seen() return { order = {}, calls = 0, body = {} } end

local function count(list, name)
  local n = 0
  for _, v in ipairs(list) do if v == name then n = n + 1 end end
  return n
end

local HEADER = "Subject: streamed\r\nX-Test: 1\r\n\r\n"
local BODY = string.rep(string.rep("b", 998) .. "\r\n", 1050) -- 1 MB

describe("streaming headers and body phases", function()
  after_each(function()
    H.close_servers()
    H.assert_no_leaks()
  end)

  it("DATA: headers at the end of the header block, body pieces before the end of data", function()
    H.run(function()
      local seen = new_seen()
      local _, port = start { plugins = { recorder(seen) } }
      local c = H.smtp(port, 20)
      envelope(c)
      assert.equal("354", (c.cmd("DATA")))
      -- a dot-stuffed line: body plugins see it unstuffed
      c.sock:send(HEADER .. "..dot\r\n" .. BODY)
      wait_for(function() return seen.calls >= 4 end, "body calls before the end")
      assert.equal(0, count(seen.order, "message"))
      assert.equal("headers", seen.order[1])
      assert.equal("streamed", seen.subject)
      local before = seen.calls
      assert.equal("250", (c.cmd(".")))
      assert.is_true(before >= 4)
      assert.equal("message", seen.order[#seen.order])
      assert.equal(1, count(seen.order, "headers"))
      assert.equal(".dot\r\n" .. BODY, table.concat(seen.body))
      assert.equal(#HEADER + #".dot\r\n" + #BODY, seen.size)
      assert.equal("streamed", seen.subject_at_end)
      c.cmd("QUIT")
      c.close()
    end, 60)
  end)

  it("DATA: a refusal from the body phase is answered after the final dot, in step", function()
    H.run(function()
      local seen = new_seen()
      local _, port = start { plugins = { recorder(seen, {
        body = function(s) if #s.body == 2 then return server.reject("no thanks") end end,
      }) } }
      local c = H.smtp(port, 20)
      envelope(c)
      assert.equal("354", (c.cmd("DATA")))
      c.sock:send(HEADER .. string.rep("x", 200000))
      wait_for(function() return seen.calls >= 2 end, "the refusing body call")
      -- nothing is answered while the data goes on
      assert.same({ nil, "timeout" }, { c.sock:receiveany(100, 0.05) })
      c.sock:send(BODY .. "\r\n.\r\n")
      local code, text = c.reply()
      assert.equal("550", code)
      assert.matches("no thanks", text, 1, true)
      assert.equal(2, seen.calls) -- the rest went nowhere
      assert.equal(0, count(seen.order, "message"))
      -- the next transaction works
      assert.equal("250", (c.cmd("MAIL FROM:<a@client.test>")))
      assert.equal("250", (c.cmd("RCPT TO:<b@mx.test>")))
      assert.equal("354", (c.cmd("DATA")))
      assert.equal("250", (c.cmd("Subject: small\r\n\r\nhello\r\n.")))
      assert.equal("message", seen.order[#seen.order])
      c.cmd("QUIT")
      c.close()
    end, 60)
  end)

  it("DATA: a refusal from the headers phase skips the body phase", function()
    H.run(function()
      local seen = new_seen()
      local _, port = start { plugins = { recorder(seen, {
        headers = function() return server.tempfail("later") end,
      }) } }
      local c = H.smtp(port, 20)
      envelope(c)
      assert.equal("354", (c.cmd("DATA")))
      c.sock:send(HEADER)
      wait_for(function() return seen.order[1] == "headers" end, "the headers call")
      c.sock:send(BODY .. "\r\n.\r\n")
      assert.equal("451", (c.reply()))
      assert.same({ "headers" }, seen.order)
      assert.equal("250", (c.cmd("RSET")))
      c.cmd("QUIT")
      c.close()
    end, 60)
  end)

  it("BDAT: each chunk's bytes go to the body phase as they arrive", function()
    H.run(function()
      local seen = new_seen()
      local _, port = start { plugins = { recorder(seen) } }
      local c = H.smtp(port, 20)
      envelope(c)
      local first = HEADER .. BODY
      c.sock:send(("BDAT %d\r\n"):format(#first) .. first)
      assert.equal("250", (c.reply()))
      assert.equal("headers", seen.order[1])
      assert.is_true(seen.calls >= 4)
      assert.equal(0, count(seen.order, "message"))
      c.sock:send("BDAT 5 LAST\r\ntail.")
      assert.equal("250", (c.reply()))
      assert.equal(BODY .. "tail.", table.concat(seen.body))
      assert.equal("message", seen.order[#seen.order])
      assert.equal(#first + 5, seen.size)
      c.cmd("QUIT")
      c.close()
    end, 60)
  end)

  it("BDAT: a refusal ends the transaction with its chunk, the session stays in step", function()
    H.run(function()
      local seen = new_seen()
      local _, port = start { plugins = { recorder(seen, {
        body = function(s) if #s.body == 1 then return server.reject("bad chunk") end end,
      }) } }
      local c = H.smtp(port, 20)
      envelope(c)
      local first = HEADER .. BODY
      c.sock:send(("BDAT %d\r\n"):format(#first) .. first)
      local code, text = c.reply()
      assert.equal("550", code)
      assert.matches("bad chunk", text, 1, true)
      assert.equal(1, seen.calls)
      -- the transaction is over: a further chunk is consumed and refused
      c.sock:send("BDAT 5 LAST\r\ntail.")
      assert.equal("503", (c.reply()))
      assert.equal("250", (c.cmd("MAIL FROM:<a@client.test>")))
      assert.equal("250", (c.cmd("RCPT TO:<b@mx.test>")))
      seen.body = { "skip" } -- the next message passes the verdict
      local small = "Subject: s\r\n\r\nhello\r\n"
      c.sock:send(("BDAT %d LAST\r\n"):format(#small) .. small)
      assert.equal("250", (c.reply()))
      assert.equal("message", seen.order[#seen.order])
      c.cmd("QUIT")
      c.close()
    end, 60)
  end)

  it("without headers or body plugins reads DATA in one call", function()
    H.run(function()
      local got
      local _, port = start { plugins = { { name = "end", message = function(_, msg) got = msg:read() end } } }
      local c = H.smtp(port, 20)
      local index = getmetatable(c.sock).__index
      local receivebody = index.receivebody
      local calls, steps = 0, 0
      index.receivebody = function(sock, sink, opts)
        calls = calls + 1
        if opts and opts.step then steps = steps + 1 end
        return receivebody(sock, sink, opts)
      end
      local ok, err = pcall(function()
        envelope(c)
        assert.equal("354", (c.cmd("DATA")))
        assert.equal("250", (c.cmd(HEADER .. BODY .. ".")))
      end)
      index.receivebody = receivebody
      assert(ok, err)
      assert.equal(1, calls)
      assert.equal(0, steps)
      assert.equal(HEADER .. BODY, got)
      c.cmd("QUIT")
      c.close()
    end, 60)
  end)
end)
