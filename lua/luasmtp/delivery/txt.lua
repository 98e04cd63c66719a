--- luasmtp.delivery.txt: the TXT lookups of MTA-STS and TLS-RPT through
-- an injectable DNS function.
--
-- A DNS function has the signature of luasmtp.dns.query:
--   query(name, qtype [, opts]) -> { rcode =, authentic =, ttl =, answers = {...} }
--                                | nil, "dns", detail
-- with TXT answers as strings (the character-strings of one record
-- joined). Without luasmtp.dns, a fallback over luasmtp.resolve_txt
-- (c-ares, no DNSSEC status) stands in.
local core = require "luasmtp.core"

local M = {}

--- The fallback: resolve_txt has no rcode; "Domain name not found" is
-- its NXDOMAIN, an empty list NODATA.
local function fallback_query(name, qtype)
  assert(qtype == "TXT", "the resolve_txt fallback answers TXT queries only")
  local list, token, detail = core.resolve_txt(name)
  if list then
    return { rcode = "NOERROR", authentic = false, answers = list }
  end
  if token == "dns" and detail and detail:find("Domain name not found", 1, true) then
    return { rcode = "NXDOMAIN", authentic = false, answers = {} }
  end
  return nil, token, detail
end

--- resolve_txt_query(name, "TXT"): the fallback itself.
M.resolve_txt_query = fallback_query

--- default_query() -> query function: luasmtp.dns.query when that
-- module exists, else the resolve_txt fallback.
function M.default_query()
  if package.searchpath("luasmtp.dns", package.path) then
    local dns = require "luasmtp.dns"
    if type(dns) == "table" and type(dns.query) == "function" then
      return dns.query
    end
  end
  return fallback_query
end

--- domain(name) -> normalized | nil: a DNS name in A-label form,
-- lowercased and without a trailing dot; nil for anything else (labels
-- of letters, digits and inner hyphens, 1..63 bytes each, 253 in all).
function M.domain(name)
  if type(name) ~= "string" then
    return nil
  end
  name = name:lower():gsub("%.$", "")
  if #name == 0 or #name > 253 then
    return nil
  end
  for label in (name .. "."):gmatch("([^.]*)%.") do
    if #label == 0 or #label > 63 or not label:match("^[a-z0-9][a-z0-9-]*$") or label:sub(-1) == "-" then
      return nil
    end
  end
  return name
end

--- fields(record, version) -> { {name, value}, ... } | nil, why
-- The syntax the TXT records of MTA-STS (RFC 8461 section 3.1) and
-- TLS-RPT (RFC 8460 section 3) share:
--   record = version 1*(delim field) [delim]    delim = *WSP ";" *WSP
--   field  = name "=" value    name = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
-- A value runs to the next ";" (trailing spaces dropped); its own
-- syntax is the caller's to check.
function M.fields(record, version)
  if type(record) ~= "string" or record:sub(1, #version) ~= version then
    return nil, "does not start with " .. version
  end
  local rest = record:sub(#version + 1)
  local list = {}
  local pos = 1
  while pos <= #rest do
    local after_delim = rest:match("^[ \t]*;[ \t]*()", pos)
    if not after_delim then
      return nil, "fields must be separated by \";\""
    end
    pos = after_delim
    if pos > #rest then
      break -- a trailing ";"
    end
    local name, value, after = rest:match("^([%w][%w_.-]*)=([^;]*)()", pos)
    if not name or #name > 32 then
      return nil, "invalid field at \"" .. rest:sub(pos, pos + 20) .. "\""
    end
    list[#list + 1] = { name, (value:gsub("[ \t]+$", "")) }
    pos = after
  end
  if #list == 0 then
    return nil, "no field after " .. version
  end
  return list
end

--- select(records, version, parse) -> parse(record) | nil, why
-- Of the TXT records of a name, those starting with version count
-- (followed by a space, a tab, ";" or nothing); exactly one must remain,
-- and parse(record) must accept it.
function M.select(records, version, parse)
  local found = {}
  for _, r in ipairs(records) do
    local next_char = r:sub(#version + 1, #version + 1)
    if r:sub(1, #version) == version and (next_char == "" or next_char:match("[ \t;]")) then
      found[#found + 1] = r
    end
  end
  if #found == 0 then
    return nil, "no " .. version .. " TXT record"
  end
  if #found > 1 then
    return nil, #found .. " " .. version .. " TXT records (exactly one is allowed)"
  end
  local result, why = parse(found[1])
  if not result then
    return nil, "invalid TXT record: " .. why
  end
  return result
end

--- lookup(query, name) -> { string, ... } | nil, token, detail
-- The TXT records of name; an empty list when there is none (NXDOMAIN
-- or no TXT record). Any other failure (SERVFAIL, timeout) is an error.
function M.lookup(query, name)
  local res, token, detail = query(name, "TXT")
  if not res then
    return nil, token or "dns", detail
  end
  local rcode = res.rcode ~= nil and tostring(res.rcode):upper() or "NOERROR"
  if rcode == "NXDOMAIN" or rcode == "3" then
    return {}
  end
  if rcode ~= "NOERROR" and rcode ~= "0" then
    return nil, "dns", name .. ": " .. rcode
  end
  local out = {}
  for _, answer in ipairs(res.answers or {}) do
    if type(answer) == "string" then
      out[#out + 1] = answer
    end
  end
  return out
end

return M
