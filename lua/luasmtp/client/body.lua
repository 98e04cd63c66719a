--- luasmtp.client.body: message bodies for the SMTP client.
--
-- A body is a string, an open file, or a function returning the next
-- chunk (nil or "" at the end; nil, why to abort). This module turns any
-- of them into a source that can be read in chunks and, where possible,
-- replayed for a second transaction; it also finds out what the body
-- needs (8BITMIME, BINARYMIME) and how large it is.
--
-- The wire encodings live here too: DATA goes through the C dot-stuffing
-- encoder (core.data_encoder: CRLF line ends, leading dots doubled); BDAT
-- text bodies get the same CRLF normalisation without dot-stuffing;
-- binary bodies (BINARYMIME) go as they are.
local core = require "luasmtp.core"

local M = {}

local CHUNK = 64 * 1024

-- The size on the wire (before dot-stuffing, which RFC 1870 leaves out)
-- of a body scanned by core.body_scan: a text body grows by its bare CRs
-- and LFs and by a final CRLF when it lacks one.
local function wire_size(size, growth, eol, kind)
  if kind == "binarymime" or size == 0 then
    return size
  end
  return size + growth + (eol and 0 or 2)
end

local Source = {}
Source.__index = Source

--- source(body [, opts]) -> source | nil, "invalid", why
-- opts: size (a hint for function bodies), body_type ("7bit",
-- "8bitmime" or "binarymime": overrides the detection).
-- source.size is the size in octets when known (before encoding);
-- source.body_type what the content needs.
function M.source(body, opts)
  opts = opts or {}
  local src = setmetatable({ kind = nil, size = nil, body_type = "7bit" }, Source)
  local t = type(body)
  if t == "string" then
    src.kind, src.data = "string", body
    local size, growth, eol, kind = core.body_scan(body)
    src.body_type, src.size = kind, wire_size(size, growth, eol, kind)
  elseif t == "function" then
    src.kind, src.fn, src.size = "function", body, opts.size
    src.body_type = opts.body_type or "7bit"
  elseif io.type(body) == "file" then
    src.kind, src.file = "file", body
    local start = body:seek("cur")
    if start then
      -- A seekable file: scan it once (in C) for its size and what it
      -- needs, then come back to where it was.
      src.start = start
      local size, growth, eol, kind = core.body_scan(body)
      body:seek("set", start)
      if size then -- else the read error comes again when it is sent
        src.body_type, src.size = kind, wire_size(size, growth, eol, kind)
      end
    else
      src.size = opts.size
    end
  else
    error("body must be a string, a file or a function returning chunks", 3)
  end
  if opts.body_type then
    assert(opts.body_type == "7bit" or opts.body_type == "8bitmime" or opts.body_type == "binarymime",
      "body_type must be \"7bit\", \"8bitmime\" or \"binarymime\"")
    src.body_type = opts.body_type
  end
  return src
end

--- source:replayable() -> boolean: can it be read again from the start?
function Source:replayable()
  return self.kind == "string" or (self.kind == "file" and self.start ~= nil) or self.recorded ~= nil
end

--- source:reader([record]) -> function() -> chunk | nil | nil, why
-- Reads the body from its start. record: keep the chunks of a function
-- body so that a later reader can replay them.
function Source:reader(record)
  if self.kind == "string" then
    local pos = 1
    local data = self.data
    return function()
      if pos > #data then return nil end
      local piece = (pos == 1 and #data <= CHUNK) and data or data:sub(pos, pos + CHUNK - 1)
      pos = pos + #piece
      return piece
    end
  elseif self.kind == "file" then
    if self.start then
      self.file:seek("set", self.start)
    elseif self.consumed then
      return nil, "the file body cannot be read twice (not seekable)"
    end
    self.consumed = true
    local f = self.file
    return function()
      local piece, err = f:read(CHUNK)
      if piece == nil and err then return nil, tostring(err) end
      return piece
    end
  end
  -- a function body
  if self.recorded then
    local i = 0
    local recorded = self.recorded
    return function()
      i = i + 1
      return recorded[i]
    end
  end
  if self.consumed then
    return nil, "the body function cannot be called again for another transaction"
  end
  self.consumed = true
  local fn, kept = self.fn, record and {} or nil
  local ended = false
  return function()
    if ended then return nil end
    local piece, why = fn()
    if piece == nil and why ~= nil then
      ended = true
      return nil, tostring(why)
    end
    if piece == nil or piece == "" then
      ended = true
      if kept then self.recorded = kept end
      return nil
    end
    assert(type(piece) == "string", "a body function must return strings")
    if kept then kept[#kept + 1] = piece end
    return piece
  end
end

--- crlf_normaliser() -> function(chunk | nil) -> out
-- Bare CR and bare LF become CRLF; a CR at the end of a chunk waits for
-- the next one. Called with nil at the end, it flushes that CR.
function M.crlf_normaliser()
  local pending_cr = false
  return function(chunk)
    if chunk == nil then
      if pending_cr then
        pending_cr = false
        return "\r\n"
      end
      return ""
    end
    if pending_cr then
      chunk = "\r" .. chunk
      pending_cr = false
    end
    if chunk:sub(-1) == "\r" then
      pending_cr = true
      chunk = chunk:sub(1, -2)
    end
    local _, growth = core.body_scan(chunk)
    if growth == 0 then -- no bare CR or LF (the C scan): as it is
      return chunk
    end
    chunk = chunk:gsub("\r\n", "\n"):gsub("\r", "\n"):gsub("\n", "\r\n")
    return chunk
  end
end

--- dot_stuffer() -> encoder with :feed(chunk) -> out and :finish() -> out
-- (the C encoder: CRLF line ends, dots doubled, ".\r\n" at the end).
M.dot_stuffer = core.data_encoder

return M
