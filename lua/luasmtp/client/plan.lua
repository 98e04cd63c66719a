--- luasmtp.client.plan: the message plan, everything about a message
-- that does not depend on the session (addresses and parameters checked,
-- DSN and ORCPT encoded, the body source measured and typed).
local core = require "luasmtp.core"
local body = require "luasmtp.client.body"
local errors = require "luasmtp.client.errors"

local new_error = errors.new_error

local M = {}

---------------------------------------------------------------------------
-- Checks on what goes into command lines

local function bad_text(s)
  return s:find("%c") ~= nil
end

-- An address for MAIL FROM / RCPT TO: no control characters (CR and LF
-- least of all) and no angle brackets; at most 254 octets.
local function check_address(addr, what, allow_null)
  if type(addr) ~= "string" then
    error(what .. " must be a string", 4)
  end
  if addr == "" and not allow_null then
    return nil, what .. " is empty"
  end
  if bad_text(addr) then
    return nil, what .. " contains control characters (CR, LF, ...): " .. ("%q"):format(addr)
  end
  if addr:find("[<>]") then
    return nil, what .. " contains angle brackets: " .. addr
  end
  if #addr > 254 then
    return nil, what .. " is longer than 254 octets"
  end
  return addr
end

-- An extra ESMTP parameter (RFC 5321 esmtp-param).
local function check_param(key, value, what)
  if type(key) ~= "string" or not key:find("^%w[%w%-]*$") then
    return nil, what .. ": bad parameter keyword " .. ("%q"):format(tostring(key))
  end
  if value == true then
    return key:upper()
  end
  if type(value) ~= "string" or value == "" or value:find("[%z\1-\32=\127-\255]") then
    return nil, what .. ": bad value for " .. key .. ": " .. ("%q"):format(tostring(value))
  end
  return key:upper() .. "=" .. value
end

local function invalid(why)
  return nil, "invalid", new_error("invalid", { permanent = true, message = why, stage = "prepare" })
end

local function unsupported(what, why)
  return nil, "unsupported", new_error("unsupported", {
    permanent = true, extension = what, message = why, stage = "prepare",
  })
end

local NOTIFY = { NEVER = true, SUCCESS = true, FAILURE = true, DELAY = true }

local function notify_param(v, what)
  local list = {}
  if type(v) == "string" then
    for item in v:gmatch("[^,%s]+") do list[#list + 1] = item:upper() end
  elseif type(v) == "table" then
    for _, item in ipairs(v) do list[#list + 1] = tostring(item):upper() end
  else
    return nil, what .. ": notify must be a string or a list"
  end
  for _, item in ipairs(list) do
    if not NOTIFY[item] then
      return nil, what .. ": bad NOTIFY value " .. item
    end
    if item == "NEVER" and #list > 1 then
      return nil, what .. ": NOTIFY=NEVER goes alone"
    end
  end
  if #list == 0 then
    return nil, what .. ": empty NOTIFY"
  end
  return table.concat(list, ",")
end

-- ORCPT: "rfc822;addr" (an address alone means rfc822), value as xtext.
local function orcpt_param(v, what)
  if type(v) ~= "string" then
    return nil, what .. ": orcpt must be a string"
  end
  local kind, addr = v:match("^([%w%-]+);(.+)$")
  if not kind then
    kind, addr = "rfc822", v
  end
  if bad_text(addr) then
    return nil, what .. ": orcpt contains control characters"
  end
  return kind .. ";" .. core.xtext_encode(addr)
end

---------------------------------------------------------------------------
-- The message plan: everything about a message that does not depend on
-- the server. Built once per send, checked against each session.

local function non_ascii(s)
  return s:find("[\128-\255]") ~= nil
end

local function build_plan(msg)
  assert(type(msg) == "table", "send needs a message table")
  local from, why = check_address(msg.from, "from", true)
  if not from then return invalid(why) end
  local to = msg.to
  if type(to) == "string" then
    to = { to }
  end
  assert(type(to) == "table", "message.to must be an address or a list of addresses")
  if #to == 0 then
    return invalid("no recipients")
  end
  local plan = {
    from = from,
    recipients = {},
    smtputf8 = msg.smtputf8 or non_ascii(from),
    requiretls = msg.requiretls or false,
    force = msg.force or false,
    chunking = msg.chunking,
    mail_params = {},
  }
  for i, r in ipairs(to) do
    local entry = type(r) == "table" and r or { address = r }
    local what = "recipient " .. i
    local addr, rwhy = check_address(entry.address, what, false)
    if not addr then return invalid(rwhy) end
    local rcpt = { address = addr, params = {} }
    local dsn = msg.dsn or {}
    local notify = entry.notify or dsn.notify
    if notify then
      local v, nwhy = notify_param(notify, what)
      if not v then return invalid(nwhy) end
      rcpt.notify = v
    end
    local orcpt = entry.orcpt or (dsn.orcpt == true and addr) or nil
    if orcpt then
      local v, owhy = orcpt_param(orcpt, what)
      if not v then return invalid(owhy) end
      rcpt.orcpt = v
    end
    for k, v in pairs(entry.params or {}) do
      local p, pwhy = check_param(k, v, what)
      if not p then return invalid(pwhy) end
      rcpt.params[#rcpt.params + 1] = p
    end
    table.sort(rcpt.params)
    if non_ascii(addr) then plan.smtputf8 = true end
    plan.recipients[i] = rcpt
  end
  local dsn = msg.dsn or {}
  if dsn.ret then
    local ret = tostring(dsn.ret):upper()
    if ret ~= "FULL" and ret ~= "HDRS" then return invalid("dsn.ret must be \"full\" or \"hdrs\"") end
    plan.ret = ret
  end
  if dsn.envid then
    if type(dsn.envid) ~= "string" or dsn.envid == "" or bad_text(dsn.envid) or #dsn.envid > 100 then
      return invalid("dsn.envid must be printable text of at most 100 octets")
    end
    plan.envid = core.xtext_encode(dsn.envid)
  end
  for k, v in pairs(msg.mail_params or {}) do
    local p, pwhy = check_param(k, v, "mail_params")
    if not p then return invalid(pwhy) end
    plan.mail_params[#plan.mail_params + 1] = p
  end
  table.sort(plan.mail_params)
  local content = msg.body
  if content == nil then content = msg.message end
  assert(content ~= nil, "message.body is required")
  plan.source = body.source(content, { size = msg.size, body_type = msg.body_type })
  return plan
end

M.build_plan = build_plan


M.invalid = invalid
M.unsupported = unsupported
M.check_address = check_address
M.check_param = check_param
M.non_ascii = non_ascii

return M
