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
-- luasmtp.core.errors. Options: M.schema below; limits: src/redis.c
-- and the README ("Redis").
local core = require "luasmtp.core"
local options = require "luasmtp.options"

local M = {}

-- The defaults here are the ones src/redis.c applies; the README table
-- is generated from this schema.
M.schema = options.schema("redis.connect", {
  { "host", "string", "127.0.0.1", "the server: an address, or a name resolved once, when connecting" },
  { "port", "integer", 6379, "its TCP port" },
  { "path", "string", nil, "a UNIX socket instead of host and port" },
  { "username", "string", nil, "`AUTH username password` (Redis 6 ACLs); needs password" },
  { "password", "string", nil, "`AUTH password`, sent first on every connection" },
  { "db", "integer", 0, "`SELECT db` after AUTH" },
  { "timeout", "number", 1.0, "seconds each command may take" },
  { "connect_timeout", "number", nil, "seconds to make the connection (nil: timeout)" },
  { "backoff_min", "number", 0.1, "seconds before the first attempt to connect again" },
  { "backoff_max", "number", 5.0, "the longest wait between attempts (the wait doubles up to it)" },
  { "max_reply", "integer", 8 * 1024 * 1024, "bytes of one reply, all its elements together" },
  { "max_command", "integer", 8 * 1024 * 1024, "bytes of one command's arguments" },
  { "max_pending", "integer", 10000, "commands waiting on the connection; more: nil, \"limit\"" },
  { "tls", "boolean", false, "not supported: hiredis 0.14 (Debian 12) has no TLS; true raises" },
})

local function numeric(host)
  return host:match("^%d+%.%d+%.%d+%.%d+$") ~= nil or host:find(":", 1, true) ~= nil
end

--- connect(opts) -> client | nil, token, detail
-- A host name is resolved here (this waits); the client keeps the
-- address. Unknown options and wrong types raise.
function M.connect(opts)
  opts = M.schema:apply(opts, 2)
  if opts.path then
    opts.host = nil
  elseif not numeric(opts.host) then
    local addrs, err, detail = core.resolve(opts.host)
    if not addrs or not addrs[1] then
      return nil, err or "dns", detail or ("no address for " .. opts.host)
    end
    opts.host = addrs[1].address
  end
  return core.redis_connect(opts)
end

return M
