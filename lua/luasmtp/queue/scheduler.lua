--- luasmtp.queue.scheduler: ready queues per destination, connection
-- limits, retries with backoff, destination backoff, shaping.
--
-- One task scans the queue's recipients every `tick` seconds (and at
-- once when woken): each recipient due and not in flight goes, with the
-- other due recipients of its entry for the same destination, as one job
-- into that destination's ready queue. Workers, at most
-- `max_connections` in all and `max_connections_per_destination` (or the
-- route's `max_connections`) per destination, take jobs one after the
-- other, so a destination's messages follow each other over the pool's
-- connection to it (smarthost and LMTP by the pool's server key, MX by
-- the domain and its TLS policy: see route.lua).
--
-- Before an entry's first job its Received fields are counted: more
-- than max_hops (50, Postfix's hopcount_limit) and the message loops;
-- every recipient fails with 554 5.4.6 and the sender gets the notice.
local core = require "luasmtp.core"
local store = require "luasmtp.queue.store"
local route_mod = require "luasmtp.queue.route"

local M = {}

--- backoff(q, attempts) -> seconds until the next attempt: the retry
-- table's entry for this attempt (the last repeats), +- jitter.
function M.backoff(opts, attempts)
  local t = opts.retry
  local base = t[math.min(attempts, #t)]
  local j = opts.jitter or 0
  if j > 0 then
    local r = string.unpack("<I4", core.random(4)) / 0xffffffff
    base = base * (1 - j + 2 * j * r)
  end
  return base
end

local function dest_of(q, key, route)
  local d = q.dests[key]
  if not d then
    d = { key = key, ready = {}, active = 0, failures = 0, backoff_until = 0, next_start = 0, sent = 0 }
    q.dests[key] = d
  end
  local shaping = q.shaping[key]
  d.limit = shaping and shaping.max_connections or route.max_connections or q.opts.max_connections_per_destination
  d.rate = shaping and shaping.rate or route.rate
  if d.failures > 0 then d.limit = 1 end -- a failing destination is throttled
  return d
end

--- hops(entry) -> the number of Received fields in its header block
-- (read up to its end, at most dsn.MAX_HEADER_BLOCK bytes)
function M.hops(e)
  local dsn = require "luasmtp.queue.dsn"
  local head = store.read_body(e, dsn.MAX_HEADER_BLOCK)
  if not head then return 0 end
  local _, count = dsn.too_many_hops(head)
  return count
end

-- A looping message bounces instead of going out. -> true when it did.
local function looping(q, e, now)
  if e.hops_checked then return false end
  e.hops_checked = true
  local max = q.opts.max_hops
  if not max then return false end
  local count = e.hops or M.hops(e)
  if count <= max then return false end
  q:log("info", "%s: %d Received fields (more than %d): mail loop, bounced", e.id, count, max)
  q:bounce_now(e, now, ("554 5.4.6 Too many hops: %d Received header fields, the limit is %d"):format(count, max))
  return true
end

-- Jobs: { entry, idxs = {rcpt indexes}, route }
-- Over a snapshot of the entries: removing one or queueing a notice
-- waits for the disk, and other tasks add entries meanwhile.
local MAX_MOVES = 64

local function collect(q, now, list)
  local moving = 0
  for _, e in ipairs(list) do
    local id = e.id
    -- an old entry does not keep its segment on the disk: it moves into
    -- files in a task of its own (a few per pass), no attempt meanwhile
    if e.segment and not e.migrating and (e.inflight or 0) == 0 and now - e.received_at >= store.SEGMENT_WAIT
        and moving < MAX_MOVES then
      moving = moving + 1
      e.migrating = true
      core.spawn(q.migrate, q, e)
    end
    if e.migrating or q.entries[id] ~= e then goto next end
    if e.deleted then
      if (e.inflight or 0) == 0 then
        store.remove_entry(q.paths, e)
        q.entries[id] = nil
      end
    elseif e.bounce and (e.inflight or 0) == 0 then
      q:bounce_now(e, now)
    elseif not e.held and not ((e.inflight or 0) == 0 and looping(q, e, now)) then
      local groups, order = {}, {}
      for i, r in ipairs(e.rcpt) do
        if r.state == "pending" and not r.inflight and (r.next_attempt <= now or e.flush) then
          local route = q:route(r, e)
          local key = route_mod.destination(route, r)
          local d = dest_of(q, key, route)
          if d.backoff_until > now and not e.flush then
            r.next_attempt = d.backoff_until
          else
            if not groups[key] then
              groups[key] = { entry = e, idxs = {}, route = route, forced = e.flush }
              order[#order + 1] = key
            end
            table.insert(groups[key].idxs, i)
            r.inflight = true
            e.inflight = (e.inflight or 0) + 1
          end
        end
      end
      e.flush = nil
      for _, key in ipairs(order) do
        local d = q.dests[key]
        d.ready[#d.ready + 1] = groups[key]
      end
    end
    ::next::
  end
end

-- Put back a job that was not attempted (the destination backed off).
local function requeue(job, at)
  for _, i in ipairs(job.idxs) do
    local r = job.entry.rcpt[i]
    r.inflight = nil
    r.next_attempt = math.max(r.next_attempt, at)
  end
  job.entry.inflight = job.entry.inflight - #job.idxs
end

local function worker(q, d)
  while not q.stopping do
    local job = table.remove(d.ready, 1)
    if not job then break end
    local now = core.time()
    local e = job.entry
    if e.held or e.deleted or e.bounce then
      -- the tool's hold, delete or bounce came while the job waited: not
      -- attempted; a pass applies it (a held entry gets its files now,
      -- which read_control left to the end of the job)
      requeue(job, now)
      if e.held and e.inflight == 0 then q:migrate(e) end
    elseif d.backoff_until > now and not job.forced then
      requeue(job, d.backoff_until)
    else
      if d.rate and d.next_start > now then
        core.sleep(d.next_start - now)
      end
      d.next_start = core.time() + (d.rate and 1 / d.rate or 0)
      q:attempt(job, d)
    end
  end
  d.active = d.active - 1
  q.active = q.active - 1
  q.wake:signal()
end

local function dispatch(q)
  local now = core.time()
  for _, d in pairs(q.dests) do
    if d.backoff_until > now then
      local keep = {}
      for _, job in ipairs(d.ready) do
        if job.forced then keep[#keep + 1] = job else requeue(job, d.backoff_until) end
      end
      d.ready = keep
    end
    while #d.ready > 0 and d.active < d.limit and q.active < q.opts.max_connections do
      d.active = d.active + 1
      q.active = q.active + 1
      core.spawn(worker, q, d)
    end
  end
end

local function next_due(q)
  local t = math.huge
  for _, e in pairs(q.entries) do
    if not e.held then
      for _, r in ipairs(e.rcpt) do
        if r.state == "pending" and not r.inflight and r.next_attempt < t then t = r.next_attempt end
      end
    end
  end
  return t
end

--- run(q): the scheduler task's body, until q:stop(). A full pass
-- (control notices, every entry, the next due time) once per tick, when
-- that time comes, or after a flush; in between, a wake-up looks only at
-- the entries enqueued since (q.incoming) and starts deliveries: the
-- cost of a new message does not grow with the queue.
function M.run(q)
  local next_full, due = 0, math.huge
  while not q.stopping do
    local now = core.time()
    local list
    local full = q.full_pass or now >= next_full or now >= due
    if full then
      q.full_pass, q.incoming = false, {}
      q:read_control()
      list = {}
      for _, e in pairs(q.entries) do list[#list + 1] = e end
      next_full = now + q.opts.tick
    else
      list, q.incoming = q.incoming, {}
    end
    collect(q, now, list)
    dispatch(q)
    if full then due = next_due(q) end
    -- what was enqueued while this pass waited (a signal then is lost)
    if #q.incoming == 0 then
      q.wake:wait(math.max(0.01, math.min(next_full, due) - core.time()))
    end
  end
end

--- The destination's state after a job: failures back it off.
function M.after(q, d, dest_failed)
  if dest_failed then
    d.failures = d.failures + 1
    d.limit = 1
    d.backoff_until = core.time() + M.backoff(q.opts, d.failures)
  else
    d.failures = 0
    d.backoff_until = 0
  end
end

return M
