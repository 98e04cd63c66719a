--- luasmtp.store: delivering accepted messages to disk, durably.
--
-- maildir(dir):deliver(message) writes into tmp/, fsyncs the file,
-- renames it into new/ and fsyncs the directory, so a message that got
-- its 250 reply survives a crash. On failure nothing half-written is
-- left and a reply is returned for the client: 452 4.3.1 when the disk
-- or quota is full, 451 4.3.0 otherwise.
--
-- A message is a string or a server message (luasmtp.server.message):
-- the latter is streamed from its header view and body store, never
-- made into one string.
local core = require "luasmtp.core"
local reply = require "luasmtp.reply"

local M = {}

local function failure_reply(kind, detail)
  if kind == "full" then
    return reply.new(452, "4.3.1", "Insufficient system storage")
  end
  return reply.new(451, "4.3.0", "Local error in processing"), detail
end

-- The data argument for core.write_file_sync: the string, or the
-- message's chunk iterator.
local function source_of(message)
  if type(message) == "string" then return message end
  return message:chunks(65536)
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
  -- A message as it arrived whose spool file is on this file system
  -- becomes the mail file itself: fsync, link into new/, fsync new/.
  if type(message) == "table" and message.sink and message:unedited() and message:spooled() then
    if message.sink:commit(final) then return final end
    os.remove(final) -- another file system (or a failure): write a copy instead
  end
  local ok, _, detail, kind = core.write_file_sync(tmp, source_of(message))
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

-- mboxrd, piece by piece: CRLF becomes LF and lines starting with
-- ">*From " get one more ">". A line may span pieces: only complete
-- lines are converted, the rest waits for the next piece.
local function mboxrd(next_piece, from_line)
  local state = "from" -- from, body, done
  local carry = ""
  local last = "\n"
  local function convert(lines)
    lines = ("\n" .. lines):gsub("\r\n", "\n"):gsub("\n(>*From )", "\n>%1"):sub(2)
    if lines ~= "" then last = lines:sub(-1) end
    return lines
  end
  return function()
    if state == "from" then
      state = "body"
      return from_line
    end
    while state == "body" do
      local piece = next_piece()
      if not piece then
        state = "done"
        local tail = carry ~= "" and convert(carry) or ""
        carry = ""
        -- the entry ends with its own newline and a blank line
        return tail .. (((tail ~= "" and tail:sub(-1) or last) == "\n") and "\n" or "\n\n")
      end
      local data = carry .. piece
      local cut = data:match(".*()\n")
      if cut then
        carry = data:sub(cut + 1)
        return convert(data:sub(1, cut))
      end
      carry = data
    end
    return nil
  end
end

--- store:deliver(message [, from]) -> true | nil, reply, detail
function Mbox:deliver(message, from)
  local sender = from or (type(message) == "table" and message.from) or "MAILER-DAEMON"
  if sender == "" then sender = "MAILER-DAEMON" end
  local from_line = ("From %s %s\n"):format(sender, os.date("!%a %b %e %H:%M:%S %Y"))
  local pieces
  if type(message) == "string" then
    local done = false
    pieces = function()
      if done then return nil end
      done = true
      return message
    end
  else
    pieces = message:chunks(65536)
  end
  local ok, _, detail, kind = core.append_file_sync(self.path, mboxrd(pieces, from_line))
  if not ok then
    return nil, failure_reply(kind, detail)
  end
  return true
end

return M
