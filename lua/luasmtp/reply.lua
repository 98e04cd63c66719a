--- luasmtp.reply: the one SMTP reply value.
--
-- A reply is what a server sends and what a client receives: a code, an
-- enhanced status code (RFC 3463, may be nil) and text (one or more
-- lines). The server's plugins return them, the client's errors are
-- them (with extra fields: token, command, stage, ...), and SASL results
-- carry them. A reply is a value, never an exception.
local M = {}

local Reply = {}
Reply.__index = Reply
M.Reply = Reply

--- reply.new(code, enhanced, text [, fields]) -> reply
-- code: 200..599. enhanced: "x.y.z" or nil. text: a string (CR/LF split
-- it into lines when sent). fields: more fields copied in (disconnect,
-- per_recipient, lines, ...).
function M.new(code, enhanced, text, fields)
  assert(math.type(code) == "integer" and code >= 200 and code <= 599, "reply code must be 200..599")
  local r = fields or {}
  r.code, r.enhanced, r.text = code, enhanced, text
  return setmetatable(r, Reply)
end

--- reply.is(v) -> true when v is a reply (or a value built on one).
function M.is(v)
  local mt = getmetatable(v)
  while mt do
    if mt == Reply then return true end
    local parent = getmetatable(mt)
    mt = parent and parent.__index
    if type(mt) ~= "table" then return false end
  end
  return false
end

--- Class(extra_methods) -> a metatable for values that are replies and
-- more (the client's errors): their methods first, then Reply's.
function M.extend(class)
  class.__index = class.__index or class
  return setmetatable(class, { __index = Reply })
end

--- reply:permanent(): a 5xx.
function Reply:is_permanent()
  return self.code >= 500
end

function Reply:is_positive()
  return self.code < 400
end

--- reply:format() -> "250 2.0.0 text" (lines joined with "\n").
function Reply:format()
  local text = self.text or ""
  if self.lines and #self.lines > 0 and text == "" then
    text = table.concat(self.lines, "\n")
  end
  local parts = { tostring(self.code) }
  if self.enhanced then parts[#parts + 1] = self.enhanced end
  if text ~= "" then parts[#parts + 1] = text end
  return table.concat(parts, " ")
end

Reply.__tostring = function(r)
  return r.message or r:format()
end

--- reply.parse(string) -> reply | nil: "450 4.7.1 Try later" (text
-- optional, enhanced code optional).
function M.parse(s)
  local code, rest = s:match("^([2-5]%d%d)[ %-]?(.*)$")
  if not code then return nil end
  local enh, text = rest:match("^([245]%.%d%d?%d?%.%d%d?%d?) ?(.*)$")
  return M.new(math.tointeger(tonumber(code)), enh, enh and text or rest)
end

function M.tempfail(text, enhanced)
  return M.new(451, enhanced or "4.3.0", text or "Temporary failure, try again later")
end

function M.reject(text, enhanced)
  return M.new(550, enhanced or "5.7.1", text or "Rejected")
end

--- disconnect([text [, code, enhanced]]): reply (421 by default) and close
-- the connection.
function M.disconnect(text, code, enhanced)
  return M.new(code or 421, enhanced or "4.7.0", text or "Closing connection", { disconnect = true })
end

--- per_recipient{ [rcpt] = reply, ... }: an LMTP result giving some
-- recipients their own reply; the others get the default 250.
function M.per_recipient(map)
  return M.new(250, "2.0.0", "Delivered", { per_recipient = map })
end

return M
