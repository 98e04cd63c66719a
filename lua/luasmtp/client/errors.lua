--- luasmtp.client.errors: the client's error values. An error is a
-- reply (luasmtp.reply) with more fields: token, permanent, command,
-- stage, cause, message; it prints as its message.
local reply_value = require "luasmtp.reply"

local M = {}

---------------------------------------------------------------------------
-- Errors

local Error = reply_value.extend({})
Error.__tostring = function(e) return e.message end

M.Error = Error

--- is_error(v) -> boolean
function M.is_error(v)
  return getmetatable(v) == Error
end

local function new_error(token, fields)
  fields.token = token
  if fields.permanent == nil then fields.permanent = false end
  return setmetatable(fields, Error)
end

local function reply_text(reply)
  local enh = reply.enhanced and (reply.enhanced .. " ") or ""
  return ("%d %s%s"):format(reply.code, enh, (reply.text or ""):gsub("\n", " / "))
end

--- format_reply(reply) -> "550 5.1.1 No such user"
M.format_reply = reply_text

local function smtp_error(command, reply, stage)
  return new_error("smtp", {
    permanent = reply.code >= 500,
    code = reply.code,
    enhanced = reply.enhanced,
    text = reply.text,
    lines = reply.lines,
    command = command,
    stage = stage,
    message = ("%s: %s"):format(command, reply_text(reply)),
  })
end

-- Printable text of a detail (a receive timeout gives the partial data).
local function describe(token, detail, command)
  if token == "timeout" then
    return "timed out waiting for the reply to " .. command
  elseif token == "closed" then
    return "connection closed by the server (after " .. command .. ")"
  end
  local d = type(detail) == "string" and detail ~= "" and detail:gsub("%c", " ") or token
  return ("%s (%s)"):format(d, command)
end

local function io_error(token, detail, command, stage)
  return new_error(token, {
    permanent = false,
    command = command,
    stage = stage,
    cause = token .. (type(detail) == "string" and detail ~= "" and (": " .. detail:gsub("%c", " ")) or ""),
    message = describe(token, detail, command),
  })
end


M.new_error = new_error
M.smtp_error = smtp_error
M.io_error = io_error
M.reply_text = reply_text

return M
