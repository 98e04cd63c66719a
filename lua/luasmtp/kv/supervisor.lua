--- luasmtp.kv.supervisor: the store of `luasmtp serve --workers`, kept
-- by the supervisor's counter service (lua/luasmtp/supervisor.lua) and
-- reached by each worker over its channel (a UNIX socketpair), so that
-- connection slots and rate windows are exact across the workers.
--
--   local store = require("luasmtp.workers").store() -- in a worker
--
-- It has the methods of luasmtp.kv (acquire, release, hit, incr, get,
-- set, delete, on_error). Each call sends one request and waits for its
-- answer at most `timeout` seconds (default 2); release does not wait.
-- A failed channel makes every later call return nil, "closed": the
-- policy then follows on_error.
--
-- The protocol, one frame each way per request:
--   frame   = length (4 bytes, big-endian; 5 .. MAX_FRAME) payload
--   payload = id (4 bytes; 0: send no answer) count (1 byte, at most
--             MAX_FIELDS) then `count` fields of length (2 bytes) bytes
-- A request's fields are the operation and its arguments; an answer's
-- are a status ("ok", "false", "nil" or "err") and a value. Values keep
-- their type: "s" .. text or "n" .. number.
local core = require "luasmtp.core"

local M = {}

M.MAX_FRAME = 16384 -- payload bytes
M.MAX_FIELDS = 8
M.DEFAULT_TIMEOUT = 2

