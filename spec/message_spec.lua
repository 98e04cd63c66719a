-- The server's message: header view, body store, streaming.
local core = require "luasmtp.core"
local message = require "luasmtp.server.message"
local H = require "spec.helper"

local function new_sink(threshold, dir)
  return core.sink { threshold = threshold or 1024 * 1024, dir = dir }
end

-- Write data into a sink in pieces of n bytes, as the socket does, and
-- make the message of it.
local function feed(sink, data, n)
  for i = 1, #data, n do
    assert(sink:write(data:sub(i, i + n - 1)))
  end
  return message.from_sink({ from = "a@x.test", rcpt = { "b@y.test" } }, sink)
end

local function new_message() return new_sink() end

local function read_all(msg, size)
  local out = {}
  for piece in msg:chunks(size) do out[#out + 1] = piece end
  return table.concat(out)
end

describe("server message", function()
  local raw = "Subject: hello\r\nX-Folded: one\r\n\ttwo\r\nTo: b@y.test\r\nsubject: again\r\n\r\nbody line\r\n"

  it("parses the header block once, in whatever pieces it arrives", function()
    for _, n in ipairs { 1, 2, 3, 7, 64, #raw } do
      local msg = feed(new_message(), raw, n)
      assert.equal(4, msg.header:count())
      assert.equal("hello", msg.header:get("SUBJECT"))
      assert.equal("again", msg.header:get("subject", 2))
      assert.same({ "hello", "again" }, msg.header:get_all("Subject"))
      assert.equal("one\ttwo", msg.header:get("x-folded"))
      assert.equal(raw, msg:read(), "pieces of " .. n)
      local body = {}
      for piece in msg:body_chunks() do body[#body + 1] = piece end
      assert.equal("body line\r\n", table.concat(body))
      assert.equal(11, msg:body_size())
      assert.equal(#raw, msg:size())
    end
  end)

  it("edits fields without touching the body", function()
    local msg = feed(new_message(), raw, 5)
    msg.header:prepend("Received", "from a\r\n\tby b")
    msg.header:add("X-Added", "1")
    msg.header:set("To", "c@z.test")
    assert.equal(2, msg.header:remove("subject"))
    assert.equal(0, msg.header:remove("nothing"))
    local expected = "Received: from a\r\n\tby b\r\nX-Folded: one\r\n\ttwo\r\nTo: c@z.test\r\n"
      .. "X-Added: 1\r\n\r\nbody line\r\n"
    assert.equal(expected, msg:read())
    assert.equal(expected, read_all(msg, 3))
    assert.equal(#expected, msg:size())
    local names = {}
    for i, name, value in msg.header:fields() do names[i] = name .. "=" .. value end
    assert.same({ "Received=from a\tby b", "X-Folded=one\ttwo", "To=c@z.test", "X-Added=1" }, names)
  end)

  it("refuses header edits that would inject lines", function()
    local msg = feed(new_message(), raw, 100)
    assert.has_error(function() msg.header:add("X-Evil", "a\r\nBcc: victim@x") end)
    assert.has_error(function() msg.header:add("X-Evil", "a\nb") end)
    assert.has_error(function() msg.header:add("Bad Name", "x") end)
    assert.has_error(function() msg.header:set("X", "a\r\n") end)
    msg.header:add("X-Ok", "a\r\n b") -- folding is fine
    assert.equal("a b", msg.header:get("X-Ok"))
  end)

  it("treats data that does not start with a header as body", function()
    for _, data in ipairs { "no header here\r\nSubject: x\r\n\r\nbody\r\n", "\r\nonly body\r\n", "" } do
      local msg = feed(new_message(), data, 4)
      assert.equal(0, msg.header:count())
      assert.equal(data, msg:read())
      msg.header:prepend("Received", "x")
      assert.equal("Received: x\r\n" .. data, msg:read())
    end
  end)

  it("keeps a header without a body, and gives up on an endless header block", function()
    local msg = feed(new_message(), "Subject: only\r\n", 3)
    assert.equal("only", msg.header:get("subject"))
    assert.equal("Subject: only\r\n", msg:read())
    local long = string.rep("X-Long: " .. string.rep("a", 990) .. "\r\n", 100) -- over header_max
    local big = feed(new_message(), long .. "\r\nbody\r\n", 1000)
    assert.equal(0, big.header:count())
    assert.equal(long .. "\r\nbody\r\n", big:read())
  end)

  it("streams a spooled body from the sink's file in its directory", function()
    local dir = H.tmpdir("message-spool")
    local body = string.rep("0123456789", 50000)
    local msg = feed(new_sink(1000, dir), "Subject: big\r\n\r\n" .. body, 4096)
    assert.is_true(msg:spooled())
    local ls = io.popen("ls -A '" .. dir .. "'")
    assert.equal("", ls:read("a"))
    ls:close()
    assert.equal(#body, msg:body_size())
    assert.equal("Subject: big\r\n\r\n" .. body, read_all(msg, 65536))
    assert.equal("Subject: big\r\n\r\n" .. body, msg:read())
    msg:discard()
    assert.is_false(msg:spooled())
  end)
end)
