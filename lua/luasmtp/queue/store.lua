--- luasmtp.queue.store: the queue's files on disk.
--
-- A queue directory holds
--   tmp/      entries being written (removed at start: never delivered)
--   queue/    ID.body (the message), ID.env (the envelope: its presence
--             is what makes the entry exist), ID.log (the per-recipient
--             state, append-only, one fsynced line per event)
--   control/  notices from `luasmtp queue` to a running scheduler
--
-- Enqueue writes the body and the envelope into tmp/ and fsyncs both
-- (at once, in worker threads: core.fsync_paths), renames both into
-- queue/ and fsyncs queue/ (one directory fsync shared by the entries
-- renamed meanwhile: sync_dir); only then is the entry durable. After a
-- crash an entry is whole (envelope and body in queue/) or it was never
-- acknowledged: an envelope whose body is missing, and a body or log
-- without an envelope, are half-written or half-removed entries,
-- removed at start. Removal goes the other way: envelope first.
--
-- Files are lines of space-separated fields, each percent-encoded (see
-- enc), so no value can split a line or a field.
local core = require "luasmtp.core"

local M = {}

M.FORMAT = "luasmtp-queue 1"

--- enc(s) -> a field: bytes outside printable ASCII, space and "%"
-- as %XX; the empty string as a lone "%".
function M.enc(s)
  s = tostring(s == nil and "" or s)
  if s == "" then return "%" end
  return (s:gsub("[^%w%.%-_@+=:/<>!#$&'*,;?^`{|}~%[%]\"()\\]", function(c)
    return ("%%%02X"):format(c:byte())
  end))
end

