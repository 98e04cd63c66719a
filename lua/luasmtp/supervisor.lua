--- luasmtp.supervisor: `luasmtp serve --workers N`.
--
-- The supervisor binds the listeners given with --listen (ports below
-- 1024 too, when started as root), drops privileges (--user, --group),
-- and only then starts N workers: each a new `luasmtp serve` process
-- (fork and exec of the same interpreter: a fresh Lua state and loop)
-- that inherits the listening sockets and one end of a socketpair, its
-- channel. No script code ever runs in the supervisor.
--
-- It restarts a worker that dies, forwards SIGTERM/SIGINT (every worker
-- drains; stragglers are killed at the drain deadline), replaces the
-- workers on SIGHUP (a new generation starts with the script loaded
-- afresh; once every new worker is ready the old ones drain), and
-- writes its status on SIGUSR1.
--
-- Over the channels it runs the counter service: one luasmtp.kv memory
-- store that the workers' luasmtp.kv.supervisor stores reach, so that
-- connection slots and rates are exact across workers (Postfix's anvil
-- plays this part for its smtpd processes). The slots a worker holds
-- when it ends are released.
local core = require "luasmtp.core"
local kv = require "luasmtp.kv"
local net = require "luasmtp.net"
local proto = require "luasmtp.kv.supervisor"

local M = {}

-- Restart policy (documented in the README, "Workers")
M.STABLE_AFTER = 10 -- seconds: a worker that lived this long was not crash-looping
M.GIVE_UP_AFTER = 5 -- quick deaths in a row of one slot's workers: then the supervisor stops
M.BACKOFF_FIRST = 0.5 -- seconds before the 2nd restart in a row, doubled each time
M.BACKOFF_MAX = 30
M.READY_TIMEOUT = 30 -- seconds a new generation has to become ready on SIGHUP
M.KILL_GRACE = 5 -- seconds past the drain deadline before SIGKILL
M.FRAME_TIMEOUT = 5 -- seconds for the rest of a frame once its length came

local function log(fmt, ...)
  io.stderr:write("luasmtp serve: " .. fmt:format(...) .. "\n") -- one write: workers share stderr
end

local function log_worker(w, fmt, ...)
  log("worker %d (pid %d, generation %d): " .. fmt, w.slot, w.pid, w.generation, ...)
end

local function exit_text(r)
  if r.signal then return "signal " .. tostring(r.signal) end
  return "exit status " .. tostring(r.code)
end

---------------------------------------------------------------------------
-- The counter service

-- One request of worker w -> answer fields
local function dispatch(sv, w, f)
  local store, op, key = sv.store, f[1], f[2]
  if op == "ready" then
    if not w.ready then log_worker(w, "ready") end
    w.ready = true
    sv.changed:broadcast()
    return { "ok", "" }
  elseif op == "draining" then -- it got SIGTERM: not to be restarted
    w.retiring = true
    return { "ok", "" }
  elseif op == "status" then
    return { "ok", proto.pack_value(sv:status_text()) }
  end
  if type(key) ~= "string" or key == "" then return { "err", "key expected" } end
  local function number(i)
    local v = f[i] and proto.unpack_value(f[i])
    return type(v) == "number" and v or nil
  end
  if op == "acquire" then
    local limit = number(3)
    if not limit then return { "err", "limit expected" } end
    if not store:acquire(key, limit) then return { "false", "" } end
    w.held[key] = (w.held[key] or 0) + 1
    return { "ok", "" }
  elseif op == "release" then
    local n = w.held[key]
    if not n then return { "err", "no slot held under " .. key } end
    w.held[key] = n > 1 and n - 1 or nil
    store:release(key)
    return { "ok", "" }
  elseif op == "hit" then
    local limit, window = number(3), number(4)
    if not limit or not window or window <= 0 then return { "err", "limit and window expected" } end
    return { store:hit(key, limit, window) and "ok" or "false", "" }
  elseif op == "incr" then
    local by = number(3)
    if not by then return { "err", "increment expected" } end
    return { "ok", proto.pack_value(store:incr(key, by, number(4))) }
  elseif op == "get" then
    local v = store:get(key)
    if v == nil then return { "nil", "" } end
    return { "ok", proto.pack_value(v) }
  elseif op == "set" then
    local v = f[3] and proto.unpack_value(f[3])
    if v == nil then return { "err", "value expected" } end
    store:set(key, v, number(4))
    return { "ok", "" }
  elseif op == "delete" then
    store:delete(key)
    return { "ok", "" }
  end
  return { "err", "unknown operation " .. tostring(op) }
