--- luasmtp.net: connecting, listening and serving over TCP and
-- UNIX-domain sockets (and TLS).
--
-- The socket primitives live in the C core; this module adds what is
-- policy rather than mechanism: address parsing, name resolution with one
-- deadline for the whole connect, and an accept loop that runs one task
-- per connection.
local core = require "luasmtp.core"
local options = require "luasmtp.options"
local workers = require "luasmtp.workers"

local M = {}

local DEFAULT_CONNECT_TIMEOUT = 30

-- Sockets opened by a task, for a server session whose plugin calls
-- must not leave sockets behind: task -> list that connect() appends to.
local trackers = setmetatable({}, { __mode = "k" })

--- track(list) -> previous list: sockets that connect() opens in the
-- current task are appended to list (nil: stop tracking).
function M.track(list)
  local task = core.current() or trackers -- the main chunk has no task
  local previous = trackers[task]
  trackers[task] = list
  return previous
end

--- Split "host:port", "[v6]:port" or "host" into host, port.
-- Returns nil, "invalid", detail for malformed input.
function M.parse_address(spec, default_port)
  if type(spec) ~= "string" or spec == "" then
    return nil, "invalid", "address must be a non-empty string"
  end
  local host, port
  if spec:sub(1, 1) == "[" then
    host, port = spec:match("^%[([%x:%.]+)%]:?(%d*)$")
    if not host then
      return nil, "invalid", "bad IPv6 address literal: " .. spec
    end
  elseif select(2, spec:gsub(":", "")) > 1 then
    host, port = spec, "" -- bare IPv6 address without a port
  else
    host, port = spec:match("^([^:]+):?(%d*)$")
    if not host then
      return nil, "invalid", "bad address: " .. spec
    end
  end
  port = tonumber(port) or default_port
  if not port or port < 0 or port > 65535 or port ~= math.floor(port) then
    return nil, "invalid", "bad or missing port in " .. spec
  end
  return host, port
end

--- format_address(address [, port]) -> "192.0.2.1:25", "[2001:db8::1]:25",
-- "unix:/path" (no port): an address as getpeername/getsockname give it,
-- for logs and messages.
function M.format_address(address, port)
  if not port then return address end
  if address:find(":", 1, true) then return ("[%s]:%d"):format(address, port) end
  return ("%s:%d"):format(address, port)
end

local function is_numeric(host)
  return host:match("^%d+%.%d+%.%d+%.%d+$") ~= nil or host:find(":", 1, true) ~= nil
end

--- Resolve host into a list of numeric addresses (numeric hosts as is).
local function addresses_of(host, family, timeout)
  if is_numeric(host) then
    return { host }
  end
  local list, err, detail = core.resolve(host, { family = family, timeout = timeout })
  if not list then
    return nil, err, detail
  end
  local out = {}
  for i, a in ipairs(list) do
    out[i] = a.address
  end
  if #out == 0 then
    return nil, "dns", host .. ": no address"
  end
  return out
end

