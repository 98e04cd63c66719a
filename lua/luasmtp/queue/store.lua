--- luasmtp.queue.store: the queue's files on disk.
--
-- A queue directory holds
--   segments/ ID.seg: files of records, each a new entry (envelope and
--             body together) or the end of one; most mail lives only
--             here, from its 250 to its delivery. ID.spare: the next
--             segment, written full of zeros ahead of its use
--   queue/    entries in files of their own: ID.body (the message),
--             ID.env (the envelope: its presence is what makes the entry
--             exist); and ID.log, any entry's per-recipient state
--             (append-only, one fsynced line per event)
--   tmp/      files being written (removed at start: never delivered)
--   control/  notices from `luasmtp queue` to a running scheduler
--
-- The fast path: enqueue writes one record (header, envelope, body) at
-- the end of the current segment's records and waits for an fdatasync
-- of the segment that began after the write (one shared by every entry
-- written meanwhile: group commit; a segment's directory entry is
-- fsynced before its first record counts). A segment is a spare that was
-- written full of zeros and fsynced before it took a record, so the
-- fsync after one writes only that record's blocks. The end of the
-- entry is a second, small record in the same segment; its fsync is
-- asked for, not waited for (the next round covers it, else one
-- END_DELAY later). A segment that takes no more records (it reached
-- SEGMENT_MAX) and whose entries have all ended is removed. No file is
-- created, renamed or removed per message.
--
-- Entries that must wait take files of their own (migrate): after an
-- attempt that leaves a recipient pending, once held, or SEGMENT_WAIT
-- seconds after arrival. Their body and envelope go to tmp/, are fsynced
-- (at once, in worker threads: core.fsync_paths), renamed into queue/
-- and queue/ fsynced (one directory fsync shared by the entries renamed
-- meanwhile: sync_dir); then the segment's record is ended. So an old
-- entry never keeps a segment (and its neighbours' bytes) on the disk.
-- Bodies larger than INLINE_MAX, and a server's spooled body (linked,
-- not copied), take files from the start.
--
-- Records are checked when read: a header line "R ID ENVLEN BODYLEN CRC"
-- (then the envelope and the body) or "D ID CRC", the CRC-32 over the
-- header's fields and the bytes. Everything up to an fsync is on disk,
-- so what a crash can leave torn is a tail of records never
-- acknowledged; reading stops at the first record that does not check
-- (zeros never do), and the owner truncates the segment there at start.
-- A write that fails is overwritten with zeros, so no record follows
-- one that was torn. After a crash an
-- entry is whole or it was never acknowledged: an envelope file whose
-- body is missing, and a body or log without an entry, are half-written
-- or half-removed, removed at start. Removal of an entry in files goes
-- envelope first.
--
-- Envelopes and logs are lines of space-separated fields, each
-- percent-encoded (see enc), so no value can split a line or a field.
local core = require "luasmtp.core"

local M = {}

M.FORMAT = "luasmtp-queue 1"

--- enc(s) -> a field: bytes outside printable ASCII, space and "%"
-- as %XX; the empty string as a lone "%".
local UNSAFE = "[^%w%.%-_@+=:/<>!#$&'*,;?^`{|}~%[%]\"()\\]"

