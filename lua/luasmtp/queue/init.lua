--- luasmtp.queue: a durable mail queue with a scheduler and routes.
--
--   local q = assert(queue.open { dir = "/var/spool/luasmtp", route = fn })
--   local id = assert(q:enqueue { from = "a@example.org",
--     rcpt = { { address = "b@example.net", notify = "FAILURE", orcpt = "rfc822;b@example.net" } },
--     body = message })                  -- durable when this returns
--   q:start()                            -- the scheduler task
--
-- See the README section "Queue" for the guarantees, the retry table and
-- the routes; store.lua for the files, scheduler.lua for the scheduling.
local core = require "luasmtp.core"
local store = require "luasmtp.queue.store"
local scheduler = require "luasmtp.queue.scheduler"
local route_mod = require "luasmtp.queue.route"

local M = {}

M.store, M.scheduler, M.route = store, scheduler, route_mod

--- The options, their defaults (the README's table restates them).
M.DEFAULTS = {
  dir = false,                         -- the queue directory (required)
  route = false,                       -- function(rcpt, entry) -> route; default: MX
  retry = { 300, 600, 1200, 2400, 4000 }, -- seconds before attempt n+1; the last repeats
  jitter = 0.1,                        -- each wait is scaled by a random factor in [1-j, 1+j]
  lifetime = 5 * 86400,                -- then a recipient still failing bounces
  delay_warning = false,               -- seconds after arrival: a "delayed" notice (off)
  max_connections = 32,                -- concurrent deliveries, all destinations
  max_connections_per_destination = 4,
  max_messages_per_connection = 100,
  connection_idle_timeout = 5,         -- seconds a session waits for the next message, then QUIT
  max_hops = 50,                       -- more Received fields: a mail loop, bounced (5.4.6)
  tick = 1,                            -- seconds between scans (control notices, due retries)
  hostname = false,                    -- HELO name and DSN Reporting-MTA (default: gethostname)
  on_notice = false,                   -- function(entry, recipients) instead of the DSN module
  pool = false,                        -- a client pool (default: client.pool with the limits above)
  log = false,                         -- function(level, message)
}

local Queue = {}
Queue.__index = Queue

local function merge(opts)
  local o = {}
  for k, v in pairs(M.DEFAULTS) do o[k] = v end
  for k, v in pairs(opts) do
    if M.DEFAULTS[k] == nil then error("queue.open: unknown option " .. tostring(k), 3) end
    o[k] = v
  end
  assert(type(o.dir) == "string", "queue.open needs dir")
  assert(type(o.retry) == "table" and #o.retry > 0, "queue.open: retry must be a list of seconds")
  return o
end

--- open(opts) -> queue | nil, token, detail
-- Creates the directories, takes the directory's lock, removes
-- half-written entries and rebuilds every entry's state from its files.
-- One process owns a directory: while one holds DIR/lock (an flock),
-- open fails with token "busy". `luasmtp queue` takes no lock: it only
-- reads the files, appends to state logs and leaves notices.
function M.open(opts)
  local o = merge(opts)
  local p, token, detail = store.init(o.dir)
  if not p then return nil, token, detail end
  local lock
  lock, token, detail = core.lock_file(p.dir .. "/lock")
  if not lock then
    if token == "busy" then
      detail = ("queue directory %s is in use by another queue (%s)"):format(o.dir, detail)
    end
    return nil, token, detail
  end
  local q = setmetatable({ opts = o, paths = p, entries = {}, incoming = {}, dests = {}, shaping = {}, active = 0,
    lock = lock,
    hostname = o.hostname or core.gethostname() or "localhost", wake = core.cond() }, Queue)
  for _, e in ipairs(store.scan(p, true)) do
    q.entries[e.id] = e
  end
  for _, name in ipairs(core.listdir(p.control) or {}) do os.remove(p.control .. "/" .. name) end
  if o.pool then
    q.pool = o.pool
  else
    local client = require "luasmtp.client"
    q.pool = client.pool { max_connections = o.max_connections_per_destination,
      max_messages = o.max_messages_per_connection, idle_timeout = o.connection_idle_timeout }
  end
  return q
end

function Queue:log(level, fmt, ...)
  local msg = select("#", ...) > 0 and fmt:format(...) or fmt
  if self.opts.log then return self.opts.log(level, msg) end
  if level ~= "debug" and level ~= "info" then io.stderr:write("queue: " .. msg .. "\n") end
end

--- q:enqueue{ from, rcpt = { {address, notify, orcpt} | address, ... },
-- ret, envid, smtputf8, body, received_at } -> id | nil, token, detail, kind
-- Returns once the entry is durable (see store.lua); kind "full" when
-- the disk is full (answer 452 4.3.1).
function Queue:enqueue(m)
  assert(type(m.from) == "string", "enqueue: from must be a string")
  assert(type(m.rcpt) == "table" and #m.rcpt > 0, "enqueue: rcpt must be a non-empty list")
  local rcpt = {}
  for i, r in ipairs(m.rcpt) do
    if type(r) == "string" then r = { address = r } end
    assert(type(r.address) == "string", "enqueue: a recipient needs an address")
    local notify, orcpt = r.notify, r.orcpt
    if type(notify) == "table" and #notify == 0 then -- the server's set { success = true, ... }
      local list = {}
      for _, k in ipairs { "never", "success", "failure", "delay" } do
        if notify[k] then list[#list + 1] = k end
      end
      notify = list
    end
    if type(notify) == "table" then notify = table.concat(notify, ",") end
    if type(orcpt) == "table" then orcpt = (orcpt.type or "rfc822") .. ";" .. (orcpt.addr or "") end
    rcpt[i] = { address = r.address, notify = notify and notify:upper(), orcpt = orcpt }
  end
  local e = { id = store.new_id(), from = m.from, rcpt = rcpt, ret = m.ret and m.ret:lower(), envid = m.envid,
    smtputf8 = m.smtputf8, received_at = m.received_at or core.time() }
  while self.entries[e.id] do -- 64 random bits: for form's sake
    e.id = store.new_id()
  end
  -- a server message's header view counts its Received fields now (an
  -- empty view, a header block too long for it: read when scheduled)
  local header = type(m.body) == "table" and m.body.header
  if header and header.count and header:count() > 0 then e.hops = #header:get_all("Received") end
  local ok, token, detail, kind = store.write_entry(self.paths, e, m.body)
  if not ok then
    self:log("warning", "enqueue failed: %s", tostring(detail))
    return nil, token, detail, kind
  end
  for _, r in ipairs(e.rcpt) do
    r.state, r.attempts, r.next_attempt = "pending", 0, e.received_at
  end
  store.crash_point("after_enqueue")
  self.entries[e.id] = e
  self.incoming[#self.incoming + 1] = e
  self:log("info", "%s: queued from=<%s> rcpt=%d size=%d", e.id, e.from, #e.rcpt, e.size)
  self.wake:signal()
  return e.id
end

--- q:route(rcpt, entry) -> route (the configured function, else MX)
function Queue:route(rcpt, entry)
  local fn = self.opts.route
  local r = fn and fn(rcpt, entry) or route_mod.default(rcpt, entry)
  if type(r) == "string" then r = { kind = r } end
  return r
end

--- q:shape(destination, { max_connections =, rate = }): traffic shaping
-- for a destination key ("mx:example.net", "smtp:host:587", ...).
function Queue:shape(key, limits)
  self.shaping[key] = limits
  self.full_pass = true
  self.wake:signal()
end

local function write(q, e, text)
  e.logged = true
  local ok, _, detail = store.append(q.paths, e.id, text)
  if not ok then q:log("error", "%s: state not written: %s", e.id, tostring(detail)) end
  return ok
end

local function read_original(e)
  return store.read_body(e) or ""
end

--- q:notice(entry, recipients) -> true | nil: a DSN to the sender for
-- these recipients (action "failed", "delayed", "delivered"...), made by
-- luasmtp.queue.dsn when present (else the on_notice hook) and queued.
-- Never one for a message from the null sender.
function Queue:notice(e, list)
  if e.from == "" or #list == 0 then return true end
  if self.opts.on_notice then return self.opts.on_notice(e, list) ~= false end
  if not package.searchpath("luasmtp.queue.dsn", package.path) then
    self:log("warning", "%s: no DSN module; notice for %d recipient(s) not sent", e.id, #list)
    return true
  end
  local dsn = require "luasmtp.queue.dsn"
  local send = {}
  for _, r in ipairs(list) do
    if dsn.should_notify(r, r.action) then send[#send + 1] = r end
  end
  if #send == 0 then return true end
  local n = dsn.build { original = read_original(e), envelope = e, recipients = send,
    reporting_mta = self.hostname, ret = e.ret, envid = e.envid, smtputf8 = e.smtputf8 }
  return self:enqueue { from = n.from or "", rcpt = { { address = n.to[1], notify = "NEVER" } }, body = n.message }
end

local function final(q, e, i, r, action, reply, remote, now)
  r.state, r.action, r.last_reply, r.remote_mta = "done", action, reply, remote
  return write(q, e, store.log_line("final", now, i, action, route_mod.status_of(reply), reply, remote))
end

local function maybe_done(q, e)
  for _, r in ipairs(e.rcpt) do
    if r.state ~= "done" then return end
  end
  if (e.inflight or 0) == 0 then
    store.remove_entry(q.paths, e)
    q.entries[e.id] = nil
    q:log("info", "%s: done, removed", e.id)
  end
end

-- The stored ORCPT is "type;address" decoded (as the client takes it);
-- the notice gets it as a table, so nothing in the address is read as
-- xtext ("+" is an address character here).
local function orcpt_of(value)
  local t, addr = (value or ""):match("^([%w%-]+);(.*)$")
  return t and { type = t, addr = addr } or nil
end

local function notice_rcpt(e, r, action, reply, remote, now, retry_until)
  return { address = r.address, orcpt = orcpt_of(r.orcpt), notify = r.notify, action = action,
    status = route_mod.status_of(reply, action == "delivered" or action == "relayed"),
    remote_mta = remote, diagnostic = reply, last_attempt = now, will_retry_until = retry_until,
    arrival = e.received_at }
end

--- q:attempt(job, dest): deliver one job and record each recipient.
function Queue:attempt(job, d)
  local e, route = job.entry, job.route
  local rcpts = {}
  for k, i in ipairs(job.idxs) do rcpts[k] = e.rcpt[i] end
  store.crash_point("before_attempt")
  local ok, results, dest_failed = pcall(route_mod.deliver, self, route, e, rcpts)
  if not ok then
    self:log("error", "%s: delivery to %s raised: %s", e.id, d.key, tostring(results))
    local out = {}
    for k = 1, #rcpts do out[k] = { ok = false, reply = "451 4.3.0 " .. tostring(results) } end
    results, dest_failed = out, true
  end
  store.crash_point("after_remote_reply")
  local now = core.time()
  local lines, notices, finals = {}, {}, {}
  for k, i in ipairs(job.idxs) do
    local r, res = e.rcpt[i], results[k] or { ok = false, reply = "451 4.3.0 no result" }
    r.attempts = r.attempts + 1
    r.last_attempt, r.last_reply, r.remote_mta = now, res.reply, res.remote_mta
    if res.ok then
      r.state, r.action = "done", res.action or "relayed"
      lines[#lines + 1] = table.pack("attempt", now, i, "ok", now, res.reply, res.remote_mta, r.action)
      -- NOTIFY=SUCCESS: "delivered" from a final delivery; "relayed" when
      -- the next hop did not take the DSN parameters (else it is its job)
      if (r.action == "delivered" or (r.action == "relayed" and not res.dsn))
          and r.notify and r.notify:find("SUCCESS", 1, true) then
        notices[#notices + 1] = notice_rcpt(e, r, r.action, res.reply, res.remote_mta, now)
      end
      self:log("info", "%s: to=<%s> via %s: %s", e.id, r.address, d.key, tostring(res.reply))
    elseif res.permanent or now - e.received_at >= self.opts.lifetime then
      finals[#finals + 1] = { i = i, r = r, reply = res.reply, remote = res.remote_mta }
      notices[#notices + 1] = notice_rcpt(e, r, "failed", res.reply, res.remote_mta, now)
      self:log("info", "%s: to=<%s> failed: %s", e.id, r.address, tostring(res.reply))
    else
      r.next_attempt = now + scheduler.backoff(self.opts, r.attempts)
      lines[#lines + 1] = table.pack("attempt", now, i, "temp", r.next_attempt, res.reply, res.remote_mta)
      local dw = self.opts.delay_warning
      if dw and not r.warned and now - e.received_at >= dw then
        r.warned = true
        notices[#notices + 1] = notice_rcpt(e, r, "delayed", res.reply, res.remote_mta, now,
          e.received_at + self.opts.lifetime)
        lines[#lines + 1] = table.pack("warned", now, i)
      end
      self:log("info", "%s: to=<%s> deferred until +%ds: %s", e.id, r.address,
        math.floor(r.next_attempt - now), tostring(res.reply))
    end
  end
  -- An attempt that finishes the entry is recorded by its removal (the
  -- envelope's unlink, made durable by maybe_done): its state lines
  -- would be removed with it, so they are not even made.
  local finished = #notices == 0 and #finals == 0 and e.inflight == #job.idxs
  for _, r in ipairs(e.rcpt) do
    if r.state ~= "done" then finished = false end
  end
  if #lines > 0 and not finished then
    for k, l in ipairs(lines) do lines[k] = store.log_line(table.unpack(l, 1, l.n)) end
    write(self, e, table.concat(lines))
  end
  -- the notice is queued before the failure is recorded: a crash in
  -- between sends it twice, never not at all
  self:notice(e, notices)
  for _, f in ipairs(finals) do final(self, e, f.i, f.r, "failed", f.reply, f.remote, now) end
  scheduler.after(self, d, dest_failed)
  for _, i in ipairs(job.idxs) do e.rcpt[i].inflight = nil end
  e.inflight = e.inflight - #job.idxs
  maybe_done(self, e)
  -- an entry that waits for a retry leaves its segment
  if self.entries[e.id] == e and e.inflight == 0 then self:migrate(e) end
end

--- q:migrate(entry): an entry in a segment gets files of its own (see
-- store.lua); on failure it stays where it is.
function Queue:migrate(e)
  if not e.segment then return true end
  local ok, _, detail = store.migrate(self.paths, e)
  if not ok then self:log("warning", "%s: not moved out of its segment: %s", e.id, tostring(detail)) end
  return ok
end

--- q:bounce_now(entry, now [, reply]): every pending recipient fails
-- (the tool's bounce; reply: why, else each one's last reply).
function Queue:bounce_now(e, now, why)
  e.bounce = nil
  local notices, idx = {}, {}
  for i, r in ipairs(e.rcpt) do
    if r.state == "pending" then
      local reply = why or r.last_reply or "550 5.0.0 Returned by the postmaster"
      notices[#notices + 1] = notice_rcpt(e, r, "failed", reply, not why and r.remote_mta or nil, now)
      idx[#idx + 1] = i
    end
  end
  self:notice(e, notices)
  for _, i in ipairs(idx) do
    final(self, e, i, e.rcpt[i], "failed", why or e.rcpt[i].last_reply or "550 5.0.0 Returned by the postmaster",
      not why and e.rcpt[i].remote_mta or nil, now)
  end
  maybe_done(self, e)
end

--- q:read_control(): apply the notices `luasmtp queue` left (the log of
-- each named entry is read again; "flush" makes everything due).
function Queue:read_control()
  local c = self.paths.control
  for _, name in ipairs(core.listdir(c) or {}) do
    os.remove(c .. "/" .. name)
    local what = store.dec(name)
    local dest = what:match("^flush%.(.+)$")
    if what == "flush" or dest then
      self:flush(dest)
    elseif what:match("^%w+$") then
      local e = self.entries[what]
      local fresh = e and store.flags(self.paths, what) or store.load(self.paths, what)
      if fresh and e then
        e.held, e.deleted, e.bounce = fresh.held, fresh.deleted, fresh.bounce
        if fresh.flush then e.flush = true end
        if fresh.logged then e.logged = true end
        if e.held and (e.inflight or 0) == 0 then self:migrate(e) end
      elseif fresh then
        self.entries[what] = fresh
      end
    end
  end
end

--- q:flush([destination]): every deferred recipient (for that
-- destination key or domain) is due now; its backoff is lifted.
function Queue:flush(dest)
  for key, d in pairs(self.dests) do
    if not dest or key == dest or key == "mx:" .. dest then d.backoff_until, d.failures = 0, 0 end
  end
  for _, e in pairs(self.entries) do
    for _, r in ipairs(e.rcpt) do
      if r.state == "pending" and (not dest or route_mod.destination(self:route(r, e), r) == dest
          or route_mod.domain_of(r.address) == dest) then
        r.next_attempt = 0
      end
    end
  end
  self.full_pass = true
  self.wake:signal()
end

--- q:start(): the scheduler task. q:stop() ends it (deliveries in
-- flight finish) and closes the pool's sessions; the queue still owns
-- its directory (a server draining its sessions may still enqueue).
-- q:close() does the same and gives up the directory's lock.
function Queue:start()
  if self.task then return self.task end
  self.stopping = false
  self.task = core.spawn(scheduler.run, self)
  return self.task
end

function Queue:stop()
  self.stopping = true
  self.wake:signal()
  if self.task then self.task:join(60) end
  self.task = nil
  local deadline = core.update_now() + 60
  while self.active > 0 and core.update_now() < deadline do core.sleep(0.05) end
  self.pool:close()
  store.settle(self.paths) -- the last entries' ends are on disk
end

function Queue:close()
  self:stop()
  store.close(self.paths)
  self.lock:close()
end

--- q:stats() -> { messages, recipients, oldest, held, destinations = { key = recipients } }
function Queue:stats()
  return M.stats(self.entries, self)
end

function M.stats(entries, q)
  local s = { messages = 0, recipients = 0, held = 0, destinations = {} }
  for _, e in pairs(entries) do
    if not e.deleted then
      s.messages = s.messages + 1
      if e.held then s.held = s.held + 1 end
      if not s.oldest or e.received_at < s.oldest then s.oldest = e.received_at end
      for _, r in ipairs(e.rcpt) do
        if r.state == "pending" then
          s.recipients = s.recipients + 1
          local key = q and route_mod.destination(q:route(r, e), r) or route_mod.domain_of(r.address)
          s.destinations[key] = (s.destinations[key] or 0) + 1
        end
      end
    end
  end
  return s
end

--- q:pending() -> number of entries still queued
function Queue:pending()
  local n = 0
  for _ in pairs(self.entries) do n = n + 1 end
  return n
end

--- queue.plugin(q) -> a plugin for the server's deliver phase (its
-- `deliver`; `on_data` is the same function, for the hooks): the
-- message is queued (durably) before the 250; a full disk answers
-- 452 4.3.1, any other failure 451 4.3.0.
function M.plugin(q)
  local server = require "luasmtp.server"
  local function deliver(s, message)
    local env = message.envelope or s.envelope
    local rcpt = {}
    for i, address in ipairs(env.rcpt) do
      local p = env.rcpt_params and env.rcpt_params[i] or {}
      rcpt[i] = { address = address, notify = p.notify, orcpt = p.orcpt }
    end
    local params = env.params or {}
    local id, _, _, kind = q:enqueue { from = env.from, rcpt = rcpt, ret = params.ret, envid = params.envid,
      smtputf8 = params.smtputf8 and true or nil, body = message }
    if not id then
      if kind == "full" then return server.reply(452, "4.3.1", "Insufficient system storage") end
      return server.reply(451, "4.3.0", "Local error in processing")
    end
    return server.reply(250, "2.0.0", "Ok: queued as " .. id)
  end
  -- large bodies are spooled in the queue's tmp/: one file system with the queue
  return { name = "queue", deliver = deliver, on_data = deliver, spool_dir = q.paths.tmp }
end

return M
