--- luasmtp.queue.route: where a recipient goes, and the delivery there.
--
-- A route is a table: { kind = "mx", tls_policy =, port =, ... } (the
-- default; delivery.deliver's options), { kind = "smarthost", host =,
-- port =, tls =, auth =, ... } (client.connect's options), { kind =
-- "lmtp", path = | host =, port = }, { kind = "maildir", dir = },
-- { kind = "discard" }, { kind = "reject", reply = "550 5.7.1 ..." }.
-- Optional shaping fields: max_connections, max_messages_per_connection,
-- rate (messages per second) for the destination.
--
-- MX routes reuse sessions: after a message the session is kept in the
-- queue's pool under a key of the recipient domain, the TLS policy and
-- the options the policy checks used (delivery.reuse_key); the next
-- message for that domain under that policy goes over it, until the
-- pool's max_messages or idle_timeout. reuse = false in the route turns
-- it off.
--
-- Each result says whether the next hop took the DSN parameters (dsn):
-- when it did, NOTIFY=SUCCESS is its job; when it did not, the queue
-- sends the "relayed" notice itself (RFC 3461 section 6.2).
local client = require "luasmtp.client"
local qstore = require "luasmtp.queue.store"

local M = {}

local function domain_of(address)
  return (address:match("@([^@]*)$") or ""):lower()
end
M.domain_of = domain_of

--- default(rcpt, entry) -> the MX route
function M.default()
  return { kind = "mx" }
end

--- destination(route, rcpt) -> the key of the destination's ready queue
function M.destination(route, rcpt)
  local k = route.kind
  if k == "mx" then return "mx:" .. domain_of(rcpt.address) end
  if k == "smarthost" then return ("smtp:%s:%s"):format(route.host or route.server or route.path, route.port or "") end
  if k == "lmtp" then return "lmtp:" .. (route.path or ((route.host or "") .. ":" .. (route.port or 24))) end
  if k == "maildir" then return "maildir:" .. route.dir end
  if k == "discard" or k == "reject" then return k end
  error("route: unknown kind " .. tostring(k))
end

local function status_of(text, ok)
  local enhanced = (text or ""):match("^%d%d%d[ -](%d%.%d+%.%d+)")
  if enhanced then return enhanced end
  local code = (text or ""):match("^(%d)%d%d")
  if code then return code .. ".0.0" end
  return ok and "2.0.0" or "4.0.0"
end
M.status_of = status_of

local function client_rcpts(rcpts)
  local to = {}
  for i, r in ipairs(rcpts) do
    to[i] = { address = r.address, notify = r.notify and r.notify:lower(), orcpt = r.orcpt }
  end
  return to
end

local function dsn_of(entry)
  if entry.ret or entry.envid then return { ret = entry.ret, envid = entry.envid } end
end

-- One result per recipient: { ok, permanent, reply, remote_mta, action }
-- and whether the destination itself failed (connection, 421, all 4xx).
local function from_client(rcpts, res, token, err, remote)
  local out = {}
  local dest_failed
  res = res or (err and err.result)
  if res and res.recipients then
    local all_temp = true
    for i, r in ipairs(res.recipients) do
      local text = r.reply and client.format_reply(r.reply) or tostring(r.error or err or "failed")
      out[i] = { ok = r.ok, permanent = not r.ok and r.permanent, reply = text, remote_mta = remote,
        dsn = res.dsn or false }
      if r.ok or r.permanent then all_temp = false end
    end
    dest_failed = all_temp and #res.recipients > 0
  else
    local text = err and (err.code and client.format_reply(err) or tostring(err)) or tostring(token)
    for i = 1, #rcpts do
      out[i] = { ok = false, permanent = err and err.permanent or false, reply = text, remote_mta = remote }
    end
    dest_failed = not (err and err.permanent)
  end
  return out, dest_failed
end

--- deliver(q, route, entry, rcpts) -> results, dest_failed
function M.deliver(q, route, entry, rcpts)
  local k = route.kind
  if k == "discard" then
    local out = {}
    for i = 1, #rcpts do out[i] = { ok = true, reply = "250 2.0.0 discarded", action = "delivered" } end
    return out, false
  elseif k == "reject" then
    local out = {}
    for i = 1, #rcpts do
      out[i] = { ok = false, permanent = true, reply = route.reply or "550 5.7.1 Delivery not authorized" }
    end
    return out, false
  elseif k == "maildir" then
    local store = require "luasmtp.store"
    local data = assert(qstore.read_body(entry))
    local path, reply = store.maildir(route.dir):deliver(data)
    local out = {}
    for i = 1, #rcpts do
      out[i] = path and { ok = true, reply = "250 2.0.0 " .. path, action = "delivered" }
        or { ok = false, permanent = false, reply = tostring(reply) }
    end
    return out, not path
  end
  local body = assert(qstore.open_body(entry))
  local _ <close> = io.type(body) == "file" and body or nil
  local msg = { from = entry.from, to = client_rcpts(rcpts), body = body, dsn = dsn_of(entry),
    smtputf8 = entry.smtputf8 or nil }
  if k == "mx" then
    local delivery = require "luasmtp.delivery"
    for key, v in pairs(route) do if key ~= "kind" and msg[key] == nil then msg[key] = v end end
    msg.helo = msg.helo or q.hostname
    -- the next message to this domain under this policy goes over the
    -- same session (delivery's reuse_key; route.reuse = false: never)
    if route.reuse ~= false then msg.sessions = q.pool end
    msg.max_messages_per_session = route.max_messages_per_connection
    msg.reuse, msg.rate, msg.max_connections, msg.max_messages_per_connection = nil, nil, nil, nil
    local res = delivery.deliver(msg)
    local out, all_temp = {}, #res.recipients > 0
    for i, r in ipairs(res.recipients) do
      out[i] = { ok = r.ok, permanent = not r.ok and r.permanent, reply = r.text or tostring(r.error),
        remote_mta = r.mx, dsn = r.dsn }
      if r.ok or r.permanent then all_temp = false end
    end
    return out, all_temp
  end
  local server = {}
  for key, v in pairs(route) do
    if key ~= "kind" and key ~= "rate" and key ~= "max_connections" and key ~= "max_messages_per_connection"
        and key ~= "reuse" then
      server[key] = v
    end
  end
  server.max_messages = route.max_messages_per_connection
  server.lmtp = k == "lmtp" or nil
  server.helo = server.helo or q.hostname
  if server.path and not server.tls then server.tls = "none" end
  local res, token, err = q.pool:send(msg, server)
  local out, failed = from_client(rcpts, res, token, err, route.host or route.path)
  if k == "lmtp" then
    for _, r in ipairs(out) do if r.ok then r.action = "delivered" end end
  end
  return out, failed
end

return M