-- With opts.tls, the TLS handshake right after connect, within the
-- connect deadline. -> sock | nil, err, detail
local function implicit_tls(sock, opts, servername, deadline)
  local tracked = trackers[core.current() or trackers]
  if tracked then tracked[#tracked + 1] = sock end
  if opts.tls then
    local ok, terr, tdetail = sock:starttls(opts.tls, {
      servername = servername,
      verify_host = opts.verify_host,
      timeout = math.max(deadline - core.update_now(), 0.001),
      dane = opts.dane,
    })
    if not ok then
      return nil, terr, tdetail
    end
  end
  return sock
end

--- connect(host, port [, opts]) -> socket | nil, err, detail
-- host: a name (resolved asynchronously, IPv6 and IPv4) or a numeric
-- address. opts:
--   timeout      seconds for the whole connect, DNS included (30)
--   family       "inet" or "inet6" to use only one family
--   bind         local numeric address
--   tls          a client TLS context: implicit TLS right after connect
--   servername   name for SNI and certificate check (default: host)
--   verify_host  check the certificate's name (default true)
--   dane         { base_domain, tlsa, names }: authenticate the implicit
--                TLS by TLSA records (see sock:starttls)
function M.connect(host, port, opts)
  assert(type(host) == "string", "host must be a string")
  assert(math.type(port) == "integer", "port must be an integer")
  opts = opts or {}
  local timeout = opts.timeout or DEFAULT_CONNECT_TIMEOUT
  local deadline = core.update_now() + timeout
  local bare = host:match("^%[(.*)%]$") or host
  local addrs, err, detail = addresses_of(bare, opts.family, timeout)
  if not addrs then
    return nil, err, detail
  end
  local sock
  for i, addr in ipairs(addrs) do
    local remaining = deadline - core.update_now()
    if remaining <= 0 then
      return nil, "timeout", "connect timed out"
    end
    -- Share the time left among the addresses still to try, so one
    -- black-holed address does not eat the whole budget.
    local share = remaining / (#addrs - i + 1)
    sock, err, detail = core.connect(addr, port, { timeout = share, bind = opts.bind })
    if sock then
      break
    end
  end
  if not sock then
    return nil, err, detail
  end
  -- with DANE, SNI defaults to the TLSA base domain
  return implicit_tls(sock, opts, opts.servername or (not opts.dane and bare or nil), deadline)
end

--- connect_unix(path [, opts]) -> socket | nil, err, detail
-- A UNIX-domain stream socket. opts: timeout (30), tls (a client
-- context: implicit TLS right after connect; then servername is needed
-- to verify the name), servername, verify_host.
function M.connect_unix(path, opts)
  assert(type(path) == "string", "path must be a string")
  opts = opts or {}
  local timeout = opts.timeout or DEFAULT_CONNECT_TIMEOUT
  local deadline = core.update_now() + timeout
  local sock, err, detail = core.connect_unix(path, { timeout = timeout })
  if not sock then
    return nil, err, detail
  end
  return implicit_tls(sock, opts, opts.servername, deadline)
end

--- The path of a UNIX-domain listen spec: "unix:/path", or a table
-- { address = "unix:/path", mode =, owner =, group = }; nil otherwise.
local function unix_spec(s)
  local addr = type(s) == "table" and s.address or s
  return type(addr) == "string" and addr:match("^unix:(.+)$") or nil
end

-- A socket file mode: an integer, or octal digits in a string ("0660").
local function file_mode(mode)
  if mode == nil or math.type(mode) == "integer" then return mode end
  local m = type(mode) == "string" and mode:match("^[0-7]+$") and tonumber(mode, 8)
  assert(m, "mode must be an integer or octal digits such as \"0660\"")
  return m
end

--- listen(spec [, opts]) -> {listener...} | nil, err, detail
-- spec: "addr:port", "[::1]:port", "localhost:port" (every address the
-- name has), "unix:/path", a table { address = one of those } (for a
-- UNIX socket with mode = "0660", owner = "user", group = "group": the
-- socket file is made 0600 and then given that mode and owner, and
-- removed when the listener closes; a stale socket file left by a
-- process that is gone is replaced), or a list of those. Port 0 picks a
-- free port. In a worker of `serve --workers` a spec the supervisor bound
-- (`serve --listen`, the same text or address) takes that socket; another
-- TCP spec is bound by each worker with SO_REUSEPORT.
function M.listen(spec, opts)
  local specs = (type(spec) == "table" and not spec.address) and spec or { spec }
  local listeners = {}
  local function append_all(list)
    for _, l in ipairs(list) do listeners[#listeners + 1] = l end
    return true
  end
  -- the listeners of one spec, appended to listeners
  local function listen_one(s)
    local path = unix_spec(s)
    -- In a worker of `serve --workers`: the socket the supervisor bound
    local inherited = path and workers.inherited("unix:" .. path)
    if inherited then return append_all(inherited) end
    if path and workers.worker() then
      return nil, "invalid", "unix:" .. path .. ": under serve --workers, give it to serve --listen"
    end
    if path then
      local t = type(s) == "table" and s or {}
      local l, err, detail = core.listen_unix(path, { backlog = opts and opts.backlog,
        mode = file_mode(t.mode), owner = t.owner, group = t.group })
      if not l then return nil, err, detail end
      listeners[#listeners + 1] = l
      return true
    end
    local text = type(s) == "table" and s.address or s
    local host, port = M.parse_address(text)
    if not host then
      return nil, port, select(3, M.parse_address(text))
    end
    inherited = workers.inherited(text, host, port)
    if inherited then return append_all(inherited) end
    local lopts = opts
    if workers.worker() then
      -- not bound by the supervisor: each worker binds its own socket
      -- on the port (SO_REUSEPORT); port 0 would give each its own port
      if port == 0 then
        return nil, "invalid", text .. ": port 0 under serve --workers: give the address to serve --listen"
      end
      lopts = { backlog = opts and opts.backlog, reuseport = true }
    end
    local addrs, err, detail = addresses_of(host, nil, 10)
    if not addrs then
      return nil, err, detail
    end
    for _, addr in ipairs(addrs) do
      local l
      l, err, detail = core.listen(addr, port, lopts)
      if not l then
        return nil, err, (detail or "") .. " (" .. text .. ")"
      end
      listeners[#listeners + 1] = l
    end
    return true
  end
  for _, s in ipairs(specs) do
    local ok, err, detail = listen_one(s)
    if not ok then
      for _, l in ipairs(listeners) do
        l:close()
      end
      return nil, err, detail
    end
  end
  return listeners
end

local Server = {}
Server.__index = Server

--- server:close(): stop accepting. Connections in progress go on.
function Server:close()
  for _, l in ipairs(self.listeners) do
    l:close()
  end
  self.closed = true
end

--- server:connections() -> number of connections being handled.
function Server:connections()
  return self.slots.active
end

--- serve(opts) -> server | nil, err, detail
-- Accept connections and run handler(sock, conn) in a new task for each.
-- opts:
--   listen           spec or list of specs (see listen)
--   handler          function(sock, conn); conn = {peer_address=, peer_port=,
--                    local_address=, local_port=, id=}; the socket is closed
--                    when the handler returns or raises. Over a UNIX-domain
--                    socket the addresses are "unix:PATH" ("unix:" for the
--                    usual unnamed peer), the ports nil, and
--                    conn.peer_credentials = {pid=, uid=, gid=}
--   tls              server TLS context: implicit TLS before the handler
--   tls_timeout      seconds for that handshake (10)
--   max_connections  connections handled at once; more are closed at
--                    once (default 1000). A connection counts from the
--                    moment it is accepted.
--   slots            table { active = 0 } to share the count (and so
--                    max_connections) between several servers
--   on_refused       function(conn, reason, sock) called for refused connections
--                    (sock, when given, is closed right after; send() on it
--                    queues a last reply)
-- server.addresses lists {address, port} of each listener (for a UNIX
-- socket: "unix:PATH" and no port).
M.serve_schema = options.schema("serve", {
  { "listen", "string|table", "127.0.0.1:0", "spec or list of specs (see listen)" },
  { "handler", "function", nil, "`function(sock, conn)`, in a new task per connection" },
  { "tls", "userdata", nil, "server TLS context: implicit TLS before the handler" },
  { "tls_timeout", "number", 10, "seconds for that handshake" },
  { "max_connections", "integer", 1000,
    "connections handled at once, counted from the moment each is accepted; more are closed at once" },
  { "slots", "table", nil, "`{ active = 0 }` shared by several servers that share one `max_connections`" },
  { "on_refused", "function", nil, "`function(conn, reason, sock)` for refused connections" },
  { "backlog", "integer", nil, "listen(2) backlog" },
})

function M.serve(opts)
  assert(type(opts) == "table", "serve needs an options table")
  opts = M.serve_schema:apply(opts, 2)
  assert(type(opts.handler) == "function", "serve needs a handler function")
  local listeners, err, detail = M.listen(opts.listen, { backlog = opts.backlog })
  if not listeners then
    return nil, err, detail
  end
  local server = setmetatable({
    listeners = listeners,
    addresses = {},
    slots = opts.slots or { active = 0 },
    accepted = 0,
    max_connections = opts.max_connections,
  }, Server)
  for i, l in ipairs(listeners) do
    local addr, port = l:getsockname()
    server.addresses[i] = { address = addr, port = port }
  end

  local function serve_one(sock, conn)
    if opts.tls then
      local ok, terr, tdetail = sock:starttls(opts.tls, { timeout = opts.tls_timeout })
      if not ok then
        if opts.on_refused then
          opts.on_refused(conn, terr .. ": " .. tostring(tdetail))
        end
        return
      end
    end
    opts.handler(sock, conn)
  end

  local slots = server.slots
  local function handle(sock, conn)
    local ok, failure = xpcall(serve_one, debug.traceback, sock, conn)
    slots.active = slots.active - 1
    sock:close()
    if not ok then
      error(failure, 0) -- reported by the task error handler, traceback included
    end
  end

  local function accept_loop(l)
    while true do
      local sock, aerr = l:accept()
      if sock then
        server.accepted = server.accepted + 1
        local paddr, pport = sock:getpeername()
        local laddr, lport = sock:getsockname()
        local conn = {
          id = server.accepted,
          peer_address = paddr,
          peer_port = pport,
          local_address = laddr,
          local_port = lport,
        }
        if not lport then -- a UNIX-domain socket: who connected
          conn.peer_credentials = sock:peercred()
        end
        -- Count at accept time: a burst is accepted in one go, before
        -- any of its tasks has run.
        if slots.active >= server.max_connections then
          if opts.on_refused then
            -- the callback may queue a last word; it must not wait
            opts.on_refused(conn, "too many connections", sock)
          end
          sock:close()
        else
          slots.active = slots.active + 1
          core.spawn(handle, sock, conn)
        end
      elseif aerr == "closed" then
        return
      else
        -- Out of descriptors or a transient failure: pause, retry.
        core.sleep(0.1)
      end
    end
  end

  for _, l in ipairs(listeners) do
    core.spawn(accept_loop, l)
  end
  return server
end

return M
