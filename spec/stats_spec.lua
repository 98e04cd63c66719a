-- luasmtp.stats(): live objects, server sessions and what idle
-- connections hold in memory.
local luasmtp = require "luasmtp"
local H = require "spec.helper"

-- Poll (bounded) until cond() holds; returns whether it did.
local function eventually(cond, timeout)
  local deadline = luasmtp.update_now() + (timeout or 5)
  while not cond() do
    if luasmtp.update_now() > deadline then return false end
    luasmtp.sleep(0.01)
  end
  return true
end

-- A task that waits in receiveline on sock, as an idle session does;
-- it ends when sock is closed.
local function idle_reader(sock)
  return luasmtp.spawn(function() return sock:receiveline(nil, 30) end)
end

local function buffers() return luasmtp.stats().buffer_bytes end

describe("luasmtp.stats", function()
  after_each(function()
    H.close_servers()
    H.assert_no_leaks()
  end)

  it("counts the bytes socket buffers hold, and an idle socket holds none", function()
    H.run(function()
      collectgarbage("collect")
      local base = buffers()
      local a, b = luasmtp.socketpair()
      assert.equal(base, buffers()) -- allocated when needed, not before
      local data = ("x"):rep(40000)
      assert(a:send(data))
      assert.is_true(buffers() >= base + #data) -- queued in a's output buffer
      assert.equal(data, b:receive(#data, 5))
      -- both wait for their peer with nothing pending: no buffer left
      local ra, rb = idle_reader(a), idle_reader(b)
      assert.is_true(eventually(function() return buffers() == base end),
        "idle sockets still hold " .. (buffers() - base) .. " bytes")
      -- a partial line waits in a buffer no larger than itself
      assert(a:send("EHL"))
      assert.is_true(eventually(function() return buffers() == base + 3 end),
        "a 3-byte partial line takes " .. (buffers() - base) .. " bytes")
      assert(a:send("O x\r\n"))
      assert.same({ true, "EHLO x" }, { rb:join(5) })
      a:close()
      b:close()
      assert.same({ true, nil, "closed" }, { ra:join(5) })
      assert.equal(base, buffers())
    end, 20)
  end)

  it("counts server sessions; idle sessions after EHLO hold no buffers", function()
    H.run(function()
      local _, port = H.smtp_server {}
      collectgarbage("collect")
      local base = luasmtp.stats()
      assert.equal(0, base.sessions)
      local clients, readers = {}, {}
      for i = 1, 3 do
        local c = H.smtp(port)
        assert.equal("220", (c.reply()))
        assert.equal("250", (c.cmd("EHLO client.test")))
        clients[i] = c
        assert.equal(i, luasmtp.stats().sessions)
      end
      -- the clients wait for the server too: every socket is idle
      for i, c in ipairs(clients) do readers[i] = idle_reader(c.sock) end
      assert.is_true(eventually(function() return buffers() == base.buffer_bytes end),
        "idle sessions hold " .. (buffers() - base.buffer_bytes) .. " bytes of buffers")
      local st = luasmtp.stats()
      assert.equal(6, st.sockets - base.sockets)
      assert.is_true(st.lua_heap > 0)
      for i, c in ipairs(clients) do
        c.close()
        readers[i]:join(5)
        assert.is_true(eventually(function() return luasmtp.stats().sessions == 3 - i end))
      end
      assert.equal(0, luasmtp.stats().sessions)
      assert.equal(base.buffer_bytes, buffers())
    end, 20)
  end)

  it("counts TLS sessions; idle ones after STARTTLS hold no socket buffers", function()
    H.run(function()
      local sctx, cctx = H.tls_contexts()
      local _, port = H.smtp_server { tls = sctx }
      collectgarbage("collect")
      local base = luasmtp.stats()
      local c = H.smtp(port)
      assert.equal("220", (c.reply()))
      assert.equal("250", (c.cmd("EHLO client.test")))
      assert.equal("220", (c.cmd("STARTTLS")))
      assert(c.sock:starttls(cctx, { servername = "localhost" }))
      assert.equal("250", (c.cmd("EHLO client.test")))
      assert.equal(2, luasmtp.stats().tls_sessions - base.tls_sessions) -- client and server
      local r = idle_reader(c.sock)
      assert.is_true(eventually(function() return buffers() == base.buffer_bytes end),
        "idle TLS sessions hold " .. (buffers() - base.buffer_bytes) .. " bytes of buffers")
      -- and the session goes on once the buffers are gone
      assert(c.sock:send("NOOP\r\n"))
      local ok, line = r:join(5)
      assert.is_true(ok)
      assert.matches("^250 ", line)
      assert.equal("221", (c.cmd("QUIT")))
      c.close()
      assert.is_true(eventually(function() return luasmtp.stats().sessions == 0 end))
      assert.equal(base.tls_sessions, luasmtp.stats().tls_sessions)
    end, 20)
  end)

  it("reports the Lua heap in bytes", function()
    H.run(function()
      collectgarbage("collect")
      local before = luasmtp.stats().lua_heap
      local t = {}
      for i = 1, 10000 do t[i] = i end
      assert.is_true(luasmtp.stats().lua_heap >= before + 10000 * 8)
      assert.equal(10000, #t)
    end, 20)
  end)
end)
