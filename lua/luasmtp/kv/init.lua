--- Shared state for policies: connection slots, rate counters and a
-- small key-value API (greylisting, reputation counters).
--
--   local kv = require "luasmtp.kv"
--   local store = kv.memory()      -- in this process (the default)
--   local store = kv.redis{ host = "10.0.0.5" }  -- shared through Redis
--                                  -- (luasmtp.kv.redis)
--
-- Every store has the same methods. A backend that talks to another
-- process may yield inside them (call them from a task; each call is
-- bounded by the backend's timeout), and reports failure as nil, err:
--
--   store:acquire(key, limit) -> lease | false | nil, err
--       take one of `limit` slots under key; false when all are taken
--   store:release(key, lease) -> true | nil, err
--   store:hit(key, limit, window) -> true | false | nil, err
--       count one event in a sliding window of `window` seconds; false
--       (and not counted) when `limit` events are already in it
--   store:incr(key, by, ttl) -> number | nil, err
--   store:get(key) -> value | nil      (nil, err on failure)
--   store:set(key, value, ttl) -> true | nil, err   (ttl in seconds, optional)
--   store:delete(key) -> true | nil, err
--   store.on_error  "open" or "closed": what a policy does when the
--                   store fails (the limits plugin lets the client in
--                   when open, answers 421/451 when closed)
--
-- Values are strings or numbers. Keys are strings; a store may prefix
-- them (a shared Redis serves several applications).
local core = require "luasmtp.core"

local M = {}

local memory = {}
memory.__index = memory

local function expired(e, now)
  return e.expires and e.expires <= now
end

-- Every key in the three tables counts against max_keys: a client that
-- makes up keys (one per address it connects from) cannot grow the
-- store without bound.
local function forget(self, tbl, key)
  if tbl[key] ~= nil then
    tbl[key] = nil
    self.keys = self.keys - 1
  end
end

-- Drop what has expired: data past its ttl, rate windows past both halves.
local function sweep_now(self)
  self.writes = 0
  local now = core.now()
  for k, e in pairs(self.data) do
    if expired(e, now) then forget(self, self.data, k) end
  end
  for k, r in pairs(self.rates) do
    if r.slot < math.floor(now / r.half) - 1 then forget(self, self.rates, k) end
  end
end

-- Room for one new key in tbl: true, or nil, "limit", detail when the
-- store is full even after a sweep. Also sweeps every `sweep_every`
-- new keys, so keys that are never read again do not pile up.
local function room(self, tbl, key)
  if tbl[key] ~= nil then return true end
  self.writes = self.writes + 1
  if self.writes >= self.sweep_every or self.keys >= self.max_keys then sweep_now(self) end
  if self.keys >= self.max_keys then
    return nil, "limit", ("kv.memory: %d keys, the most it keeps"):format(self.max_keys)
  end
  self.keys = self.keys + 1
  return true
end

function memory:get(key)
  local e = self.data[key]
  if not e then return nil end
  if expired(e, core.now()) then
    forget(self, self.data, key)
    return nil
  end
  return e.value
end

function memory:set(key, value, ttl)
  assert(type(value) == "string" or type(value) == "number", "kv: value must be a string or a number")
  local ok, token, detail = room(self, self.data, key)
  if not ok then return nil, token, detail end
  self.data[key] = { value = value, expires = ttl and core.now() + ttl or nil }
  return true
end

function memory:delete(key)
  forget(self, self.data, key)
  return true
end

function memory:incr(key, by, ttl)
  local e = self.data[key]
  local now = core.now()
  if not e or expired(e, now) then
    local ok, token, detail = room(self, self.data, key)
    if not ok then return nil, token, detail end
    e = { value = 0, expires = ttl and now + ttl or nil }
    self.data[key] = e
  end
  local n = tonumber(e.value) or 0
  e.value = n + (by or 1)
  return e.value
end

-- Slots: a count per key. Check and take in one step: no other task
-- runs in between.
function memory:acquire(key, limit)
  local n = self.slots[key] or 0
  if n >= limit then return false end
  if n == 0 then
    local ok, token, detail = room(self, self.slots, key)
    if not ok then return nil, token, detail end
  end
  self.slots[key] = n + 1
  return true
end

function memory:release(key)
  local n = (self.slots[key] or 0) - 1
  if n > 0 then
    self.slots[key] = n
  else
    forget(self, self.slots, key)
  end
  return true
end

-- Sliding window in two halves: the previous half counts with the
-- weight of the part of it still inside the window.
function memory:hit(key, limit, window)
  local half = window / 2
  local now = core.now()
  local slot = math.floor(now / half)
  local r = self.rates[key]
  if not r or r.half ~= half then
    local ok, token, detail = room(self, self.rates, key)
    if not ok then return nil, token, detail end
    r = { slot = slot, half = half, cur = 0, prev = 0 }
    self.rates[key] = r
  elseif slot ~= r.slot then
    r.prev = slot == r.slot + 1 and r.cur or 0
    r.cur, r.slot = 0, slot
  end
  local weight = 1 - (now / half - slot)
  if r.cur + r.prev * weight >= limit then return false end
  r.cur = r.cur + 1
  return true
end

--- kv.memory{ on_error = "open", max_keys = 100000, sweep_every = 1000 }
-- -> store kept in this process. At max_keys (data, slot and rate keys
-- together, after dropping what has expired) a new key is refused with
-- nil, "limit", detail; the store's on_error then decides.
function M.memory(opts)
  opts = opts or {}
  return setmetatable({
    data = {}, slots = {}, rates = {},
    keys = 0, max_keys = opts.max_keys or 100000,
    writes = 0, sweep_every = opts.sweep_every or 1000,
    on_error = opts.on_error or "open",
    kind = "memory",
  }, memory)
end

--- kv.redis{ host =, port =, prefix = "luasmtp:", on_error = "open", ... }
-- -> store kept in Redis, shared by every node that uses it
function M.redis(opts)
  local store, err = require("luasmtp.kv.redis").new(opts)
  return store, err
end

return M