--- encode(id, fields) -> frame | nil, "limit", detail
function M.encode(id, fields)
  local n = #fields
  if n > M.MAX_FIELDS then return nil, "limit", "too many fields" end
  local parts = { string.pack(">I4B", id, n) }
  for i = 1, n do
    local f = fields[i]
    if #f > 0xffff then return nil, "limit", "field too long" end
    parts[i + 1] = string.pack(">s2", f)
  end
  local payload = table.concat(parts)
  if #payload > M.MAX_FRAME then
    return nil, "limit", ("frame of %d bytes (at most %d)"):format(#payload, M.MAX_FRAME)
  end
  return string.pack(">I4", #payload) .. payload
end

--- decode(payload) -> id, fields | nil, detail
function M.decode(payload)
  local size = #payload
  if size < 5 then return nil, "short frame" end
  local id, n, pos = string.unpack(">I4B", payload)
  if n > M.MAX_FIELDS then return nil, "too many fields" end
  local fields = {}
  for i = 1, n do
    if pos + 1 > size then return nil, "truncated field" end
    local len = string.unpack(">I2", payload, pos)
    if pos + 1 + len > size then return nil, "truncated field" end
    fields[i] = payload:sub(pos + 2, pos + 1 + len)
    pos = pos + 2 + len
  end
  if pos ~= size + 1 then return nil, "bytes after the last field" end
  return id, fields
end

--- read_frame(sock, body_timeout) -> payload | nil, err, detail
-- Waits for a frame's length as long as it takes (an idle channel is
-- normal), then for the rest at most body_timeout seconds. A length out
-- of bounds is "limit": the stream cannot be trusted after it.
function M.read_frame(sock, body_timeout)
  local head, err
  repeat
    head, err = sock:receive(4, 3600)
  until head or err ~= "timeout"
  if not head then return nil, err, "channel " .. err end
  local len = string.unpack(">I4", head)
  if len < 5 or len > M.MAX_FRAME then
    return nil, "limit", ("frame of %d bytes refused (at most %d)"):format(len, M.MAX_FRAME)
  end
  local payload, perr = sock:receive(len, body_timeout)
  if not payload then return nil, perr, "incomplete frame: " .. perr end
  return payload
end

--- value <-> field, keeping strings and numbers apart
function M.pack_value(v)
  if type(v) == "number" then
    return "n" .. (math.type(v) == "integer" and tostring(v) or ("%.17g"):format(v))
  end
  return "s" .. tostring(v)
end

function M.unpack_value(f)
  local tag, rest = f:sub(1, 1), f:sub(2)
  if tag == "n" then return math.tointeger(tonumber(rest)) or tonumber(rest) end
  if tag == "s" then return rest end
  return nil
end

---------------------------------------------------------------------------
-- The client store (in a worker)

local Store = {}
Store.__index = Store

-- The channel is gone: every waiter learns it, every later call fails.
local function fail(self, detail)
  if self.failed then return end
  self.failed = detail or "channel closed"
  for _, w in pairs(self.pending) do
    w.cond:close()
  end
  self.pending = {}
  self.sock:close()
end

local function reader(self)
  while not self.failed do
    local payload, err, detail = M.read_frame(self.sock, self.timeout)
    if not payload then
      fail(self, "counter service: " .. (detail or err))
      return
    end
    local id, fields = M.decode(payload)
    if not id then
      fail(self, "counter service: " .. tostring(fields))
      return
    end
    local w = self.pending[id]
    if w then -- else: an answer that came after its caller gave up
      self.pending[id] = nil
      w.fields = fields
      w.cond:signal()
    end
  end
end

-- One request: -> status, value | nil, err, detail
local function call(self, fields, no_answer)
  if self.failed then return nil, "closed", self.failed end
  local id = 0
  if not no_answer then
    id = self.next_id
    self.next_id = id % 0xfffffffe + 1
  end
  local frame, err, detail = M.encode(id, fields)
  if not frame then return nil, err, detail end
  if not self.reader then
    self.reader = core.spawn(reader, self)
  end
  local w = { cond = core.cond() }
  if not no_answer then self.pending[id] = w end
  local ok, serr = self.sock:send(frame)
  if not ok then
    fail(self, "counter service: send " .. tostring(serr))
    return nil, serr, self.failed
  end
  if no_answer then return "ok" end
  if not w.fields then
    local woke, werr = w.cond:wait(self.timeout)
    if not woke and not w.fields then
      self.pending[id] = nil
      if werr == "timeout" then
        return nil, "timeout", ("counter service: no answer in %g s"):format(self.timeout)
      end
      return nil, "closed", self.failed
    end
  end
  local status, value = w.fields[1], w.fields[2]
  if status == "err" then return nil, "protocol", "counter service: " .. tostring(value) end
  return status, value
end

local function num(n)
  return M.pack_value(assert(tonumber(n), "kv: number expected"))
end

function Store:acquire(key, limit)
  local status, err, detail = call(self, { "acquire", key, num(limit) })
  if not status then return nil, err, detail end
  return status == "ok"
end

function Store:release(key)
  local status, err, detail = call(self, { "release", key }, true)
  if not status then return nil, err, detail end
  return true
end

function Store:hit(key, limit, window)
  local status, err, detail = call(self, { "hit", key, num(limit), num(window) })
  if not status then return nil, err, detail end
  return status == "ok"
end

function Store:incr(key, by, ttl)
  local status, value, detail = call(self, { "incr", key, num(by or 1), ttl and num(ttl) or "" })
  if not status then return nil, value, detail end
  return M.unpack_value(value)
end

function Store:get(key)
  local status, value, detail = call(self, { "get", key })
  if not status then return nil, value, detail end
  if status == "nil" then return nil end
  return M.unpack_value(value)
end

function Store:set(key, value, ttl)
  assert(type(value) == "string" or type(value) == "number", "kv: value must be a string or a number")
  local status, err, detail = call(self, { "set", key, M.pack_value(value), ttl and num(ttl) or "" })
  if not status then return nil, err, detail end
  return true
end

function Store:delete(key)
  local status, err, detail = call(self, { "delete", key })
  if not status then return nil, err, detail end
  return true
end

--- store:request(op, ...) -> status, value | nil, err, detail: another
-- operation of the channel ("ready", "status").
function Store:request(...)
  return call(self, { ... })
end

--- store:request_no_answer(op, ...) -> "ok" | nil, err, detail
function Store:request_no_answer(...)
  return call(self, { ... }, true)
end

--- store:close(): stop using the channel.
function Store:close()
  fail(self, "closed")
end

--- new(sock [, opts]) -> store over a connected channel socket.
-- opts: timeout (seconds per call, default 2), on_error ("open").
function M.new(sock, opts)
  opts = opts or {}
  assert(opts.on_error == nil or opts.on_error == "open" or opts.on_error == "closed",
    "on_error must be \"open\" or \"closed\"")
  return setmetatable({
    sock = sock,
    pending = {},
    next_id = 1,
    timeout = opts.timeout or M.DEFAULT_TIMEOUT,
    on_error = opts.on_error or "open",
    kind = "supervisor",
  }, Store)
end

return M
