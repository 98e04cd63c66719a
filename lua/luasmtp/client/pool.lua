--- luasmtp.client.pool: reuse SMTP sessions for scripts that send many
-- messages.
--
--   local pool = client.pool { server = "mx.example:25", tls = "opportunistic",
--                              max_connections = 4, max_messages = 100 }
--   local res, token, err = pool:send { from = ..., to = ..., body = ... }
--   pool:close()
--
-- Sessions are keyed by server (host, port or path, TLS mode, user, LMTP, HELO
-- name); each key has at most max_connections sessions, each used for at
-- most max_messages messages (or the server's LIMITS MAILMAX) and for at
-- most max_age seconds. An idle session is closed (QUIT) once it has
-- been idle for idle_timeout: a task of the pool does that while any
-- session is idle, so no idle session outlives it. When the server has
-- closed an idle session meanwhile, the send is retried once on a fresh
-- one, provided nothing of the message was delivered yet.
--
-- Sessions opened elsewhere (MX delivery, which connects and checks the
-- TLS policy itself) can be kept under a key of the caller's making:
-- pool:keep(key, session) after a message, pool:take(key) before the
-- next; the same caps and the same idle closing apply.
local core = require "luasmtp.core"

local M = {}

local POOL_DEFAULTS = {
  max_connections = 4,  -- per server
  max_messages = 100,   -- per session
  idle_timeout = 30,    -- seconds an idle session is kept before it is closed
  max_age = 300,        -- seconds after its opening a session is no longer reused
  wait_timeout = 60,    -- seconds send() waits for a free session
}

local Pool = {}

local function wake(s)
  if s.waiters then s.waiters:signal() end
end

Pool.__index = Pool
Pool.__close = function(self) self:close() end

local function key_of(opts)
  local auth = opts.auth or {}
  return table.concat({
    tostring(opts.server or ""), tostring(opts.host or ""), tostring(opts.port or ""), tostring(opts.path or ""),
    tostring(opts.tls or ""),
    tostring(auth.user or ""), tostring(opts.lmtp or false), tostring(opts.helo or ""),
  }, "\0")
end

--- new(opts, client) -> pool. opts: the connection options of
-- client.connect plus max_connections, max_messages, idle_timeout,
-- wait_timeout.
function M.new(opts, client)
  opts = opts or {}
  assert(type(opts) == "table", "pool options must be a table")
  local self = setmetatable({ client = client, opts = {}, servers = {}, closed = false,
    born = setmetatable({}, { __mode = "k" }), kept = {} }, Pool)
  for k, v in pairs(POOL_DEFAULTS) do self[k] = v end
  for k, v in pairs(opts) do
    if POOL_DEFAULTS[k] ~= nil then
      assert(type(v) == "number" and v > 0, k .. " must be a positive number")
      self[k] = v
    else
      self.opts[k] = v
    end
  end
  return self
end

function Pool:server(opts)
  local key = key_of(opts)
  local s = self.servers[key]
  if not s then
    s = { idle = {}, busy = 0 }
    self.servers[key] = s
  end
  return s
end

-- May this idle item be used again now?
local function usable(self, item, now)
  return now - item.since <= self.idle_timeout and now - item.born <= self.max_age and not item.conn.broken
end

-- An idle session of s still fit for use (the others are closed), or nil.
local function take_idle(self, s)
  while #s.idle > 0 do
    local item = table.remove(s.idle)
    if usable(self, item, core.update_now()) then
      return item.conn, item.born
    end
    item.conn:close()
  end
end

-- Every server's and every key's state.
local function each_set(self)
  local sets = {}
  for _, s in pairs(self.servers) do sets[#sets + 1] = s end
  for _, s in pairs(self.kept) do sets[#sets + 1] = s end
  return sets
end

-- The reaper: one task while any session is idle; it closes each
-- session whose idle time has run out and ends when none is idle (or
-- the pool is closed).
local function reap(self)
  while not self.closed do
    local now = core.update_now()
    local expired, next_due = {}, math.huge
    for _, s in ipairs(each_set(self)) do
      local keep = {}
      for _, item in ipairs(s.idle) do
        if usable(self, item, now) then
          keep[#keep + 1] = item
          next_due = math.min(next_due, item.since + self.idle_timeout, item.born + self.max_age)
        else
          expired[#expired + 1] = item.conn
        end
      end
      s.idle = keep
    end
    -- a key (a domain, for MX) with nothing kept is forgotten
    for key, s in pairs(self.kept) do
      if #s.idle == 0 then self.kept[key] = nil end
    end
    for _, conn in ipairs(expired) do conn:close() end
    if #expired == 0 then
      if next_due == math.huge then break end
      self.reaper_cond:wait(math.max(0.01, next_due - core.update_now()))
    end
  end
  self.reaper_cond:close()
  self.reaper, self.reaper_cond = nil, nil
end

-- Put conn on s's idle list (born: when it was opened) and make sure
-- the reaper runs.
local function park(self, s, conn, born)
  local now = core.update_now()
  s.idle[#s.idle + 1] = { conn = conn, since = now, born = born or now }
  if not self.reaper then
    self.reaper_cond = core.cond()
    self.reaper = core.spawn(reap, self)
  end
end

-- Does conn have room for another message? (conn.max_messages: a cap
-- of its own, set by whoever opened it, when lower than the pool's)
local function has_room(self, conn)
  local max = math.min(self.max_messages, conn.max_messages or math.huge)
  local mailmax = conn.limits and conn.limits.MAILMAX
  if mailmax and mailmax < max then max = mailmax end
  return not self.closed and not conn.broken and conn.messages < max
end

-- A session for opts: an idle one still young enough, a new one while
-- under the cap, else wait for one to come back.
function Pool:acquire(opts)
  local s = self:server(opts)
  local deadline = core.update_now() + self.wait_timeout
  while true do
    if self.closed then
      return nil, "closed", "the pool is closed"
    end
    local idle, born = take_idle(self, s)
    if idle then
      s.busy = s.busy + 1
      self.born[idle] = born
      return idle, true
    end
    if s.busy < self.max_connections then
      s.busy = s.busy + 1
      local conn, token, err = self.client.connect(opts)
      if not conn then
        s.busy = s.busy - 1
        wake(s)
        return nil, token, err
      end
      self.born[conn] = core.update_now()
      return conn, false
    end
    local remaining = deadline - core.update_now()
    if remaining <= 0 then
      return nil, "timeout", "no free session within " .. self.wait_timeout .. " s"
    end
    s.waiters = s.waiters or core.cond()
    s.waiters:wait(remaining)
  end
end


function Pool:release(opts, conn)
  local s = self:server(opts)
  s.busy = s.busy - 1
  local born = self.born[conn]
  self.born[conn] = nil
  if has_room(self, conn) then
    park(self, s, conn, born)
  else
    conn:close()
  end
  wake(s)
  if self.closed and s.busy == 0 and s.waiters then
    s.waiters:close()
    s.waiters = nil
  end
end

-- May this failure be retried on a new session? Only when the session
-- was reused, it failed before the body went out, and nothing was
-- delivered. (M.retryable: MX delivery asks the same of its kept
-- sessions.)
local function retryable(token, err)
  if not err or (err.result and #err.result.accepted > 0) then
    return false
  end
  local stage = err.stage
  if stage ~= "rset" and stage ~= "mail" and stage ~= "rcpt" and stage ~= "data" then
    return false
  end
  return token == "closed" or token == "reset" or token == "io" or (token == "smtp" and err.code == 421)
end

M.retryable = retryable

--- pool:send(msg [, server]) -> result | nil, token, err
-- server: connection options overriding the pool's (another host...),
-- and max_messages: a lower cap for the sessions this opens.
function Pool:send(msg, server)
  local opts, cap = self.opts, nil
  if server then
    opts = {}
    for k, v in pairs(self.opts) do opts[k] = v end
    for k, v in pairs(server) do opts[k] = v end
    cap, opts.max_messages = opts.max_messages, nil
  end
  local plan, t, e = self.client.build_plan(msg)
  if not plan then return nil, t, e end
  for attempt = 1, 2 do
    local conn, reused_or_token, err = self:acquire(opts)
    if not conn then
      return nil, reused_or_token, err
    end
    if cap and not reused_or_token then conn.max_messages = cap end
    local res, token, serr = conn:send_plan(plan)
    self:release(opts, conn)
    if res or attempt == 2 or not reused_or_token or not retryable(token, serr)
      or not plan.source:replayable() and plan.source.consumed then
      return res, token, serr
    end
  end
end

--- pool:take(key) -> session | nil: a session kept under key with
-- pool:keep, idle for less than idle_timeout, opened less than max_age
-- ago and not broken (the others are closed). The caller owns it until
-- it gives it back with keep (or closes it).
function Pool:take(key)
  assert(type(key) == "string", "pool:take needs a key")
  if self.closed then return nil end
  local s = self.kept[key]
  if not s then return nil end
  local conn, born = take_idle(self, s)
  if #s.idle == 0 and self.kept[key] == s then self.kept[key] = nil end
  if conn then self.born[conn] = born end
  return conn
end

--- pool:keep(key, session) -> true when kept for the next take(key),
-- false when it was closed instead (broken, max_messages reached, the
-- pool closed).
function Pool:keep(key, conn)
  assert(type(key) == "string", "pool:keep needs a key")
  local born = self.born[conn]
  self.born[conn] = nil
  if not has_room(self, conn) then
    conn:close()
    return false
  end
  local s = self.kept[key]
  if not s then
    s = { idle = {}, busy = 0 }
    self.kept[key] = s
  end
  park(self, s, conn, born)
  return true
end

--- pool:stats() -> { idle =, busy = } over every server and key
function Pool:stats()
  local idle, busy = 0, 0
  for _, s in ipairs(each_set(self)) do
    idle = idle + #s.idle
    busy = busy + s.busy
  end
  return { idle = idle, busy = busy }
end

--- pool:close(): QUIT the idle sessions; busy ones close when released.
function Pool:close()
  self.closed = true
  if self.reaper_cond then self.reaper_cond:signal() end
  for _, s in ipairs(each_set(self)) do
    while #s.idle > 0 do
      table.remove(s.idle).conn:close()
    end
    if s.waiters then
      s.waiters:broadcast()
      if s.busy == 0 then
        s.waiters:close()
        s.waiters = nil
      end
    end
  end
  return true
end

return M
