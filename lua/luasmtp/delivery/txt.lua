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
