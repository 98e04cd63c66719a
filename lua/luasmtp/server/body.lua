--- luasmtp.server.body: where a message body goes while it arrives.
--
-- A body store keeps small bodies in memory and moves larger ones to a
-- spool file in the given directory (the store's own directory, so the
-- file is on the same file system as the mail it becomes). The spool
-- file is unlinked as soon as it is open, so a crash leaves nothing
-- behind. The interface is the C core's body sink (core.sink) when the
-- module has one; this file is the only place that knows which is used.
--
--   local body = body_store.new{ dir = "var/mail/tmp", threshold = 1048576 }
--   body:write(piece) ... body:size(), body:spooled(), body:chunks(65536),
--   body:read() (small bodies), body:discard()
local core = require "luasmtp.core"

local M = {}

local Body = {}
Body.__index = Body

local seq = 0

--- new{ dir =, threshold = } -> body store
function M.new(opts)
  if core.sink then
    return core.sink(opts)
  end
  return setmetatable({
    dir = opts.dir or os.getenv("TMPDIR") or "/tmp",
    threshold = opts.threshold or 1024 * 1024,
    parts = {},
    n = 0,
    bytes = 0,
  }, Body)
end

local function open_spool(self)
  seq = seq + 1
  local path = ("%s/.luasmtp-spool.%d.%d"):format(self.dir, core.getpid(), seq)
  local f, err = io.open(path, "w+b")
  if not f then return nil, err end
  os.remove(path) -- the open handle keeps the data; nothing survives a crash
  for i = 1, self.n do
    local ok, werr = f:write(self.parts[i])
    if not ok then f:close() return nil, werr end
  end
  self.parts, self.n = nil, 0
  self.file = f
  return true
end

--- body:write(piece) -> true | nil, "io", detail
function Body:write(piece)
  self.bytes = self.bytes + #piece
  if self.file then
    local ok, err = self.file:write(piece)
    if not ok then return nil, "io", err end
    return true
  end
  self.n = self.n + 1
  self.parts[self.n] = piece
  if self.bytes > self.threshold then
    local ok, err = open_spool(self)
    if not ok then return nil, "io", err end
  end
  return true
end

function Body:size()
  return self.bytes
end

--- body:spooled() -> true when the body is in a spool file.
function Body:spooled()
  return self.file ~= nil
end

--- body:chunks([size]) -> iterator over the body in pieces of at most
-- size bytes (64 KiB), from memory or from the spool file.
function Body:chunks(size)
  size = size or 65536
  if self.file then
    local f = self.file
    local pos = 0
    return function()
      -- each call seeks, so two iterators over one body do not interfere
      f:seek("set", pos)
      local piece = f:read(size)
      if piece then pos = pos + #piece end
      return piece
    end
  end
  local i, off = 1, 1
  local parts = self.parts
  return function()
    local p = parts[i]
    while p and off > #p do
      i, off = i + 1, 1
      p = parts[i]
    end
    if not p then return nil end
    if off == 1 and #p <= size then
      i = i + 1
      return p
    end
    local piece = p:sub(off, off + size - 1)
    off = off + #piece
    return piece
  end
end

--- body:read() -> the body as one string (for small bodies).
function Body:read()
  if not self.file then
    if self.n > 1 then
      self.parts = { table.concat(self.parts, "", 1, self.n) }
      self.n = 1
    end
    return self.parts[1] or ""
  end
  local out = {}
  for piece in self:chunks() do out[#out + 1] = piece end
  return table.concat(out)
end

--- body:discard(): close (and so remove) the spool file; a body in
-- memory stays readable until it is collected.
function Body:discard()
  if self.file then
    self.file:close()
    self.file = nil
    self.parts, self.n, self.bytes = {}, 0, 0
  end
end

Body.__close = Body.discard
Body.__gc = Body.discard

return M
