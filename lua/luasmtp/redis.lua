--- A Redis client on the loop (src/redis.c: hiredis's async API).
--
--   local redis = require "luasmtp.redis"
--   local r = redis.connect{ host = "127.0.0.1", port = 6379, password = "...", db = 0,
--                            timeout = 1 }
--   local ok, err = r:command("SET", "k", "v")     -- from a task or the main chunk
--   local v = r:command("GET", "k")
--   r:close()
--
-- One client is one connection, shared by every task that uses it: the
-- commands of many tasks are pipelined on it. It is made in the
-- background and made again, after a backoff, when it fails. Replies:
-- a status or bulk string -> string, an integer -> integer, an array ->
-- table (field n: the length; nil elements as false, error elements as
-- {err = text}), a nil -> nil. A Redis error reply -> nil, text ("ERR
-- ...", "WRONGTYPE ..."); a failure (no connection, timeout, closed,
-- reply over max_reply) -> nil, token, detail with token from
-- luasmtp.core.errors. Options and limits: see src/redis.c and the
-- README ("Redis").
local core = require "luasmtp.core"

local M = {}

local function numeric(host)
  return host:match("^%d+%.%d+%.%d+%.%d+$") ~= nil or host:find(":", 1, true) ~= nil
end

--- connect(opts) -> client | nil, token, detail
-- host may be a name: it is resolved once, here (this waits; the client
-- keeps the address). Everything else as core.redis_connect.
function M.connect(opts)
  assert(type(opts) == "table", "redis.connect: options table expected")
  local host = opts.host
  if host ~= nil and opts.path == nil and not numeric(host) then
    local addrs, err, detail = core.resolve(host)
    if not addrs or not addrs[1] then return nil, err or "dns", detail or ("no address for " .. host) end
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.host = addrs[1].address
    opts = o
  end
  return core.redis_connect(opts)
end

return M