function M.dec(s)
  if s == nil or s == "%" then return "" end
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function fields(line)
  local t = {}
  for f in line:gmatch("%S+") do t[#t + 1] = f end
  return t
end

-- The process's crash points for the crash tests: LUASMTP_QUEUE_CRASH
-- names one; reaching it kills the process with SIGKILL, as a power cut
-- or the OOM killer would.
local crash_at = os.getenv("LUASMTP_QUEUE_CRASH")
function M.crash_point(name)
  if crash_at == name then
    io.stderr:write("crash point ", name, "\n")
    io.stderr:flush()
    os.execute("kill -9 " .. math.tointeger(core.getpid()))
  end
end

--- paths(dir) -> { tmp, queue, control }
function M.paths(dir)
  return { dir = dir, tmp = dir .. "/tmp", queue = dir .. "/queue", control = dir .. "/control" }
end

function M.init(dir)
  local p = M.paths(dir)
  for _, d in ipairs { p.dir, p.tmp, p.queue, p.control } do
    local ok, token, detail = core.mkdir(d)
    if not ok then return nil, token, detail end
  end
  return p
end

--- new_id() -> a queue ID: time in seconds (hex), then 64 random bits;
-- unique across restarts and processes without shared state.
function M.new_id()
  local rnd = core.random(8)
  return ("%09X%s"):format(math.floor(core.time()), (rnd:gsub(".", function(c)
    return ("%02X"):format(c:byte())
  end)))
end

--- encode_envelope(entry) -> the .env file's text
function M.encode_envelope(e)
  local out = { M.FORMAT,
    "id " .. M.enc(e.id),
    "from " .. M.enc(e.from),
    "received_at " .. string.format("%.3f", e.received_at),
    "ret " .. M.enc(e.ret),
    "envid " .. M.enc(e.envid),
    "smtputf8 " .. (e.smtputf8 and "1" or "0"),
    "size " .. math.tointeger(e.size or 0) }
  for _, r in ipairs(e.rcpt) do
    out[#out + 1] = "rcpt " .. M.enc(r.address) .. " " .. M.enc(r.notify) .. " " .. M.enc(r.orcpt)
  end
  out[#out + 1] = "end"
  return table.concat(out, "\n") .. "\n"
end

--- decode_envelope(text) -> entry | nil, why
function M.decode_envelope(text)
  if not text or text:sub(1, #M.FORMAT + 1) ~= M.FORMAT .. "\n" then
    return nil, "not a queue envelope"
  end
  local e = { rcpt = {} }
  local complete = false
  for line in text:gmatch("([^\n]*)\n") do
    local f = fields(line)
    local k = f[1]
    if k == "id" then e.id = M.dec(f[2])
    elseif k == "from" then e.from = M.dec(f[2])
    elseif k == "received_at" then e.received_at = tonumber(f[2])
    elseif k == "ret" then e.ret = M.dec(f[2]) ~= "" and M.dec(f[2]) or nil
    elseif k == "envid" then e.envid = M.dec(f[2]) ~= "" and M.dec(f[2]) or nil
    elseif k == "smtputf8" then e.smtputf8 = f[2] == "1"
    elseif k == "size" then e.size = math.tointeger(tonumber(f[2]))
    elseif k == "rcpt" then
      local notify, orcpt = M.dec(f[3]), M.dec(f[4])
      e.rcpt[#e.rcpt + 1] = { address = M.dec(f[2]), notify = notify ~= "" and notify or nil,
        orcpt = orcpt ~= "" and orcpt or nil }
    elseif k == "end" then complete = true
    end
  end
  if not complete or not e.id or not e.from or not e.received_at or #e.rcpt == 0 then
    return nil, "incomplete envelope"
  end
  return e
end

--- A state log line. kind: "attempt" (idx, outcome "ok" | "temp" |
-- "perm", next_attempt, reply, remote_mta, action), "final" (idx, action,
-- status, reply, remote_mta: the recipient is done), "warned" (idx: its
-- delay warning was queued), or an operation of
-- the tool: "hold", "release", "bounce", "delete", "flush".
function M.log_line(kind, t, ...)
  local f = { kind, string.format("%.3f", t) }
  for i = 1, select("#", ...) do f[#f + 1] = M.enc((select(i, ...))) end
  return table.concat(f, " ") .. "\n"
end

--- parse_log(text) -> { {kind, time, args...}, ... }: only whole lines
-- (a crash in a write leaves at most a torn last line, ignored).
function M.parse_log(text)
  local events = {}
  for line in (text or ""):gmatch("([^\n]*)\n") do
    local f = fields(line)
    local t = tonumber(f[2])
    if f[1] and t then
      local ev = { kind = f[1], time = t }
      for i = 3, #f do ev[#ev + 1] = M.dec(f[i]) end
      events[#events + 1] = ev
    end
  end
  return events
end

local function readfile(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local data = f:read("a")
  f:close()
  return data
end
M.readfile = readfile

--- exists(p, id) -> whether an entry (or its remains) has this ID
function M.exists(p, id)
  local q = p.queue .. "/" .. id
  for _, path in ipairs { q .. ".env", q .. ".body", p.tmp .. "/" .. id .. ".env" } do
    local f = io.open(path, "rb")
    if f then
      f:close()
      return true
    end
  end
  return false
end

--- append(p, id, text) -> true | nil, token, detail, kind: one durable
-- append to ID.log (locked, fsynced; the tool and the scheduler share it).
function M.append(p, id, text)
  return core.append_file_sync(p.queue .. "/" .. id .. ".log", text)
end

-- Write a body given as a string, a file, a chunk function, or an
-- object with :chunks() (a server message, a sink) to path, not yet
-- fsynced. A server message that arrived in a spool file and was not
-- edited becomes the file by a hard link (no copy). Returns its size.
local function write_body(path, body)
  if type(body) == "table" and body.sink and body.unedited and body:unedited() and body:spooled() then
    local ok, token, detail, kind = body.sink:commit(path, false)
    if ok then return body:size() end
    return nil, token, detail, kind
  end
  local next_chunk
  if type(body) == "string" then
    local s = body
    next_chunk = function()
      local c = s
      s = nil
      return c
    end
  elseif io.type(body) == "file" then
    next_chunk = function() return body:read(65536) end
  elseif type(body) == "function" then
    next_chunk = body
  elseif (type(body) == "table" or type(body) == "userdata") and body.chunks then
    local it, st, ctl = body:chunks(65536)
    next_chunk = function()
      local c = it(st, ctl)
      ctl = c
      return c
    end
  else
    error("enqueue: body must be a string, a file, a function or have :chunks()", 3)
  end
  local f, err, errno = io.open(path, "wb")
  if not f then return nil, "io", err, errno == 28 and "full" or "other" end
  local size = 0
  while true do
    local chunk, why = next_chunk()
    if chunk == nil then
      if why then
        f:close()
        os.remove(path)
        return nil, "io", "body: " .. tostring(why), "other"
      end
      break
    end
    local ok, werr, werrno = f:write(chunk)
    if not ok then
      f:close()
      os.remove(path)
      return nil, "io", werr, werrno == 28 and "full" or "other"
    end
    size = size + #chunk
  end
  local ok, cerr, cerrno = f:close()
  if not ok then
    os.remove(path)
    return nil, "io", cerr, cerrno == 28 and "full" or "other"
  end
  return size
end

local function write_text(path, text)
  local f, err, errno = io.open(path, "wb")
  if not f then return nil, "io", err, errno == 28 and "full" or "other" end
  local ok, werr, werrno = f:write(text)
  local closed, cerr, cerrno = f:close()
  if ok and closed then return true end
  os.remove(path)
  return nil, "io", werr or cerr, (werrno or cerrno) == 28 and "full" or "other"
end

-- How long a durable write may wait for the disk before it fails.
M.SYNC_TIMEOUT = 60

--- sync_dir(p) -> true | nil, token, detail, kind: fsync queue/ after
-- renames or unlinks there (group commit). The directory fsync that
-- covers a caller is the first one to start after its call; while one
-- runs, every caller arriving waits for the next, which then serves them
-- all: many entries committed in one loop pass share one fsync.
function M.sync_dir(p)
  local g = p.dirsync
  if not g then
    g = { started = 0, finished = 0, wanted = 0, running = false, cond = core.cond(), failed = {} }
    p.dirsync = g
  end
  local need = g.started + 1
  if need > g.wanted then g.wanted = need end
  if not g.running then
    g.running = true
    while g.finished < g.wanted do
      local epoch = g.started + 1
      g.started = epoch
      local ok, token, detail, kind = core.fsync_paths({ p.queue }, M.SYNC_TIMEOUT)
      if not ok then g.failed[epoch] = { token, detail, kind } end
      g.failed[epoch - 64] = nil
      g.finished = epoch
      g.cond:broadcast()
    end
    g.running = false
  end
  local deadline = core.update_now() + 2 * M.SYNC_TIMEOUT
  while g.finished < need do
    local left = deadline - core.update_now()
    if left <= 0 then return nil, "timeout", p.queue .. ": fsync did not finish", "other" end
    g.cond:wait(left)
  end
  local f = g.failed[need]
  if f then return nil, f[1], f[2], f[3] end
  return true
end

--- write_entry(p, entry, body) -> true | nil, token, detail, kind
-- The durable enqueue described above; entry.id and entry.size set.
function M.write_entry(p, entry, body)
  local id = entry.id
  local tbody, tenv = p.tmp .. "/" .. id .. ".body", p.tmp .. "/" .. id .. ".env"
  local qbody, qenv = p.queue .. "/" .. id .. ".body", p.queue .. "/" .. id .. ".env"
  local size, token, detail, kind = write_body(tbody, body)
  if not size then return nil, token, detail, kind end
  entry.size = size
  local ok
  ok, token, detail, kind = write_text(tenv, M.encode_envelope(entry))
  if not ok then
    os.remove(tbody)
    return nil, token, detail, kind
  end
  ok, token, detail, kind = core.fsync_paths({ tbody, tenv }, M.SYNC_TIMEOUT)
  if not ok then
    os.remove(tbody); os.remove(tenv)
    return nil, token, detail, kind
  end
  local function undo(why)
    os.remove(tbody); os.remove(tenv)
    os.remove(qenv); os.remove(qbody)
    return nil, "io", why, "other"
  end
  local renamed, rerr = os.rename(tbody, qbody)
  if not renamed then return undo(rerr) end
  M.crash_point("enqueue_before_envelope")
  renamed, rerr = os.rename(tenv, qenv)
  if not renamed then return undo(rerr) end
  ok, token, detail, kind = M.sync_dir(p)
  if not ok then
    undo(detail)
    return nil, token, detail, kind
  end
  return true
end

--- remove_entry(p, id [, now]): envelope first (the entry is gone), then
-- the rest. The directory fsync is the shared one (sync_dir: the caller
-- waits while other tasks run), or with `now` (at start) a plain one.
function M.remove_entry(p, id, now)
  os.remove(p.queue .. "/" .. id .. ".env")
  if now then core.fsync_dir(p.queue) else M.sync_dir(p) end
  os.remove(p.queue .. "/" .. id .. ".body")
  os.remove(p.queue .. "/" .. id .. ".log")
  os.remove(p.control .. "/" .. id)
end

--- load(p, id) -> entry with its log applied | nil, why
-- Each recipient gets state ("pending" | "done"), attempts, next_attempt,
-- last_reply, remote_mta, last_attempt, action; the entry held, deleted,
-- bounce (asked for by the tool), flush.
function M.load(p, id)
  local e, why = M.decode_envelope(readfile(p.queue .. "/" .. id .. ".env"))
  if not e then return nil, why end
  e.body_path = p.queue .. "/" .. id .. ".body"
  local body = io.open(e.body_path, "rb")
  if not body then return nil, "no body" end
  body:close()
  for _, r in ipairs(e.rcpt) do
    r.state, r.attempts, r.next_attempt = "pending", 0, e.received_at
  end
  for _, ev in ipairs(M.parse_log(readfile(p.queue .. "/" .. id .. ".log"))) do
    local r = e.rcpt[tonumber(ev[1])]
    if ev.kind == "attempt" and r then
      r.attempts = r.attempts + 1
      r.last_attempt, r.next_attempt = ev.time, tonumber(ev[3]) or ev.time
      r.last_reply, r.remote_mta = ev[4], ev[5] ~= "" and ev[5] or nil
      if ev[2] == "ok" then
        r.state, r.action = "done", ev[6] ~= "" and ev[6] or "relayed"
      end
    elseif ev.kind == "final" and r then
      r.state, r.action, r.status = "done", ev[2], ev[3]
      r.last_reply, r.remote_mta = ev[4], ev[5] ~= "" and ev[5] or nil
    elseif ev.kind == "warned" and r then r.warned = true
    elseif ev.kind == "hold" then e.held = true
    elseif ev.kind == "release" then e.held = false; e.flush = true
    elseif ev.kind == "delete" then e.deleted = true
    elseif ev.kind == "bounce" then e.bounce = true
    elseif ev.kind == "flush" then e.flush = true
    end
  end
  return e
end

--- scan(p [, cleanup]) -> { entry, ... } sorted by arrival; with
-- cleanup (the queue's owner at start) removes tmp/ and every body or
-- log without an envelope.
function M.scan(p, cleanup)
  if cleanup then
    for _, name in ipairs(core.listdir(p.tmp) or {}) do os.remove(p.tmp .. "/" .. name) end
  end
  local names = core.listdir(p.queue) or {}
  local have_env = {}
  for _, name in ipairs(names) do
    local id = name:match("^([%w]+)%.env$")
    if id then have_env[id] = true end
  end
  local entries = {}
  for _, name in ipairs(names) do
    local id, ext = name:match("^([%w]+)%.(%w+)$")
    if id and ext == "env" then
      local e = M.load(p, id)
      if e then
        entries[#entries + 1] = e
      elseif cleanup then
        M.remove_entry(p, id, true)
      end
    elseif cleanup and (not id or not have_env[id]) then
      os.remove(p.queue .. "/" .. name)
    end
  end
  table.sort(entries, function(a, b)
    if a.received_at ~= b.received_at then return a.received_at < b.received_at end
    return a.id < b.id
  end)
  return entries
end

--- notify(p, name): drop a notice for a running scheduler (the entry ID,
-- or "flush" / "flush.DEST"); written whole and renamed into control/.
function M.notify(p, name)
  local tmp = p.tmp .. "/notice." .. core.getpid() .. "." .. M.new_id()
  local f = io.open(tmp, "wb")
  if not f then return nil end
  f:close()
  return os.rename(tmp, p.control .. "/" .. M.enc(name):gsub("/", "%%2F"))
end

return M
