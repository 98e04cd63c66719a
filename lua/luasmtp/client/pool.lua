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
-- most max_messages messages (or the server's LIMITS MAILMAX). An idle
-- session older than idle_timeout is closed instead of reused. When the
-- server has closed an idle session meanwhile, the send is retried once
-- on a fresh one, provided nothing of the message was delivered yet.
local core = require "luasmtp.core"

local M = {}

local POOL_DEFAULTS = {
  max_connections = 4,  -- per server
  max_messages = 100,   -- per session
  idle_timeout = 30,    -- seconds an idle session may be reused after
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
  local self = setmetatable({ client = client, opts = {}, servers = {}, closed = false }, Pool)
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

-- A session for opts: an idle one still young enough, a new one while
-- under the cap, else wait for one to come back.
function Pool:acquire(opts)
  local s = self:server(opts)
  local deadline = core.update_now() + self.wait_timeout
  while true do
    if self.closed then
      return nil, "closed", "the pool is closed"
    end
    while #s.idle > 0 do
      local item = table.remove(s.idle)
      if core.update_now() - item.since <= self.idle_timeout and not item.conn.broken then
        s.busy = s.busy + 1
        return item.conn, true
      end
      item.conn:close()
    end
    if s.busy < self.max_connections then
      s.busy = s.busy + 1
      local conn, token, err = self.client.connect(opts)
      if not conn then
        s.busy = s.busy - 1
        wake(s)
        return nil, token, err
      end
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
  local max = self.max_messages
  local mailmax = conn.limits and conn.limits.MAILMAX
  if mailmax and mailmax < max then max = mailmax end
  if self.closed or conn.broken or conn.messages >= max then
    conn:close()
  else
    s.idle[#s.idle + 1] = { conn = conn, since = core.update_now() }
  end
  wake(s)
  if self.closed and s.busy == 0 and s.waiters then
    s.waiters:close()
    s.waiters = nil
  end
end

-- May this failure be retried on a new session? Only when the session
-- was reused, it failed before the body went out, and nothing was
-- delivered.
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

--- pool:send(msg [, server]) -> result | nil, token, err
-- server: connection options overriding the pool's (another host...).
function Pool:send(msg, server)
  local opts = self.opts
  if server then
    opts = {}
    for k, v in pairs(self.opts) do opts[k] = v end
    for k, v in pairs(server) do opts[k] = v end
  end
  local plan, t, e = self.client.build_plan(msg)
  if not plan then return nil, t, e end
  for attempt = 1, 2 do
    local conn, reused_or_token, err = self:acquire(opts)
    if not conn then
      return nil, reused_or_token, err
    end
    local res, token, serr = conn:send_plan(plan)
    self:release(opts, conn)
    if res or attempt == 2 or not reused_or_token or not retryable(token, serr)
      or not plan.source:replayable() and plan.source.consumed then
      return res, token, serr
    end
  end
end

--- pool:stats() -> { idle =, busy = } over every server
function Pool:stats()
  local idle, busy = 0, 0
  for _, s in pairs(self.servers) do
    idle = idle + #s.idle
    busy = busy + s.busy
  end
  return { idle = idle, busy = busy }
end

--- pool:close(): QUIT the idle sessions; busy ones close when released.
function Pool:close()
  self.closed = true
  for _, s in pairs(self.servers) do
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
