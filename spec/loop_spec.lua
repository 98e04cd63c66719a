local luasmtp = require "luasmtp"
local H = require "spec.helper"

describe("loop and tasks", function()
  after_each(H.assert_no_leaks)

  it("runs spawned tasks and passes arguments", function()
    local got = {}
    luasmtp.spawn(function(a, b) got[#got + 1] = a + b end, 1, 2)
    luasmtp.spawn(function() got[#got + 1] = "x" end)
    assert.is_true(luasmtp.run())
    assert.same({ 3, "x" }, got)
  end)

  it("sleeps with float seconds and interleaves tasks", function()
    local order = {}
    luasmtp.spawn(function() luasmtp.sleep(0.03) order[#order + 1] = "slow" end)
    luasmtp.spawn(function() luasmtp.sleep(0.01) order[#order + 1] = "fast" end)
    local t0 = luasmtp.update_now()
    luasmtp.run()
    assert.same({ "fast", "slow" }, order)
    assert.is_true(luasmtp.update_now() - t0 >= 0.025)
  end)

  it("blocks in the main chunk until the call completes", function()
    local t0 = luasmtp.update_now()
    local done = false
    luasmtp.spawn(function() done = true end)
    luasmtp.sleep(0.02) -- runs the loop, so the task runs too
    assert.is_true(done)
    assert.is_true(luasmtp.now() - t0 >= 0.015)
  end)

  it("join returns results, errors and timeouts", function()
    H.run(function()
      local t = luasmtp.spawn(function(x) luasmtp.sleep(0.01) return x, "two" end, 1)
      assert.same({ true, 1, "two" }, { t:join() })
      local bad = luasmtp.spawn(function() error("boom") end)
      local ok, err = bad:join()
      assert.is_false(ok)
      assert.matches("boom", err)
      assert.matches("traceback", err)
      local slow = luasmtp.spawn(function() luasmtp.sleep(0.2) end)
      assert.same({ nil, "timeout" }, { slow:join(0.01) })
      assert.is_true(slow:join())
    end)
  end)

  it("reports a failing task with its traceback and keeps the others going", function()
    local reported = {}
    local prev = luasmtp.on_error(function(msg, task) reported[#reported + 1] = { msg, task } end)
    local finished = false
    local bad = luasmtp.spawn(function() luasmtp.sleep(0.005) error("task exploded") end)
    luasmtp.spawn(function() luasmtp.sleep(0.02) finished = true end)
    luasmtp.run()
    luasmtp.on_error(prev)
    assert.is_true(finished)
    assert.equal(1, #reported)
    assert.matches("task exploded", reported[1][1])
    assert.matches("stack traceback", reported[1][1])
    assert.equal(bad, reported[1][2])
  end)

  it("a plain coroutine.yield gives other tasks a turn", function()
    local order = {}
    luasmtp.spawn(function() order[#order + 1] = 1; coroutine.yield(); order[#order + 1] = 3 end)
    luasmtp.spawn(function() order[#order + 1] = 2 end)
    luasmtp.run()
    assert.same({ 1, 2, 3 }, order)
  end)

  it("a task that keeps yielding does not starve timers or I/O", function()
    local stop = false
    local spins = 0
    luasmtp.spawn(function() while not stop do spins = spins + 1; coroutine.yield() end end)
    luasmtp.spawn(function() luasmtp.sleep(0.01); stop = true end)
    assert.is_true(luasmtp.run())
    assert.is_true(spins > 1)
  end)

  it("refuses to wait across a C-call boundary with a clear message", function()
    H.run(function()
      local ok, err = pcall(table.sort, { 3, 1, 2 }, function(a, b)
        luasmtp.sleep(0)
        return a < b
      end)
      assert.is_false(ok)
      assert.matches("C%-call boundary", err)
      ok, err = pcall(string.gsub, "abc", "%w", function() luasmtp.sleep(0) end)
      assert.is_false(ok)
      assert.matches("C%-call boundary", err)
      -- and the task itself still works afterwards
      luasmtp.sleep(0.001)
    end)
  end)

  it("refuses to wait inside a foreign coroutine within a task", function()
    H.run(function()
      local co = coroutine.create(function() luasmtp.sleep(0) end)
      local ok, err = coroutine.resume(co)
      assert.is_false(ok)
      assert.matches("not a luasmtp task", err)
    end)
  end)

  it("refuses to wait inside a __gc finalizer", function()
    local msg
    H.run(function()
      local prev = luasmtp.on_error(function() end)
      do
        local _ = setmetatable({}, { __gc = function()
          local ok, err = pcall(luasmtp.sleep, 0)
          if not ok then msg = err end
        end })
      end
      collectgarbage("collect")
      luasmtp.on_error(prev)
    end)
    assert.matches("C%-call boundary", msg)
  end)

  it("conditions wake waiters, time out and close", function()
    H.run(function()
      local c = luasmtp.cond()
      local woke = 0
      for _ = 1, 3 do
        luasmtp.spawn(function() if c:wait(1) then woke = woke + 1 end end)
      end
      luasmtp.sleep(0)
      assert.is_true(c:signal())
      luasmtp.sleep(0)
      assert.equal(1, woke)
      assert.equal(2, c:broadcast())
      luasmtp.sleep(0)
      assert.equal(3, woke)
      assert.is_false(c:signal())
      assert.same({ nil, "timeout" }, { c:wait(0.01) })
      local t = luasmtp.spawn(function() return c:wait() end)
      luasmtp.sleep(0)
      c:close()
      assert.same({ true, nil, "closed" }, { t:join() })
    end)
  end)

  it("stale wake-ups do not resume a task waiting on something else", function()
    H.run(function()
      -- The task waits on c1 with a timeout, times out, then waits on c2.
      -- Signalling c1 afterwards must not wake it.
      local c1, c2 = luasmtp.cond(), luasmtp.cond()
      local t = luasmtp.spawn(function()
        assert(not c1:wait(0.001))
        return c2:wait(0.05)
      end)
      luasmtp.sleep(0.01)
      assert.is_false(c1:signal())
      assert.same({ true, nil, "timeout" }, { t:join() })
    end)
  end)

  it("run() reports a deadlock instead of hanging", function()
    local c = luasmtp.cond()
    luasmtp.spawn(function() c:wait() end)
    local ok, why, n = luasmtp.run()
    assert.is_nil(ok)
    assert.equal("deadlock", why)
    assert.equal(1, n)
    c:close() -- releases the stuck task
    assert.is_true(luasmtp.run())
  end)

  it("waits for signals, counts them while nobody waits, and times out", function()
    local f = assert(io.open("/proc/self/stat"))
    local pid = f:read("l"):match("^(%d+)")
    f:close()
    H.run(function()
      assert.same({ nil, "timeout" }, { luasmtp.wait_signal("USR1", "USR2", 0.01) })
      local t = luasmtp.spawn(function() return luasmtp.wait_signal("USR1", "USR2", 5) end)
      luasmtp.sleep(0.01)
      os.execute("kill -USR2 " .. pid)
      assert.same({ true, "USR2" }, { t:join(5) })
      -- caught while nobody waits: delivered to the next waiter
      os.execute("kill -USR1 " .. pid)
      luasmtp.sleep(0.02)
      assert.equal("USR1", luasmtp.wait_signal("SIGUSR1", 1))
    end)
    -- a caught signal alone does not keep run() from returning
    assert.is_true(luasmtp.run())
  end)

  it("a task waiting again on a descriptor number that now names a new file is woken by it", function()
    H.run(function()
      local a, b = luasmtp.socketpair()
      local number = a:getfd()
      local t = luasmtp.spawn(function()
        assert.equal("one", a:receiveline(nil, 5))
        -- in the same pass: close the socket, get its number back for a
        -- new one and wait on that, for the same event
        a:close()
        b:close()
        local c, d = luasmtp.socketpair()
        assert.equal(number, c:getfd())
        luasmtp.spawn(function()
          luasmtp.sleep(0.05)
          d:send("two\r\n")
        end)
        local line, err = c:receiveline(nil, 5)
        c:close()
        d:close()
        return line, err
      end)
      luasmtp.sleep(0.05) -- t waits on a first
      b:send("one\r\n")
      assert.same({ true, "two" }, { t:join(10) })
    end)
  end)

  it("thousands of tasks", function()
    local n = 0
    for _ = 1, 5000 do
      luasmtp.spawn(function() luasmtp.sleep(0) n = n + 1 end)
    end
    luasmtp.run()
    assert.equal(5000, n)
  end)
end)
