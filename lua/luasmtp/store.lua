--- luasmtp.store: delivering accepted messages to disk, durably.
--
-- maildir(dir):deliver(message) writes into tmp/, fsyncs the file,
-- renames it into new/ and fsyncs the directory, so a message that got
-- its 250 reply survives a crash. On failure nothing half-written is
-- left and a reply is returned for the client: 452 4.3.1 when the disk
-- or quota is full, 451 4.3.0 otherwise.
local core = require "luasmtp.core"

local M = {}

local function failure_reply(kind, detail)
  local server = require "luasmtp.server"
  if kind == "full" then
    return server.reply(452, "4.3.1", "Insufficient system storage")
  end
  return server.reply(451, "4.3.0", "Local error in processing"), detail
end

local function data_of(message)
  if type(message) == "string" then return message end
  return message:read()
end

local seq = 0
local hostname = (core.gethostname() or "localhost"):gsub("[/:]", "_")

local Maildir = {}
Maildir.__index = Maildir

--- maildir(dir) -> store; creates dir/{tmp,new,cur} if needed.
function M.maildir(dir)
  assert(type(dir) == "string", "maildir needs a directory")
  for _, sub in ipairs { "", "/tmp", "/new", "/cur" } do
    assert(core.mkdir(dir .. sub))
  end
  return setmetatable({ dir = dir }, Maildir)
end

--- store:deliver(message) -> filename | nil, reply, detail
function Maildir:deliver(message)
  seq = seq + 1
  local t = core.time()
  local name = ("%d.M%dP%dQ%d.%s"):format(math.floor(t), math.floor((t % 1) * 1e6), core.getpid(), seq, hostname)
  local tmp = self.dir .. "/tmp/" .. name
  local final = self.dir .. "/new/" .. name
  local ok, _, detail, kind = core.write_file_sync(tmp, data_of(message))
  if not ok then
    return nil, failure_reply(kind, detail)
  end
  local renamed, rerr = os.rename(tmp, final)
  if not renamed then
    os.remove(tmp)
    return nil, failure_reply("other", rerr)
  end
  ok, _, detail, kind = core.fsync_dir(self.dir .. "/new")
  if not ok then
    return nil, failure_reply(kind, detail)
  end
  return final
end

local tmp_seq = 0

--- replace_file(path, data [, mode]) -> true | nil, "io", detail, kind
-- Durably replace (or create) path with data: write a temporary file
-- beside it, fsync it, rename it over path and fsync the directory. A
-- reader sees the old contents or the new, never a mix; a crash leaves
-- at most a stray "path.tmp.*" file. kind is as for write_file_sync.
function M.replace_file(path, data, mode)
  tmp_seq = tmp_seq + 1
  local tmp = ("%s.tmp.%d.%d"):format(path, core.getpid(), tmp_seq)
  os.remove(tmp) -- a leftover of a crashed process with the same pid
  local ok, token, detail, kind = core.write_file_sync(tmp, data, mode)
  if not ok then
    return nil, token, detail, kind
  end
  local renamed, rerr = os.rename(tmp, path)
  if not renamed then
    os.remove(tmp)
    return nil, "io", rerr, "other"
  end
  local dir = path:match("^(.*)/[^/]*$") or "."
  if dir == "" then dir = "/" end
  return core.fsync_dir(dir)
end

local Mbox = {}
Mbox.__index = Mbox

--- mbox(path) -> store: appends in mboxrd format under a lock.
function M.mbox(path)
  return setmetatable({ path = path }, Mbox)
end

--- store:deliver(message [, from]) -> true | nil, reply, detail
function Mbox:deliver(message, from)
  local data = data_of(message):gsub("\r\n", "\n")
  -- mboxrd: quote From_ lines (and already quoted ones) with one more '>'
  data = ("\n" .. data):gsub("\n(>*From )", "\n>%1"):sub(2)
  if data:sub(-1) ~= "\n" then data = data .. "\n" end
  local sender = from or (type(message) == "table" and message.from) or "MAILER-DAEMON"
  if sender == "" then sender = "MAILER-DAEMON" end
  local entry = ("From %s %s\n%s\n"):format(sender, os.date("!%a %b %e %H:%M:%S %Y"), data)
  local ok, _, detail, kind = core.append_file_sync(self.path, entry)
  if not ok then
    return nil, failure_reply(kind, detail)
  end
  return true
end

return M
