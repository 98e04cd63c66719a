-- The shared-state interface (luasmtp.kv) and its in-process store.
local H = require "spec.helper"
local luasmtp = require "luasmtp"
local kv = require "luasmtp.kv"

describe("kv.memory", function()
  it("gets, sets, deletes and expires values", function()
    H.run(function()
      local s = kv.memory()
      assert.is_nil(s:get("a"))
      assert.is_true(s:set("a", "1"))
      assert.equal("1", s:get("a"))
      assert.is_true(s:set("t", 7, 0.1))
      assert.equal(7, s:get("t"))
      luasmtp.sleep(0.15)
      luasmtp.update_now()
      assert.is_nil(s:get("t"))
      assert.is_true(s:delete("a"))
      assert.is_nil(s:get("a"))
      assert.has_error(function() s:set("x", {}) end)
    end)
  end)

  it("counts with incr and starts again after the ttl", function()
    H.run(function()
      local s = kv.memory()
      assert.equal(1, s:incr("n", 1, 0.1))
      assert.equal(4, s:incr("n", 3, 0.1))
      luasmtp.sleep(0.15)
      luasmtp.update_now()
      assert.equal(1, s:incr("n", 1))
    end)
  end)

  it("hands out at most limit slots and takes them back", function()
    local s = kv.memory()
    assert.truthy(s:acquire("k", 2))
    assert.truthy(s:acquire("k", 2))
    assert.is_false(s:acquire("k", 2))
    assert.truthy(s:acquire("other", 2))
    s:release("k")
    assert.truthy(s:acquire("k", 2))
    s:release("k"); s:release("k"); s:release("other")
    assert.is_nil(next(s.slots))
  end)

  it("refuses events over the rate and lets them in once the window moves", function()
    H.run(function()
      local s = kv.memory()
      for _ = 1, 3 do assert.is_true(s:hit("r", 3, 0.4)) end
      assert.is_false(s:hit("r", 3, 0.4))
      assert.is_true(s:hit("r2", 3, 0.4)) -- keys are apart
      luasmtp.sleep(0.45)
      luasmtp.update_now()
      assert.is_true(s:hit("r", 3, 0.4))
    end)
  end)

  it("sweeps expired entries that are never read again", function()
    H.run(function()
      local s = kv.memory { sweep_every = 10 }
      for i = 1, 9 do s:set("old" .. i, i, 0.05) end
      luasmtp.sleep(0.1)
      luasmtp.update_now()
      s:set("fresh", 1)
      local n = 0
      for _ in pairs(s.data) do n = n + 1 end
      assert.equal(1, n)
    end)
  end)
end)
