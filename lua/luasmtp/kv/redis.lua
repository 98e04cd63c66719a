--- The luasmtp.kv interface over Redis: slots, rates and values shared
-- by every node that uses the same Redis (nodes behind a load balancer).
--
--   local kv = require "luasmtp.kv"
--   local store = kv.redis{ host = "10.0.0.5", port = 6379, password = "...",
--                           prefix = "luasmtp:", on_error = "open", timeout = 0.5 }
--
-- Every operation is one atomic step in Redis (a script or a single
-- command), timed by Redis's own clock (TIME inside the scripts), so the
-- nodes' clocks do not need to agree:
--   acquire/release  a sorted set per key: one member per lease (this
--                    node's id and a counter), scored with its expiry.
--                    The script drops expired members, counts and adds
--                    in one step. The node refreshes its leases every
--                    lease_ttl/3; a lease of a node that died (or lost
--                    Redis) expires lease_ttl seconds after its last
--                    refresh and its slot is free again.
--   hit              an exact sliding window: a sorted set of the events
--                    in the window (at most limit per key), trimmed,
--                    checked and counted in one script.
--   incr             SET NX PX (the ttl starts with the key) and INCRBY
--                    in one script.
--   get/set/delete   GET, SET (PX for a ttl), DEL.
-- Keys: prefix .. "s:" .. key (slots), "r:" (rates), "v:" (values).
-- Failures (Redis down, timeout) are nil, err; on_error tells policies
-- what to do then. Values come back as strings (a number set is read as
-- its decimal string).
local core = require "luasmtp.core"
local options = require "luasmtp.options"
local redis = require "luasmtp.redis"

local M = {}

local store = {}
store.__index = store

local ACQUIRE = [[
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
]]

-- KEYS: the keys of the leases, ARGV[1]: ttl, ARGV[i + 1]: lease of KEYS[i].
-- A lease that has expired meanwhile is not brought back (ZADD XX).
local REFRESH = [[
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local n = 0
for i, key in ipairs(KEYS) do
  local score = redis.call('ZSCORE', key, ARGV[i + 1])
  if score and tonumber(score) > now then
    redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 1])
    if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
    n = n + 1
  end
end
return n
]]

-- An exact sliding log: one member per counted event, scored with its
-- time (microseconds); the script drops what left the window, counts
-- and adds in one step. At most `limit` members per key.
local HIT = [[
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = math.ceil(tonumber(ARGV[2]) * 1000000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
return 1
]]

local INCR = [[
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], 0, 'NX', 'PX', ARGV[2]) end
local by = tonumber(ARGV[1])
if by == math.floor(by) then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
return redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
]]

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

local function script(text)
  return { text = text, sha = hex(core.digest("sha1", text)) }
end

local SCRIPTS = {
  acquire = script(ACQUIRE), refresh = script(REFRESH), hit = script(HIT), incr = script(INCR),
}

local function ms(seconds)
  return math.max(1, math.ceil(seconds * 1000))
end

-- Run a script by its digest; load it with EVAL when this Redis has not
-- seen it yet (after a restart, or on a new server). eval1: one key.
local function eval1(self, s, key, ...)
  local r = self.client
  local v, err, detail = r:command("EVALSHA", s.sha, 1, key, ...)
  if v == nil and type(err) == "string" and err:find("^NOSCRIPT") then
    v, err, detail = r:command("EVAL", s.text, 1, key, ...)
  end
  return v, err, detail
end