function M.enc(s)
  s = tostring(s == nil and "" or s)
  if s == "" then return "%" end
  if not s:find(UNSAFE) then return s end -- the usual case: nothing to encode
  return (s:gsub(UNSAFE, function(c)
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

--- Bodies up to this size are written into a segment.
M.INLINE_MAX = 1024 * 1024
--- A segment takes new records until it is this large.
M.SEGMENT_MAX = 4 * 1024 * 1024
--- Seconds after its arrival an entry still in a segment gets files.
M.SEGMENT_WAIT = 120
--- Bytes of messages kept in memory, in all, for entries written into a
-- segment until their first attempt (which then reads no file).
M.CACHE_MAX = 32 * 1024 * 1024
-- What a record's header may say (a larger one is not ours: the end).
local MAX_ENVELOPE, MAX_RECORD_BODY = 64 * 1024 * 1024, 1024 * 1024 * 1024

--- paths(dir) -> { tmp, queue, control, segments }
function M.paths(dir)
  return { dir = dir, tmp = dir .. "/tmp", queue = dir .. "/queue", control = dir .. "/control",
    segments = dir .. "/segments", segs = {} }
end

function M.init(dir)
  local p = M.paths(dir)
  for _, d in ipairs { p.dir, p.tmp, p.queue, p.control, p.segments } do
    local ok, token, detail = core.mkdir(d)
    if not ok then return nil, token, detail end
  end
  return p
end

--- new_id() -> a queue ID: time in seconds (hex), then 64 random bits;
-- unique across restarts and processes without shared state.
function M.new_id()
  return ("%09X%02X%02X%02X%02X%02X%02X%02X%02X"):format(math.floor(core.time()), core.random(8):byte(1, 8))
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

local function io_error(err, errno)
  return nil, "io", err, errno == 28 and "full" or "other"
end

--- append(p, id, text) -> true | nil, token, detail, kind: one durable
-- append to ID.log (locked, fsynced; the tool and the scheduler share it).
function M.append(p, id, text)
  return core.append_file_sync(p.queue .. "/" .. id .. ".log", text)
end

-- A body given as a string, a file, a chunk function, or an object with
-- :chunks() (a server message, a sink) as a function returning its next
-- chunk (nil at the end; nil, why when it fails).
local function chunk_reader(body)
  if type(body) == "string" then
    local s = body
    return function()
      local c = s
      s = nil
      return c
    end
  elseif io.type(body) == "file" then
    return function() return body:read(65536) end
  elseif type(body) == "function" then
    return body
  elseif (type(body) == "table" or type(body) == "userdata") and body.chunks then
    local it, st, ctl = body:chunks(65536)
    return function()
      local c = it(st, ctl)
      ctl = c
      return c
    end
  end
  error("enqueue: body must be a string, a file, a function or have :chunks()", 4)
end

local function spooled_message(body)
  return type(body) == "table" and body.sink and body.spooled and body:spooled()
end

-- The body as one string when it is at most INLINE_MAX bytes and not a
-- spooled server message: data | nil, parts, next_chunk (what was read,
-- and the rest) | nil, nil, nil, why.
local function take_inline(body)
  if type(body) == "string" then
    if #body <= M.INLINE_MAX then return body end
    return nil, { body }, function() return nil end
  end
  if spooled_message(body) then return nil, {}, nil end
  if type(body) == "table" and body.sink and body.read and body:size() <= M.INLINE_MAX then
    return body:read()
  end
  local next_chunk = chunk_reader(body)
  local parts, size = {}, 0
  while size <= M.INLINE_MAX do
    local chunk, why = next_chunk()
    if chunk == nil then
      if why then return nil, nil, nil, "body: " .. tostring(why) end
      return table.concat(parts)
    end
    parts[#parts + 1] = chunk
    size = size + #chunk
  end
  return nil, parts, next_chunk
end

-- Write a body to path, not yet fsynced: the parts already read, then
-- what next_chunk returns; a server message that arrived in a spool file
-- and was not edited becomes the file by a hard link (no copy). Returns
-- its size.
local function write_body(path, body, parts, next_chunk)
  if spooled_message(body) then
    if body.unedited and body:unedited() then
      local ok, token, detail, kind = body.sink:commit(path, false)
      if ok then return body:size() end
      return nil, token, detail, kind
    end
    parts, next_chunk = {}, chunk_reader(body)
  end
  local f, err, errno = io.open(path, "wb")
  if not f then return io_error(err, errno) end
  local size, i = 0, 0
  while true do
    local chunk, why
    i = i + 1
    if parts[i] then chunk = parts[i] elseif next_chunk then chunk, why = next_chunk() end
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
      return io_error(werr, werrno)
    end
    size = size + #chunk
  end
  local ok, cerr, cerrno = f:close()
  if not ok then
    os.remove(path)
    return io_error(cerr, cerrno)
  end
  return size
end

local function write_text(path, text)
  local f, err, errno = io.open(path, "wb")
  if not f then return io_error(err, errno) end
  local ok, werr, werrno = f:write(text)
  local closed, cerr, cerrno = f:close()
  if ok and closed then return true end
  os.remove(path)
  return io_error(werr or cerr, werrno or cerrno)
end

-- How long a durable write may wait for the disk before it fails.
M.SYNC_TIMEOUT = 60

-- group_sync(p, key, path) -> true | nil, token, detail, kind: fsync
-- path after writes, renames or unlinks (group commit). The fsync that
-- covers a caller is the first one to start after its call; while one
-- runs, every caller arriving waits for the next, which then serves
-- them all: many entries written in one loop pass share one fsync.
-- With nowait the fsync is asked for and the caller goes on: the next
-- round covers it, one that a waiting caller starts, else one started
-- END_DELAY seconds later.
M.END_DELAY = 0.05

local function run_group(p, key, path, g)
  while g.finished < g.wanted do
    core.sleep(0) -- what other tasks append in this pass of the loop joins
    local epoch = g.started + 1
    g.started = epoch
    local ok, token, detail, kind = core.fsync_paths({ path }, M.SYNC_TIMEOUT, g.datasync)
    if not ok then g.failed[epoch] = { token, detail, kind } end
    g.failed[epoch - 64] = nil
    g.finished = epoch
    g.cond:broadcast()
  end
  g.running = false
  if g.drop then p.groups[key] = nil end
end

-- Run the group's rounds unless a task already does.
local function start_group(p, key, path, g)
  if not g.running then
    g.running = true
    run_group(p, key, path, g)
  end
end

-- Directories get fsync; segment files fdatasync (their data, and the
-- size when it grew; not their times).
local DIRECTORY_KEYS = { ["queue/"] = true, ["segments/"] = true }

local function group_sync(p, key, path, nowait)
  p.groups = p.groups or {}
  local g = p.groups[key]
  if not g then
    g = { started = 0, finished = 0, wanted = 0, running = false, cond = core.cond(), failed = {},
      datasync = not DIRECTORY_KEYS[key], path = path }
    p.groups[key] = g
  end
  local need = g.started + 1
  if need > g.wanted then g.wanted = need end
  if nowait then
    if not g.running and not g.later then
      g.later = true
      core.spawn(function()
        core.sleep(M.END_DELAY)
        g.later = false
        start_group(p, key, path, g)
      end)
    end
    return true
  end
  start_group(p, key, path, g)
  local deadline = core.update_now() + 2 * M.SYNC_TIMEOUT
  while g.finished < need do
    local left = deadline - core.update_now()
    if left <= 0 then return nil, "timeout", path .. ": fsync did not finish", "other" end
    g.cond:wait(left)
  end
  local f = g.failed[need]
  if f then return nil, f[1], f[2], f[3] end
  return true
end

-- Segment files kept open at most (a queue holding mail it cannot send
-- yet may have many segments, each waiting only for end records).
M.FILES_MAX = 16

-- The segment's file for a write: kept open while the segment is in use
-- (closed by reclaim, store.close or the collector). Past FILES_MAX the
-- others are closed (they open again for their next end record). A
-- failed open reports through the path.
-- Close a segment's file (reclaim, store.close, the cap below).
local function close_file(seg)
  if seg.file then
    seg.file:close()
    seg.file = nil
  end
end

--- close(p): the segment files kept open for records are closed (the
-- queue is closed; a later write opens its file again).
function M.close(p)
  for _, seg in pairs(p.segs) do close_file(seg) end
end

local function file_of(p, seg)
  if seg.file then return seg.file end
  -- opening one is rare (once per segment, or after the cap): count then
  local open = 0
  for _, other in pairs(p.segs) do
    if other.file then open = open + 1 end
  end
  if open >= M.FILES_MAX then M.close(p) end
  seg.file = core.open_record_file(seg.path)
  return seg.file or seg.path
end

--- settle(p): every fsync asked for without a wait (end records) has
-- run when this returns (at most 2 * SYNC_TIMEOUT later).
function M.settle(p)
  local list = {}
  for key, g in pairs(p.groups or {}) do list[#list + 1] = { key, g } end
  local deadline = core.update_now() + 2 * M.SYNC_TIMEOUT
  for _, item in ipairs(list) do
    local key, g = item[1], item[2]
    local target = g.wanted
    start_group(p, key, g.path, g)
    while g.finished < target and core.update_now() < deadline do
      g.cond:wait(deadline - core.update_now())
    end
  end
end

--- sync_dir(p) -> true | nil, token, detail, kind: fsync queue/ after
-- renames or unlinks there, shared as group_sync says.
function M.sync_dir(p)
  return group_sync(p, "queue/", p.queue)
end

-- write_files(p, entry, body, parts, next_chunk): the entry in files of
-- its own (see the top); entry.size set.
local function write_files(p, entry, body, parts, next_chunk)
  local id = entry.id
  local tbody, tenv = p.tmp .. "/" .. id .. ".body", p.tmp .. "/" .. id .. ".env"
  local qbody, qenv = p.queue .. "/" .. id .. ".body", p.queue .. "/" .. id .. ".env"
  local size, token, detail, kind = write_body(tbody, body, parts, next_chunk)
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
  entry.body_path = qbody
  return true
end

-- Segment records (see the top).
-- The CRC of a record's fields, to be continued over its bytes.
local function fields_crc(id, elen, blen)
  return core.crc32(("%s %d %d"):format(id, elen, blen))
end

local function record_crc(id, env, data)
  return core.crc32(data, core.crc32(env, fields_crc(id, #env, #data)))
end

--- record(id, envelope, body) -> the header line of an entry's record
function M.record(id, env, data)
  return ("R %s %d %d %08x\n"):format(id, #env, #data, record_crc(id, env, data))
end

--- end_record(id) -> the record that ends an entry
function M.end_record(id)
  return ("D %s %08x\n"):format(id, core.crc32("D " .. id))
end

-- The end records of a list of IDs, as one string.
local function end_text(ids)
  local recs = {}
  for i, id in ipairs(ids) do recs[i] = M.end_record(id) end
  return table.concat(recs)
end

--- read_segment(path) -> { records = { {id, env, body_off, body_len} },
-- ended = { [id] = true }, valid = bytes that check, size } | nil
-- Reads records until the end or the first one that does not check.
function M.read_segment(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local size = f:seek("end") or 0
  local pos, recs, ended = 0, {}, {}
  while pos < size do
    f:seek("set", pos)
    local line = (f:read(160) or ""):match("^([^\n]*)\n")
    if not line then break end
    local hstart = pos + #line + 1
    local id, elen, blen, crc = line:match("^R (%w+) (%d+) (%d+) (%x+)$")
    if id then
      elen, blen = tonumber(elen), tonumber(blen)
      if elen > MAX_ENVELOPE or blen > MAX_RECORD_BODY or hstart + elen + blen > size then break end
      f:seek("set", hstart)
      local env = f:read(elen)
      if not env or #env ~= elen then break end
      local sum, left = core.crc32(env, fields_crc(id, elen, blen)), blen
      while left > 0 do
        local piece = f:read(math.min(left, 65536))
        if not piece then break end
        sum, left = core.crc32(piece, sum), left - #piece
      end
      if left > 0 or sum ~= tonumber(crc, 16) then break end
      recs[#recs + 1] = { id = id, env = env, body_off = hstart + elen, body_len = blen }
      pos = hstart + elen + blen
    else
      id, crc = line:match("^D (%w+) (%x+)$")
      if not id or core.crc32("D " .. id) ~= tonumber(crc, 16) then break end
      ended[id] = true
      pos = hstart
    end
  end
  f:close()
  return { records = recs, ended = ended, valid = pos, size = size }
end

-- A segment that takes no more records and holds no entry goes.
local function reclaim(p, seg)
  if seg.current or seg.live > 0 then return end
  close_file(seg)
  os.remove(seg.path)
  p.segs[seg.name] = nil
  local g = p.groups and p.groups[seg.path]
  if g then
    if g.running then g.drop = true else p.groups[seg.path] = nil end
  end
end

-- A spare segment, segments/ID.spare: SEGMENT_MAX bytes of zeros,
-- written and fsynced before it takes a record (then it is renamed to
-- ID.seg). Records then overwrite blocks the file already has, so the
-- fsync after one writes only them: not the file's size, not newly
-- allocated blocks. Reading stops at the zeros (no record starts with
-- one). A spare left by a process that ended is removed at open.
local function prepare_spare(p)
  if p.spare or p.preparing then return end
  p.preparing = true
  core.spawn(function()
    local name = M.new_id()
    local path = p.segments .. "/" .. name .. ".spare"
    local f = io.open(path, "wb")
    local ok = f ~= nil
    if f then
      local zeros = ("\0"):rep(math.min(256 * 1024, M.SEGMENT_MAX))
      local written = 0
      while ok and written < M.SEGMENT_MAX do
        ok = f:write(written + #zeros <= M.SEGMENT_MAX and zeros or zeros:sub(1, M.SEGMENT_MAX - written)) and true
        written = written + #zeros
        core.sleep(0) -- the loop goes on between pieces
      end
      ok = f:close() and ok
      ok = ok and core.fsync_paths({ path }, M.SYNC_TIMEOUT)
    end
    p.preparing = false
    if ok then
      p.spare = { name = name, path = path, size = 0, live = 0, current = false, prealloc = true }
    else
      os.remove(path)
    end
  end)
end

-- The segment new records go to: a new one when there is none or the
-- current one is full, the spare when one is ready (else an empty new
-- file; either's directory entry is fsynced with its first records,
-- seg.durable). One made while no spare was ready gives way to the spare
-- once it holds an eighth of SEGMENT_MAX.
local function current_segment(p)
  local seg = p.current
  local full = seg and (seg.prealloc and M.SEGMENT_MAX or p.spare and M.SEGMENT_MAX // 8 or M.SEGMENT_MAX)
  if seg and not seg.sealed and seg.size < full then return seg end
  if seg then
    seg.current, p.current = false, nil
    reclaim(p, seg)
  end
  seg, p.spare = p.spare, nil
  local spare_path = seg and seg.path
  local seg_path = seg and p.segments .. "/" .. seg.name .. ".seg"
  if seg and os.rename(spare_path, seg_path) then
    -- its new name is fsynced with its first records (seg.durable)
    seg.path, seg.current, seg.durable = seg_path, true, false
  else
    if seg then os.remove(spare_path) end
    local name = M.new_id()
    local path = p.segments .. "/" .. name .. ".seg"
    local f, err, errno = io.open(path, "wb")
    if not f then return io_error(err, errno) end
    f:close()
    seg = { name = name, path = path, size = 0, live = 0, current = true, durable = false }
  end
  p.segs[seg.name], p.current = seg, seg
  prepare_spare(p)
  return seg
end

-- write_at(p, seg, ...) -> true | nil, token, detail, kind: records at
-- the segment's end; one whose bytes could not be undone ends its use.
local function write_at(p, seg, ...)
  local target = file_of(p, seg)
  local ok, token, detail, kind, dirty = core.write_record(target, seg.size, ...)
  if ok then
    for i = 1, select("#", ...) do seg.size = seg.size + #(select(i, ...)) end
    return true
  end
  if dirty then seg.sealed = true end
  return nil, token, detail, kind
end

-- End records in seg for ids (and for any whose end could not be written
-- before); then the segment may go. Their fsync is asked for, not waited
-- for: nothing waits on an entry's end, and its window for a duplicate
-- after a crash (from the remote 250 to the end on disk) is the same.
local function end_records(p, seg, ids)
  local all = seg.undone or {}
  seg.undone = nil
  table.move(ids, 1, #ids, #all + 1, all)
  local ok, token, detail, kind = false, nil, nil, nil
  if not seg.sealed then ok, token, detail, kind = write_at(p, seg, end_text(all)) end
  if ok then group_sync(p, seg.path, seg.path, true) end
  -- a restart before the next end written here delivers these again
  if not ok then seg.undone = all end
  seg.live = seg.live - #ids
  reclaim(p, seg)
  return ok, token, detail, kind
end

-- An entry's message kept in memory (entry.data, see CACHE_MAX) goes.
local function uncache(p, e)
  if e.data then
    p.cached, e.data = p.cached - #e.data, nil
  end
end

-- write_record(p, entry, data): the entry as one record of the current
-- segment, durable when this returns true.
local function write_record(p, entry, data)
  local seg, token, detail, kind = current_segment(p)
  if not seg then return nil, token, detail, kind end
  entry.size = #data
  local env = M.encode_envelope(entry)
  local head = M.record(entry.id, env, data)
  local off = seg.size
  local ok
  ok, token, detail, kind = write_at(p, seg, head, env, data)
  if not ok then return nil, token, detail, kind end
  seg.live = seg.live + 1
  M.crash_point("enqueue_before_sync")
  if not seg.durable then
    ok, token, detail, kind = group_sync(p, "segments/", p.segments)
    if ok then seg.durable = true end
  end
  if ok then ok, token, detail, kind = group_sync(p, seg.path, seg.path) end
  if not ok then
    -- never acknowledged; after a failed fsync any page written since
    -- the last one may be lost, so this segment takes no more records
    if p.current == seg then seg.current, p.current = false, nil end
    end_records(p, seg, { entry.id })
    return nil, token, detail, kind
  end
  entry.segment, entry.seg_path, entry.body_off, entry.body_len = seg.name, seg.path, off + #head + #env, #data
  if (p.cached or 0) + #data <= M.CACHE_MAX then
    entry.data, p.cached = data, (p.cached or 0) + #data
  end
  return true
end

--- write_entry(p, entry, body) -> true | nil, token, detail, kind
-- The durable enqueue described above; entry.id set, entry.size set by
-- it; the entry is then in a segment (entry.segment) or in files
-- (entry.body_path).
function M.write_entry(p, entry, body)
  local data, parts, next_chunk, why = take_inline(body)
  if data then return write_record(p, entry, data) end
  if not parts then return nil, "io", why, "other" end
  return write_files(p, entry, body, parts, next_chunk)
end

--- migrate(p, entry) -> true | nil, token, detail, kind: an entry in a
-- segment gets files of its own (then its record ends). A crash between
-- the two leaves both; the files win at start.
function M.migrate(p, e)
  local seg = e.segment and p.segs[e.segment]
  if not seg then
    e.migrating = nil
    return true
  end
  -- one move at a time: a second one (its age, a hold, the end of an
  -- attempt) while the first waits for the disk would write the same
  -- tmp/ files, and its failed rename would remove the first one's
  if e.moving then return true end
  local data, why = M.read_body(e)
  if not data then
    e.migrating = nil
    return nil, "io", why, "other"
  end
  e.migrating, e.moving = true, true -- no attempt starts meanwhile (the scheduler skips it)
  local ok, token, detail, kind = write_files(p, e, data, { data })
  e.migrating, e.moving = nil, nil
  if not ok then return nil, token, detail, kind end
  e.segment, e.seg_path, e.body_off, e.body_len = nil, nil, nil, nil
  uncache(p, e)
  end_records(p, seg, { e.id })
  return true
end

--- read_body(entry [, max]) -> the message (its first max bytes) | nil, why
function M.read_body(e, max)
  if e.data then return (max and #e.data > max) and e.data:sub(1, max) or e.data end
  local path = e.seg_path or e.body_path
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local data
  if e.seg_path then
    local n = max and math.min(max, e.body_len) or e.body_len
    f:seek("set", e.body_off)
    data = n > 0 and f:read(n) or ""
    if data and #data ~= n then data = nil end
  else
    data = f:read(max or "a")
  end
  f:close()
  if not data then return nil, path .. ": short read" end
  return data
end

--- open_body(entry) -> what the client sends: the message (an entry in
-- a segment) or its open file | nil, why
function M.open_body(e)
  if e.seg_path then return M.read_body(e) end
  return io.open(e.body_path, "rb")
end

--- remove_entry(p, entry): the entry is gone. One in a segment: its end
-- record (its fsync asked for, see end_records). One in files: envelope
-- first, then the rest; the directory fsync is the shared one (sync_dir:
-- the caller waits while other tasks run).
function M.remove_entry(p, e)
  local id = e.id
  local seg = e.segment and p.segs[e.segment]
  uncache(p, e)
  if seg then
    e.segment = nil
    end_records(p, seg, { id })
    -- an entry that never had a log has none (a tool's log line that
    -- came meanwhile is an orphan removed at start)
    if e.logged then os.remove(p.queue .. "/" .. id .. ".log") end
    return
  end
  os.remove(p.queue .. "/" .. id .. ".env")
  M.sync_dir(p)
  os.remove(p.queue .. "/" .. id .. ".body")
  os.remove(p.queue .. "/" .. id .. ".log")
  os.remove(p.control .. "/" .. id)
end

local function init_state(e)
  for _, r in ipairs(e.rcpt) do
    r.state, r.attempts, r.next_attempt = "pending", 0, e.received_at
  end
  return e
end

--- apply_log(p, entry) -> entry: its ID.log applied. Each recipient
-- gets state ("pending" | "done"), attempts, next_attempt, last_reply,
-- remote_mta, last_attempt, action; the entry held, deleted, bounce
-- (asked for by the tool), flush.
function M.apply_log(p, e)
  local text = readfile(p.queue .. "/" .. e.id .. ".log")
  if text then e.logged = true end
  for _, ev in ipairs(M.parse_log(text)) do
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

--- flags(p, id) -> { held, deleted, bounce, flush } from the entry's log
function M.flags(p, id)
  return M.apply_log(p, { id = id, rcpt = {} })
end

-- An entry in files, with its log applied | nil, why.
local function load_files(p, id)
  local e, why = M.decode_envelope(readfile(p.queue .. "/" .. id .. ".env"))
  if not e then return nil, why end
  e.body_path = p.queue .. "/" .. id .. ".body"
  local body = io.open(e.body_path, "rb")
  if not body then return nil, "no body" end
  body:close()
  return M.apply_log(p, init_state(e))
end

local function sorted_names(dir)
  local names = core.listdir(dir) or {}
  table.sort(names)
  return names
end

-- Make a segment's valid records all there is of it, and end the
-- records that files superseded.
local function repair_segment(path, rd, superseded)
  if rd.valid < rd.size then
    core.truncate(path, rd.valid)
    rd.size = rd.valid
  end
  if #superseded > 0 then
    local text = end_text(superseded)
    if core.write_record(path, rd.size, text) then rd.size = rd.size + #text end
  end
  core.fsync_paths({ path }, M.SYNC_TIMEOUT)
end

--- scan(p [, cleanup]) -> { entry, ... } sorted by arrival; with
-- cleanup (the queue's owner at start): removes tmp/, every body or log
-- without an entry and every segment without one, truncates torn tails
-- of segments, and records the segments in p.segs (none is current: new
-- records go to a new one).
-- The segments are read before queue/ is listed: an entry a running
-- owner moves into files meanwhile (`luasmtp queue` reads beside it) is
-- then seen in its segment or in its files, and in both the files win.
function M.scan(p, cleanup)
  if cleanup then
    for _, name in ipairs(core.listdir(p.tmp) or {}) do os.remove(p.tmp .. "/" .. name) end
  end
  local segs = {}
  for _, name in ipairs(sorted_names(p.segments)) do
    local sname = name:match("^(%w+)%.seg$")
    local path = p.segments .. "/" .. name
    segs[#segs + 1] = { name = sname, path = path, rd = sname and M.read_segment(path) }
  end
  local names = sorted_names(p.queue)
  local in_files, live = {}, {}
  local entries = {}
  for _, name in ipairs(names) do
    local id = name:match("^([%w]+)%.env$")
    if id then
      local e = load_files(p, id)
      if e then
        entries[#entries + 1] = e
        in_files[id] = true
      elseif cleanup then
        -- half-written or half-removed: the envelope goes first, the
        -- body and the log below; the log stays when the entry lives on
        -- in its segment (a move into files cut short: it is its state)
        os.remove(p.queue .. "/" .. id .. ".env")
        core.fsync_dir(p.queue)
      end
    end
  end
  for _, s in ipairs(segs) do
    local sname, path, rd = s.name, s.path, s.rd
    if rd then
      local seg = { name = sname, path = path, live = 0, durable = true }
      local superseded = {}
      for _, rec in ipairs(rd.records) do
        if not rd.ended[rec.id] then
          local e = not (in_files[rec.id] or live[rec.id]) and M.decode_envelope(rec.env)
          if e and e.id == rec.id then
            e.segment, e.seg_path, e.body_off, e.body_len = sname, path, rec.body_off, rec.body_len
            entries[#entries + 1] = M.apply_log(p, init_state(e))
            live[rec.id], seg.live = true, seg.live + 1
          else
            superseded[#superseded + 1] = rec.id
          end
        end
      end
      if cleanup then
        if seg.live == 0 then
          os.remove(path)
        else
          repair_segment(path, rd, superseded)
          seg.size = rd.size
          p.segs[sname] = seg
        end
      end
    elseif cleanup and not sname then
      os.remove(path)
    end
  end
  if cleanup then
    for _, name in ipairs(names) do
      local id, ext = name:match("^([%w]+)%.(%w+)$")
      if not id or not (in_files[id] or (ext == "log" and live[id])) then
        os.remove(p.queue .. "/" .. name)
      end
    end
  end
  table.sort(entries, function(a, b)
    if a.received_at ~= b.received_at then return a.received_at < b.received_at end
    return a.id < b.id
  end)
  return entries
end

--- load(p, id) -> the entry (in files or in a segment) with its log
-- applied | nil, why
function M.load(p, id)
  local e, why = load_files(p, id)
  if e then return e end
  for _, s in ipairs(M.scan(p, false)) do
    if s.id == id then return s end
  end
  return nil, why
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
