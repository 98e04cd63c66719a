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

  it("keeps at most max_keys keys, data, slots and rates together", function()
    H.run(function()
      local s = kv.memory { max_keys = 3 }
      assert.is_true(s:set("a", 1, 0.05))
      assert.truthy(s:acquire("slot", 5))
      assert.is_true(s:hit("rate", 5, 60))
      local ok, token, detail = s:set("b", 2)
      assert.is_nil(ok)
      assert.equal("limit", token)
      assert.matches("3 keys", detail)
      assert.is_nil(select(1, s:acquire("slot2", 5)))
      assert.equal("limit", select(2, s:hit("rate2", 5, 60)))
      assert.equal("limit", select(2, s:incr("n", 1)))
      -- keys already there still work
      assert.truthy(s:acquire("slot", 5))
      assert.is_true(s:set("a", 7, 0.05))
      -- room comes back when a key goes or expires
      s:release("slot"); s:release("slot")
      assert.is_true(s:set("b", 2))
      luasmtp.sleep(0.1)
      luasmtp.update_now()
      assert.is_true(s:set("c", 3)) -- "a" expired: swept to make room
      assert.is_nil(s:get("a"))
      assert.equal(3, s.keys)
    end)
  end)

  it("lets the limits plugin follow on_error when the store is full", function()
    local limits = require "luasmtp.server.plugins.limits"
    local function session(ip)
      return { client_address = ip, config = { hostname = "mx.test" }, log = function() end }
    end
    local open = limits { store = kv.memory { max_keys = 1 } }
    assert.is_nil(open.connect(session("192.0.2.1")))
    assert.is_nil(open.connect(session("192.0.2.2"))) -- full: let in
    local closed = limits { store = kv.memory { max_keys = 1, on_error = "closed" } }
    assert.is_nil(closed.connect(session("192.0.2.1")))
    local r = closed.connect(session("192.0.2.2"))
    assert.equal(421, r.code)
  end)
end)
