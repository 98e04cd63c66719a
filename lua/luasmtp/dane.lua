--- luasmtp.dane: the DNS side of DANE for SMTP (RFC 7672): which TLSA
-- records apply to an MX host, and which names a DANE-TA certificate
-- may carry. The TLS side is sock:starttls(ctx, { dane = ... }) in C
-- (src/tls.c, OpenSSL's DANE API).
--
--   local dane = require "luasmtp.dane"
--   local t, err, detail = dane.lookup("mx.example.org", { port = 25 })
--   if not t then -- a failed or bogus TLSA lookup: a temporary failure
--   elseif t.usable > 0 then
--     sock:starttls(ctx, { dane = { base_domain = t.base_domain, tlsa = t.tlsa,
--       names = dane.names { base_domain = t.base_domain, host = "mx.example.org",
--                            next_hop = "example.org", mx_authentic = true } } })
--   end
local core = require "luasmtp.core"
local dns = require "luasmtp.dns"

local M = {}

--- lookup(host [, opts]) -> { base_domain, tlsa, authentic, usable } | nil, "dns", detail
-- The TLSA records of an MX host (RFC 7672 2.2.2). Only meaningful when
-- the host's address records were authentic; the caller checks that.
-- opts: port (25), expanded (the name the host's address lookup ended at
-- through an authentic CNAME chain: its TLSA records are tried first,
-- then the host's own), timeout, query (the DNS function, default
-- luasmtp.dns.query: the same interface, for another resolver).
-- tlsa is empty (no DANE) when there are no records or when they are not
-- authentic; usable counts the records DANE can use for SMTP (none:
-- RFC 7672 2.2 says mandatory TLS without authentication). A lookup that
-- fails (SERVFAIL for a bogus signature, timeouts) is nil, "dns", detail.
function M.lookup(host, opts)
  opts = opts or {}
  local port = opts.port or 25
  assert(math.type(port) == "integer" and port > 0 and port < 65536, "port must be a TCP port")
  local candidates = { host }
  if opts.expanded and opts.expanded:lower():gsub("%.$", "") ~= host:lower():gsub("%.$", "") then
    candidates = { opts.expanded, host }
  end
  local query = opts.query or dns.query
  local last
  for _, name in ipairs(candidates) do
    local base = name:gsub("%.$", "")
    local res, err, detail = query("_" .. port .. "._tcp." .. base, "TLSA", { timeout = opts.timeout })
    if not res then
      return nil, err, detail
    end
    if not res.authentic then
      -- RFC 7672 2.2.2: an insecure TLSA answer means no DANE
      return { base_domain = base, tlsa = {}, authentic = false, usable = 0 }
    end
    last = { base_domain = base, tlsa = res.answers, authentic = true,
             usable = (core.dane_usable(res.answers)) }
    if #res.answers > 0 then
      return last
    end
  end
  -- no records at any candidate: the base domain is the host itself
  last.base_domain = host:gsub("%.$", "")
  return last
end

--- names{ base_domain, host, next_hop, expanded_next_hop, mx_authentic } -> { name, ... }
-- The names a DANE-TA(2) certificate may carry (RFC 7672 3.2.2), the
-- TLSA base domain first (it is also the SNI name): the MX host as the
-- MX record named it (host) when it differs, and the recipient's domain
-- (next_hop, and the name it was CNAME-expanded to) only when its MX
-- lookup was authentic. Without MX records pass the domain as host and
-- leave next_hop out.
function M.names(t)
  assert(type(t) == "table" and type(t.base_domain) == "string", "names needs base_domain")
  local out, seen = {}, {}
  local function add(name)
    if type(name) ~= "string" or name == "" then return end
    name = name:gsub("%.$", "")
    local key = name:lower()
    if not seen[key] then
      seen[key] = true
      out[#out + 1] = name
    end
  end
  add(t.base_domain)
  add(t.host)
  if t.mx_authentic then
    add(t.next_hop)
    add(t.expanded_next_hop)
  end
  return out
end

return M