end

-- The slots a worker held go back when its channel ends.
local function release_all(sv, w)
  for key, n in pairs(w.held) do
    for _ = 1, n do sv.store:release(key) end
  end
  w.held = {}
end

local function serve_channel(sv, w)
  local sock = w.channel
  while true do
    local payload, err, detail = proto.read_frame(sock, M.FRAME_TIMEOUT)
    if not payload then
      if err ~= "closed" and err ~= "reset" then
        log("worker %d (pid %d): counter service: %s; closing its channel and stopping it",
          w.slot, w.pid, detail or err)
        core.proc_kill(w.pid, "TERM")
      end
      break
    end
    local id, fields = proto.decode(payload)
    if not id then
      log("worker %d (pid %d): counter service: bad frame (%s); closing its channel and stopping it",
        w.slot, w.pid, fields)
      core.proc_kill(w.pid, "TERM")
      break
    end
    local answer = dispatch(sv, w, fields)
    if id ~= 0 then
      local frame = assert(proto.encode(id, answer))
      if not sock:send(frame) then break end
    end
  end
  sock:close()
  release_all(sv, w)
end

---------------------------------------------------------------------------
-- Workers

local Supervisor = {}
Supervisor.__index = Supervisor

-- Start the worker of slot in generation gen. -> worker | nil, err
function Supervisor:start(slot, gen)
  local mine, theirs = core.socketpair()
  if not mine then return nil, theirs end
  local fds = { theirs:getfd() }
  local argv = { self.exe, self.program, "serve", "--drain", tostring(self.drain),
    "--worker", ("%d:%d"):format(slot, gen), "--channel", "3", "--store-on-error", self.on_error }
  for _, b in ipairs(self.bound) do
    for _, l in ipairs(b.per_slot and b.per_slot[slot] or b.listeners) do
      fds[#fds + 1] = l:getfd()
      argv[#argv + 1] = "--inherit"
      argv[#argv + 1] = ("%d=%s"):format(#fds + 2, b.spec)
    end
  end
  argv[#argv + 1] = self.script
  for _, a in ipairs(self.script_args) do argv[#argv + 1] = a end
  local pid, err, detail = core.proc_spawn(self.exe, argv, { fds = fds, pdeathsig = "TERM" })
  theirs:close()
  if not pid then
    mine:close()
    return nil, detail or err
  end
  local w = {
    slot = slot, generation = gen, pid = pid, channel = mine, held = {},
    started = core.update_now(), ready = false, retiring = false,
  }
  self.workers[pid] = w
  core.spawn(serve_channel, self, w)
  log_worker(w, "started")
  return w
end

-- Ask w to drain; kill it if it is still there at the deadline.
function Supervisor:retire(w)
  if w.retiring then return end
  w.retiring = true
  core.proc_kill(w.pid, "TERM")
  core.spawn(function()
    local deadline = core.update_now() + self.drain + M.KILL_GRACE
    while self.workers[w.pid] == w and core.update_now() < deadline do
      core.sleep(0.1)
    end
    if self.workers[w.pid] == w then
      log_worker(w, "still running %g s after SIGTERM: SIGKILL", self.drain + M.KILL_GRACE)
      self.killed = self.killed + 1
      core.proc_kill(w.pid, "KILL")
    end
  end)
end

function Supervisor:count()
  local n = 0
  for _ in pairs(self.workers) do n = n + 1 end
  return n
end

-- A slot's worker died unasked: start another, with backoff when they
-- keep dying; give up after GIVE_UP_AFTER quick deaths in a row.
function Supervisor:restart_later(w, r)
  local slot = self.slots[w.slot]
  local lived = core.update_now() - w.started
  if lived >= M.STABLE_AFTER then slot.failures = 0 end
  slot.failures = slot.failures + 1
  if slot.failures > M.GIVE_UP_AFTER then
    log_worker(w, "%s after %.1f s; %d quick deaths in a row: giving up", exit_text(r), lived,
      slot.failures)
    self.gave_up = true
    self:shutdown()
    return
  end
  local delay = slot.failures == 1 and 0 or math.min(M.BACKOFF_FIRST * 2 ^ (slot.failures - 2), M.BACKOFF_MAX)
  log_worker(w, "%s after %.1f s; restarting in %g s", exit_text(r), lived, delay)
  core.spawn(function()
    if delay > 0 then core.sleep(delay) end
    if self.stopping or w.generation ~= self.generation then return end
    local nw, err = self:start(w.slot, self.generation)
    if not nw then
      log("worker %d: cannot start: %s", w.slot, tostring(err))
      self:restart_later({ slot = w.slot, pid = 0, generation = self.generation,
        started = core.update_now() }, { code = "none" })
    end
  end)
end

function Supervisor:reap()
  for _, r in ipairs(core.proc_reap()) do
    local w = self.workers[r.pid]
    if w then
      self.workers[r.pid] = nil
      w.exited = r
      w.channel:close()
      release_all(self, w)
      if w.retiring or self.stopping then
        log_worker(w, "ended (%s)", exit_text(r))
      elseif w.generation ~= self.generation then
        log_worker(w, "of the new generation ended before it was ready (%s)", exit_text(r))
      else
        self:restart_later(w, r)
      end
      self.changed:broadcast()
    end
  end
end

-- SIGHUP: a new generation; the old one drains once it is ready.
function Supervisor:reload()
  if self.reloading then
    log("SIGHUP: a reload is already in progress")
    return
  end
  self.reloading = true
  local old, new = self.generation, self.generation + 1
  log("SIGHUP: starting generation %d", new)
  core.spawn(function()
    local started, failed = {}, nil
    for slot = 1, self.n do
      local w, err = self:start(slot, new)
      if not w then failed = err break end
      started[#started + 1] = w
    end
    local deadline = core.update_now() + M.READY_TIMEOUT
    while not failed do
      local ready = 0
      for _, w in ipairs(started) do
        if w.exited then failed = "worker " .. w.slot .. " ended: " .. exit_text(w.exited) break end
        if w.ready then ready = ready + 1 end
      end
      if failed or ready == #started then break end
      if core.update_now() >= deadline then failed = "not ready after " .. M.READY_TIMEOUT .. " s" break end
      self.changed:wait(math.max(deadline - core.update_now(), 0.01))
    end
    if failed or self.stopping then
      log("reload failed: %s; generation %d goes on", failed or "stopping", old)
      for _, w in ipairs(started) do self:retire(w) end
    else
      self.generation = new
      log("generation %d ready; generation %d drains", new, old)
      for _, w in pairs(self.workers) do
        if w.generation < new then self:retire(w) end
      end
    end
    self.reloading = false
  end)
end

function Supervisor:status_text()
  local lines = { ("status: pid %d, generation %d, %d workers (%d wanted)%s"):format(
    self.pid, self.generation, self:count(), self.n, self.reloading and ", reloading" or "") }
  local list = {}
  for _, w in pairs(self.workers) do list[#list + 1] = w end
  table.sort(list, function(a, b)
    if a.generation ~= b.generation then return a.generation < b.generation end
    return a.slot < b.slot
  end)
  local now = core.update_now()
  for _, w in ipairs(list) do
    local held = 0
    for _, n in pairs(w.held) do held = held + n end
    lines[#lines + 1] = ("worker %d pid %d generation %d %s up %.1f s, %d slots held, restarts %d"):format(
      w.slot, w.pid, w.generation, w.retiring and "draining" or (w.ready and "ready" or "starting"),
      now - w.started, held, self.slots[w.slot].failures)
  end
  return table.concat(lines, "\n")
end

-- SIGTERM/SIGINT: every worker drains; exit when all have ended.
function Supervisor:shutdown()
  if self.stopping then return end
  self.stopping = true
  for _, w in pairs(self.workers) do self:retire(w) end
  for _, b in ipairs(self.bound) do
    for _, list in ipairs(b.per_slot or { b.listeners }) do
      for _, l in ipairs(list) do l:close() end
    end
  end
  self.changed:broadcast()
end

---------------------------------------------------------------------------

--- run(opts) -> exit status. opts:
--   workers   number of workers (>= 1)
--   listen    list of listen specs to bind here (see luasmtp.net.listen)
--   user, group   privileges to drop to after binding
--   drain     seconds each worker drains on SIGTERM
--   script, script_args   what each worker runs
--   program   path of bin/luasmtp (what the workers run)
--   on_error  the counter store's on_error in the workers ("open")
--   reuseport each worker slot gets sockets of its own (SO_REUSEPORT)
function M.run(opts)
  local n = assert(math.tointeger(opts.workers), "workers must be an integer")
  assert(n >= 1 and n <= 256, "workers must be 1 to 256")
  local exe, eerr, edetail = core.proc_exe()
  if not exe then
    log("cannot find the interpreter: %s", edetail or eerr)
    return 71
  end
  local sv = setmetatable({
    n = n, drain = opts.drain or 30, script = opts.script, script_args = opts.script_args or {},
    program = opts.program, exe = exe, on_error = opts.on_error or "open",
    bound = {}, workers = {}, slots = {}, generation = 1, killed = 0,
    store = kv.memory(), changed = core.cond(), pid = (core.proc_ids()),
  }, Supervisor)
  -- 1. the listeners, while still privileged
  -- (--reuseport: one socket per worker slot and TCP address, all on the
  -- port the first one got)
  for _, spec in ipairs(opts.listen or {}) do
    local reuse = opts.reuseport and not tostring(spec):match("^unix:")
    local listeners, err, detail = net.listen(spec, reuse and { reuseport = true } or nil)
    if not listeners then
      log("cannot listen on %s: %s", spec, tostring(detail or err))
      return 71
    end
    local b = { spec = spec, listeners = listeners, per_slot = reuse and { listeners } or nil }
    for slot = 2, reuse and n or 1 do
      local list = {}
      for i, first in ipairs(listeners) do
        local addr, port = first:getsockname()
        list[i], err, detail = core.listen(addr, port, { reuseport = true })
        if not list[i] then
          log("cannot listen on %s again: %s", net.format_address(addr, port), tostring(detail or err))
          return 71
        end
      end
      b.per_slot[slot] = list
    end
    sv.bound[#sv.bound + 1] = b
    for _, l in ipairs(listeners) do
      log("listening on %s (for %s%s)", net.format_address(l:getsockname()), spec,
        reuse and (", SO_REUSEPORT: one socket per worker") or "")
    end
  end
  -- 2. privileges, for good, before anything of the script runs
  if opts.user or opts.group then
    local ok, err, detail = core.proc_drop(opts.user, opts.group)
    if not ok then
      log("cannot drop privileges: %s", tostring(detail or err))
      return 77
    end
    local _, uid, gid = core.proc_ids()
    log("running as uid %d gid %d", uid, gid)
    -- the workers load the program and the script as this user: say so
    -- now rather than let them die one after another
    for _, path in ipairs { sv.program, sv.script } do
      local f, ferr = io.open(path, "rb")
      if not f then
        log("uid %d gid %d cannot read %s (%s): the program, its modules and the script must be readable "
          .. "after the privilege drop", uid, gid, path, tostring(ferr))
        return 77
      end
      f:close()
    end
  end
  -- 3. the workers
  log("supervisor pid %d: starting %d workers", sv.pid, n)
  core.wait_signal("CHLD", "TERM", "INT", "HUP", "USR1", 0) -- catch them from now on
  for slot = 1, n do
    sv.slots[slot] = { failures = 0 }
    local w, err = sv:start(slot, 1)
    if not w then
      log("cannot start worker %d: %s", slot, tostring(err))
      sv:shutdown()
      break
    end
  end
  -- 4. signals, until every worker has ended after a shutdown
  while not (sv.stopping and sv:count() == 0) do
    local sig = core.wait_signal("CHLD", "TERM", "INT", "HUP", "USR1", 1)
    if sig == "CHLD" then
      sv:reap()
    elseif sig == "TERM" or sig == "INT" then
      log("SIG%s: stopping: every worker drains (at most %g s)", sig, sv.drain)
      sv:shutdown()
    elseif sig == "HUP" then
      if not sv.stopping then sv:reload() end
    elseif sig == "USR1" then
      log("%s", (sv:status_text():gsub("\n", "\nluasmtp serve: ")))
    else
      sv:reap() -- a SIGCHLD may have come while the handler was not set
    end
  end
  local status = (sv.gave_up or sv.killed > 0) and 1 or 0
  log("all workers ended; exit status %d", status)
  return status
end

return M
