-- core.guarded: Lua code under a deadline (waits interrupted, busy
-- loops stopped by the watchdog), and core.interrupt_guarded.
local luasmtp = require "luasmtp"
local core = require "luasmtp.core"
local H = require "spec.helper"

describe("guarded calls", function()
  after_each(function() H.assert_no_leaks() end)

  it("returns the results, or the error with its traceback", function()
    H.run(function()
      assert.same({ true, "x", 2 }, { core.guarded(5, function(a) luasmtp.sleep(0.01) return a, 2 end, "x") })
      local ok, err = core.guarded(5, function() error("boom") end)
      assert.is_false(ok)
      assert.matches("boom", err)
      assert.matches("stack traceback", err)
    end)
  end)

  it("interrupts a wait past the deadline, whatever it waits for", function()
    H.run(function()
      assert.same({ false, "timeout" }, { core.guarded(0.1, luasmtp.sleep, 3600) })
      local c = luasmtp.cond()
      assert.same({ false, "timeout" }, { core.guarded(0.1, function() return c:wait() end) })
      local a, b = H.tcp_pair()
      assert.same({ false, "timeout" }, { core.guarded(0.1, function() return a:receiveline(100, 3600) end) })
      -- the socket is still usable afterwards
      b:send("hello\r\n")
      assert.equal("hello", a:receiveline(100, 5))
      a:close()
      b:close()
    end)
  end)

  it("stops a busy loop, also one that catches errors, and lets other tasks run after", function()
    H.run(function()
      local ticks = 0
      local other = luasmtp.spawn(function()
        for _ = 1, 3 do luasmtp.sleep(0.01) ticks = ticks + 1 end
      end)
      assert.same({ false, "timeout" }, { core.guarded(0.2, function() while true do end end) })
      assert.same({ false, "timeout" }, { core.guarded(0.2, function()
        while true do pcall(function() while true do end end) end
      end) })
      assert.is_true(other:join(5))
      assert.equal(3, ticks)
      assert.is_nil(debug.gethook())
    end)
  end)

  it("nests: the guard whose deadline passed is the one that answers", function()
    H.run(function()
      assert.same({ false, "timeout" }, { core.guarded(0.1, function()
        return core.guarded(30, luasmtp.sleep, 3600)
      end) })
      assert.same({ true, false, "timeout" }, { core.guarded(30, function()
        return core.guarded(0.1, luasmtp.sleep, 3600)
      end) })
    end)
  end)

  it("is interrupted from another task by interrupt_guarded", function()
    H.run(function()
      local thread
      local t = luasmtp.spawn(function()
        thread = coroutine.running()
        return core.guarded(3600, luasmtp.sleep, 3600)
      end)
      luasmtp.sleep(0.05)
      assert.is_true(core.interrupt_guarded(thread))
      assert.same({ true, false, "timeout" }, { t:join(5) })
      assert.is_false(core.interrupt_guarded(thread))
    end)
  end)
end)