local function eval(self, s, keys, ...)
  local r = self.client
  local args = table.move(keys, 1, #keys, 4, { "EVALSHA", s.sha, #keys })
  table.move({ ... }, 1, select("#", ...), #args + 1, args)
  local v, err, detail = r:command(table.unpack(args))
  if v == nil and type(err) == "string" and err:find("^NOSCRIPT") then
    args[1], args[2] = "EVAL", s.text
    v, err, detail = r:command(table.unpack(args))
  end
  return v, err, detail
end

local function failed(err, detail)
  return nil, detail and (err .. ": " .. detail) or err or "redis: failed"
end

function store:get(key)
  local v, err, detail = self.client:command("GET", self.prefix .. "v:" .. key)
  if v == nil and err then return failed(err, detail) end
  return v
end

function store:set(key, value, ttl)
  assert(type(value) == "string" or type(value) == "number", "kv: value must be a string or a number")
  local v, err, detail
  if ttl then
    v, err, detail = self.client:command("SET", self.prefix .. "v:" .. key, value, "PX", ms(ttl))
  else
    v, err, detail = self.client:command("SET", self.prefix .. "v:" .. key, value)
  end
  if v == nil then return failed(err, detail) end
  return true
end

function store:delete(key)
  local v, err, detail = self.client:command("DEL", self.prefix .. "v:" .. key)
  if v == nil then return failed(err, detail) end
  return true
end

function store:incr(key, by, ttl)
  by = by or 1
  local v, err, detail = eval1(self, SCRIPTS.incr, self.prefix .. "v:" .. key, by, ttl and ms(ttl) or "")
  if v == nil then return failed(err, detail) end
  return tonumber(v)
end

function store:hit(key, limit, window)
  self.seq = self.seq + 1
  local v, err, detail = eval1(self, SCRIPTS.hit, self.prefix .. "r:" .. key, limit, window,
    self.node .. ":" .. self.seq)
  if v == nil then return failed(err, detail) end
  return v == 1
end

-- Leases held by this node: refreshed by one task while there are any.
local function refresher(self)
  while self.nleases > 0 do
    self.wake:wait(self.lease_ttl / 3)
    if self.nleases == 0 then break end
    local keys, members = {}, {}
    for lease, key in pairs(self.leases) do
      keys[#keys + 1] = key
      members[#members + 1] = lease
    end
    -- a bounded number of keys per script call
    for first = 1, #keys, 200 do
      local last = math.min(first + 199, #keys)
      local ok, err, detail = eval(self, SCRIPTS.refresh, table.move(keys, first, last, 1, {}),
        ms(self.lease_ttl), table.unpack(members, first, last))
      if ok == nil and self.log then self.log("warning", "kv.redis: refreshing leases: %s", tostring(detail or err)) end
    end
  end
  self.refreshing = false
end

function store:acquire(key, limit)
  self.seq = self.seq + 1
  local lease = self.node .. ":" .. self.seq
  local rkey = self.prefix .. "s:" .. key
  local v, err, detail = eval1(self, SCRIPTS.acquire, rkey, limit, lease, ms(self.lease_ttl))
  if v == nil then return failed(err, detail) end
  if v ~= 1 then return false end
  self.leases[lease] = rkey
  self.nleases = self.nleases + 1
  if not self.refreshing then
    self.refreshing = true
    core.spawn(refresher, self)
  end
  return lease
end

function store:release(key, lease)
  local rkey = self.leases[lease]
  if rkey then
    self.leases[lease] = nil
    self.nleases = self.nleases - 1
    if self.nleases == 0 then self.wake:signal() end
  end
  local v, err, detail = self.client:command("ZREM", rkey or (self.prefix .. "s:" .. key), lease)
  if v == nil then return failed(err, detail) end
  return true
end

--- Close the connection; the leases still held expire in Redis.
function store:close()
  self.leases, self.nleases = {}, 0
  self.wake:signal()
  self.client:close()
end

-- The store's own options, then every option of redis.connect.
local own = {
  { "prefix", "string", "luasmtp:", "put before every key (slots under prefix .. \"s:\", rates \"r:\", "
    .. "values \"v:\")" },
  { "on_error", "string", "open", "\"open\" or \"closed\": what the limits plugin does when the store fails" },
  { "lease_ttl", "number", 30, "seconds a slot stays taken without a refresh (refreshed every lease_ttl / 3)" },
  { "log", "function", nil, "function(level, fmt, ...) for failed lease refreshes" },
  { "client", "userdata", nil, "a luasmtp.redis client to use instead of connecting (the connection "
    .. "options are then ignored)" },
}
local entries = {}
for _, e in ipairs(own) do entries[#entries + 1] = e end
for _, e in ipairs(redis.schema.entries) do
  entries[#entries + 1] = { name = e.name, type = e.type, default = e.default, doc = e.doc }
end
M.schema = options.schema("kv.redis", entries)
local connect_names = {}
for _, e in ipairs(redis.schema.entries) do connect_names[#connect_names + 1] = e.name end

--- kv.redis(opts) -> store | nil, err
-- The connection options are those of luasmtp.redis.connect; timeout
-- (default 1 s) bounds every operation. Unknown options and wrong types
-- raise.
function M.new(opts)
  opts = M.schema:apply(opts, 3)
  assert(opts.on_error == "open" or opts.on_error == "closed", "kv.redis: on_error must be \"open\" or \"closed\"")
  assert(opts.lease_ttl >= 0.3, "kv.redis: lease_ttl must be seconds >= 0.3")
  local client = opts.client
  if not client then
    local copts = {}
    for _, k in ipairs(connect_names) do copts[k] = opts[k] end
    local err, detail
    client, err, detail = redis.connect(copts)
    if not client then return failed(err, detail) end
  end
  return setmetatable({
    client = client,
    prefix = opts.prefix,
    on_error = opts.on_error,
    lease_ttl = opts.lease_ttl,
    log = opts.log,
    node = hex(core.random(8)),
    seq = 0,
    leases = {}, nleases = 0,
    wake = core.cond(),
    refreshing = false,
    kind = "redis",
  }, store)
end

return M
