--- luasmtp.server.message: a message as it arrives, and its header view.
--
-- The message's bytes are in a body sink (core.sink: memory, or a spool
-- file in the store's directory). The header block the sink kept apart
-- is the header view: a list of fields that keep their raw bytes, made
-- once, on first use; plugins read and edit it (add, prepend, set,
-- remove) without touching the body, which stays in the sink. A message
-- is read or streamed as the edited header followed by the body.
local M = {}

-- A message whose header block is longer than the sink keeps apart
-- (header_max, 64 KiB by default), or that does not start with a header
-- field, has an empty header view and everything counts as body.

---------------------------------------------------------------------------
-- Header view

local Header = {}
Header.__index = Header

local FIELD_NAME = "^[!-9;-~]+$"

local function check_field(name, value)
  assert(type(name) == "string" and name:match(FIELD_NAME), "bad header field name")
  assert(type(value) == "string", "header value must be a string")
  -- CR and LF only as folding (CRLF followed by a space or tab)
  local unfolded = value:gsub("\r\n[ \t]", " ")
  assert(not unfolded:find("[\r\n%z]"), "header value holds CR, LF or NUL outside folding")
end

local function new_field(name, value)
  check_field(name, value)
  return { name = name, raw = name .. ": " .. value .. "\r\n" }
end

