--- luasmtp queue [--dir DIR] [--json] COMMAND [ARG]
--
-- Shows and manages a queue directory, also while a server runs on it:
-- the tool never rewrites the queue's files. hold, release, delete and
-- bounce append one line to the entry's state log (the same locked,
-- fsynced append the scheduler uses) and drop a notice into control/;
-- the scheduler reads the notices every tick and applies them, and a
-- queue opened later reads the same lines. flush leaves a notice only.
-- The tool never takes the directory's lock (DIR/lock, held by the
-- queue that owns the directory): it would keep that queue from
-- starting.
local getopt = require "luasmtp.getopt"
local json = require "luasmtp.json"
local core = require "luasmtp.core"
local queue = require "luasmtp.queue"
local store = require "luasmtp.queue.store"

local M = {}

local USAGE = [[
usage: luasmtp queue [--dir DIR] [--json] COMMAND [ARG]

commands:
  list               the queued messages (mailq)
  stats              messages, recipients, held, oldest, per destination
  show ID            one message: envelope, each recipient's state, headers
  flush [DEST]       retry now everything (or DEST: a domain or destination key)
  hold ID            keep the message from delivery
  release ID         deliver it again (at once)
  delete ID          remove it without a notice
  bounce ID          fail its pending recipients: a notice to the sender

--dir defaults to $LUASMTP_QUEUE_DIR, else /var/spool/luasmtp.
]]

local function iso(t)
  return t and os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(t)) or nil
end

local function entries(p)
  local out = {}
  for _, e in ipairs(store.scan(p, false)) do
    if not e.deleted then out[#out + 1] = e end
  end
  return out
end

local function rcpt_view(r)
  return { address = r.address, state = r.state, action = r.action, attempts = r.attempts,
    next_attempt = r.state == "pending" and iso(r.next_attempt) or nil, last_attempt = iso(r.last_attempt),
    last_reply = r.last_reply, remote_mta = r.remote_mta, notify = r.notify, orcpt = r.orcpt }
end

local function entry_view(e)
  local rcpts = {}
  for i, r in ipairs(e.rcpt) do rcpts[i] = rcpt_view(r) end
  return { id = e.id, from = e.from, size = e.size, received_at = iso(e.received_at), held = e.held or false,
    ret = e.ret, envid = e.envid, recipients = json.array(rcpts) }
end

local function out(s) io.stdout:write(s, "\n") end

local function find(p, id)
  if not id or not id:match("^%w+$") then getopt.usage_error("an ID is needed") end
  local e = store.load(p, id)
  if not e or e.deleted then
    io.stderr:write("luasmtp queue: no message ", id, "\n")
    return nil
  end
  return e
end

local function headers_of(e)
  local head = store.read_body(e, 65536) or ""
  return head:match("^(.-)\r?\n\r?\n") or head
end

local commands = {}

function commands.list(p, opts)
  local list = entries(p)
  if opts.json then
    local v = {}
    for i, e in ipairs(list) do v[i] = entry_view(e) end
    out(json.encode(json.array(v)))
    return 0
  end
  if #list == 0 then out("queue is empty") return 0 end
  for _, e in ipairs(list) do
    out(("%s %s %8d %s  <%s>"):format(e.id, e.held and "!" or " ", e.size or 0, iso(e.received_at), e.from))
    for _, r in ipairs(e.rcpt) do
      if r.state == "pending" then
        out(("    %s%s"):format(r.address, r.last_reply and ("  (" .. r.last_reply .. ")") or ""))
      end
    end
  end
  return 0
end

function commands.stats(p, opts)
  local s = queue.stats(entries(p))
  if opts.json then
    s.oldest = iso(s.oldest)
    out(json.encode(s))
    return 0
  end
  out(("messages %d, recipients %d, held %d, oldest %s"):format(s.messages, s.recipients, s.held,
    s.oldest and iso(s.oldest) or "-"))
  local keys = {}
  for k in pairs(s.destinations) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, k in ipairs(keys) do out(("  %-40s %d"):format(k, s.destinations[k])) end
  return 0
end

function commands.show(p, opts, id)
  local e = find(p, id)
  if not e then return 1 end
  local v = entry_view(e)
  v.headers = headers_of(e)
  if opts.json then out(json.encode(v)) return 0 end
  out("id: " .. e.id)
  out("from: <" .. e.from .. ">")
  out("received: " .. iso(e.received_at) .. "  size: " .. (e.size or 0) .. (e.held and "  (held)" or ""))
  for _, r in ipairs(v.recipients) do
    out(("rcpt: <%s> %s%s attempts %d%s%s"):format(r.address, r.state, r.action and (" " .. r.action) or "",
      r.attempts, r.next_attempt and (" next " .. r.next_attempt) or "", r.last_reply and (": " .. r.last_reply) or ""))
  end
  out("")
  out(v.headers)
  return 0
end

local function operation(kind)
  return function(p, _, id)
    local e = find(p, id)
    if not e then return 1 end
    local ok, _, detail = store.append(p, e.id, store.log_line(kind, core.time()))
    if not ok then
      io.stderr:write("luasmtp queue: ", tostring(detail), "\n")
      return 1
    end
    -- the state line is what counts; the notice only makes a running
    -- queue read it now instead of at its next start
    if not store.notify(p, e.id) then
      io.stderr:write("luasmtp queue: ", e.id, ": no notice left for the running queue; it applies the ",
        kind, " when it next opens the directory\n")
    end
    out(e.id .. ": " .. kind)
    return 0
  end
end
commands.hold = operation("hold")
commands.release = operation("release")
commands.delete = operation("delete")
commands.bounce = operation("bounce")

function commands.flush(p, _, dest)
  local ok, err = store.notify(p, dest and ("flush." .. dest) or "flush")
  if not ok then
    io.stderr:write("luasmtp queue: flush: ", tostring(err or "the notice could not be written"), "\n")
    return 1
  end
  out("flush" .. (dest and (" " .. dest) or "") .. ": asked")
  return 0
end

function M.main(argv)
  local ok, opts, rest = pcall(getopt.parse, argv, { dir = "string", json = "flag", help = "flag" })
  if not ok then
    io.stderr:write("luasmtp queue: ", type(opts) == "table" and opts.message or tostring(opts), "\n", USAGE)
    return 64
  end
  if opts.help then io.stdout:write(USAGE) return 0 end
  local fn = commands[rest[1] or ""]
  if not fn then
    io.stderr:write(USAGE)
    return 64
  end
  local dir = opts.dir or os.getenv("LUASMTP_QUEUE_DIR") or "/var/spool/luasmtp"
  local p = store.paths(dir)
  if not core.listdir(p.queue) then
    io.stderr:write("luasmtp queue: ", dir, " is not a queue directory\n")
    return 1
  end
  local res
  ok, res = pcall(fn, p, opts, rest[2])
  if not ok then
    if type(res) == "table" and res.usage then
      io.stderr:write("luasmtp queue: ", res.message, "\n", USAGE)
      return 64
    end
    error(res, 0)
  end
  return res
end

return M