--- Parse a header block (fields each ending in CRLF, without the blank
-- line). Returns the field list, or nil when it is not a header.
local function parse_fields(block)
  local fields = {}
  local pos = 1
  while pos <= #block do
    local eol = block:find("\r\n", pos, true)
    if not eol then return nil end
    local line = block:sub(pos, eol + 1)
    local first = line:byte(1)
    if first == 32 or first == 9 then
      local last = fields[#fields]
      if not last then return nil end
      last.raw = last.raw .. line
    else
      local name = line:match("^([!-9;-~]+)[ \t]*:")
      if not name then return nil end
      fields[#fields + 1] = { name = name, raw = line }
    end
    pos = eol + 2
  end
  return fields
end

-- The field list is made on first use: a message nobody looks at keeps
-- its header block as the one string it arrived in. A block that then
-- turns out not to be a header becomes part of the body again (nothing
-- has been edited before that, so the message's bytes do not change).
local Lazy = {}
Lazy.__index = function(self, k)
  if k == "list" then
    local fields = parse_fields(self.block)
    if not fields then
      fields = {}
      self.separator = ""
      self.owner.body_offset = 0
    end
    rawset(self, "block", nil)
    rawset(self, "list", fields)
    return fields
  end
  return Header[k]
end

local function new_header(fields, separator)
  return setmetatable({ list = fields, separator = separator }, Header)
end

-- block: the header block as the sink kept it (parsed on first use);
-- owner: the message, whose body starts again at 0 if it is no header.
local function lazy_header(block, separator, owner)
  return setmetatable({ block = block, separator = separator, owner = owner }, Lazy)
end

--- header:count() -> number of fields.
function Header:count()
  return #self.list
end

--- header:fields() -> iterator of index, name, value, raw over every field.
function Header:fields()
  local i = 0
  return function()
    i = i + 1
    local f = self.list[i]
    if not f then return nil end
    return i, f.name, self:value(i), f.raw
  end
end

--- header:value(i) -> the unfolded value of field i (leading blanks and
-- the final CRLF removed).
function Header:value(i)
  local f = self.list[i]
  if not f then return nil end
  local v = f.raw:match("^[^:]*:[ \t]*(.-)\r\n$") or ""
  return (v:gsub("\r\n([ \t])", "%1"))
end

local function matches(f, lname)
  return f.name:lower() == lname
end

--- header:get(name [, n]) -> value of the n-th (default first) field of
-- that name (case-insensitive), or nil.
function Header:get(name, n)
  n = n or 1
  local lname = name:lower()
  for i, f in ipairs(self.list) do
    if matches(f, lname) then
      n = n - 1
      if n == 0 then return self:value(i) end
    end
  end
  return nil
end

--- header:get_all(name) -> { value, ... }
function Header:get_all(name)
  local out, lname = {}, name:lower()
  for i, f in ipairs(self.list) do
    if matches(f, lname) then out[#out + 1] = self:value(i) end
  end
  return out
end

--- header:add(name, value): a new field at the end of the header.
function Header:add(name, value)
  table.insert(self.list, new_field(name, value))
  self.cached, self.edited = nil, true
end

--- header:prepend(name, value): a new field at the top (Received,
-- Authentication-Results).
function Header:prepend(name, value)
  table.insert(self.list, 1, new_field(name, value))
  self.cached, self.edited = nil, true
end

--- header:set(name, value): replace the first field of that name (or add
-- one); the other fields of that name are left alone.
function Header:set(name, value)
  local lname = name:lower()
  for i, f in ipairs(self.list) do
    if matches(f, lname) then
      self.list[i] = new_field(f.name, value)
      self.cached, self.edited = nil, true
      return
    end
  end
  self:add(name, value)
end

--- header:remove(name [, n]) -> number removed: every field of that name,
-- or only the n-th.
function Header:remove(name, n)
  local lname, seen, removed = name:lower(), 0, 0
  local i = 1
  while self.list[i] do
    if matches(self.list[i], lname) then
      seen = seen + 1
      if not n or seen == n then
        table.remove(self.list, i)
        removed = removed + 1
        i = i - 1
      end
    end
    i = i + 1
  end
  if removed > 0 then self.cached, self.edited = nil, true end
  return removed
end

--- header:length() -> #header:bytes(), without making the string when
-- the header has not been looked at.
function Header:length()
  local block = rawget(self, "block")
  if block then return #block + #self.separator end
  return #self:bytes()
end

--- header:bytes() -> the header block as it will be delivered, blank line
-- included.
function Header:bytes()
  local block = rawget(self, "block")
  if block then
    return block .. self.separator -- unparsed, so unedited
  end
  if not self.cached then
    local parts = {}
    for i, f in ipairs(self.list) do parts[i] = f.raw end
    parts[#parts + 1] = self.separator
    self.cached = table.concat(parts)
  end
  return self.cached
end


---------------------------------------------------------------------------
-- Messages

local Message = {}
M.Message = Message

-- The header view is made when it is first asked for: a message that no
-- plugin reads or edits is the sink's content as it is.
local function make_view(msg)
  local sink = msg.sink
  local header
  local offset = 0
  local block, body_offset = sink:header()
  if not block then
    header = new_header({}, "") -- a header block too long: all body
  elseif body_offset then
    if block == "" then
      header, offset = new_header({}, "\r\n"), body_offset
    else
      header, offset = lazy_header(block, "\r\n", msg), body_offset
    end
  elseif block ~= "" and #block == sink:size() then
    header, offset = lazy_header(block, "", msg), #block -- all header, no body
  else
    header = new_header({}, "")
  end
  rawset(msg, "body_offset", offset)
  rawset(msg, "header", header)
  return header
end

Message.__index = function(msg, k)
  if k == "header" then return make_view(msg) end
  if k == "body_offset" then
    make_view(msg)
    return rawget(msg, "body_offset")
  end
  return Message[k]
end

--- from_sink(envelope, sink) -> message
-- sink: the content as received (core.sink); its first header block
-- becomes the header view, the rest is the body.
function M.from_sink(envelope, sink)
  return setmetatable({
    envelope = envelope,
    from = envelope.from,
    rcpt = envelope.rcpt,
    sink = sink,
  }, Message)
end

--- message:body_size() -> bytes of the body (after the header block).
function Message:body_size()
  return self.sink:size() - self.body_offset
end

--- message:body_chunks([size]) -> iterator over the body alone.
function Message:body_chunks(size)
  return self.sink:chunks(size or 65536, self.body_offset)
end

--- message:unedited() -> true when the message is byte for byte what
-- arrived (no header edit): the sink can then become the mail file.
function Message:unedited()
  local header = rawget(self, "header")
  return not (header and header.edited) and not self.released
end

--- message:size() -> bytes of the edited header plus the body.
function Message:size()
  local header = rawget(self, "header")
  if not header then return self.sink:size() end
  return header:length() + self:body_size()
end

--- message:spooled() -> true when the body is in a spool file.
function Message:spooled()
  return not self.released and self.sink:spooled()
end

--- message:chunks([size]) -> iterator over the header, then the body in
-- pieces of at most size bytes (64 KiB), from memory or the spool file.
function Message:chunks(size)
  if not rawget(self, "header") then return self.sink:chunks(size or 65536) end
  local header = self.header:bytes()
  local body = self:body_chunks(size)
  local started = false
  return function()
    if not started then
      started = true
      if header ~= "" then return header end
    end
    return body()
  end
end

--- message:read() -> the whole message as one string (small messages).
function Message:read()
  local out = {}
  for piece in self:chunks(1024 * 1024) do out[#out + 1] = piece end
  return table.concat(out)
end

--- message:discard(): release a spooled body (its spool file); one in
-- memory stays readable until it is collected.
function Message:discard()
  if not self.released and self.sink:spooled() then
    self.sink:close()
    self.released = true
  end
end

return M
