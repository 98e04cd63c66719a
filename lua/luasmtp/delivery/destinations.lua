--- luasmtp.delivery.destinations: where mail for a domain goes.
--
-- RFC 5321 section 5.1 with RFC 7505 (null MX) and the DNSSEC
-- bookkeeping that DANE (RFC 7672 section 2.2) needs:
--
--   destinations(domain, resolver) -> dest | nil, token, err
--   addresses(host, resolver) -> hostinfo | nil, token, err
--
-- resolver is a table with query(name, qtype) -> result | nil, "dns",
-- detail, the interface of luasmtp.dns: result = { rcode = "NOERROR" |
-- "NXDOMAIN", authentic, answers = {...}, cname = target or nil }.
-- Every step of a CNAME chain is queried itself, so that authenticity is
-- known per step: DANE needs to know whether the name a chain started
-- from, and the name it ended at, were both DNSSEC-secure.
local client = require "luasmtp.client"
local core = require "luasmtp.core"

local M = {}

M.MAX_CNAMES = 10

local function fail(token, permanent, message, fields)
  local err = fields or {}
  err.token, err.permanent, err.message = token, permanent, message
  return nil, token, setmetatable(err, client.Error)
end

--- normalise(name) -> lower-case name without the trailing dot
function M.normalise(name)
  return (name:lower():gsub("%.$", ""))
end

--- literal(s) -> address, family | nil: an RFC 5321 address literal,
-- "[192.0.2.1]" or "[IPv6:2001:db8::1]".
function M.literal(s)
  local v4 = s:match("^%[(%d+%.%d+%.%d+%.%d+)%]$")
  if v4 then
    for octet in v4:gmatch("%d+") do
      if tonumber(octet) > 255 then return nil end
    end
    return v4, "inet"
  end
  local v6 = s:match("^%[[Ii][Pp][Vv]6:([%x:%.]+)%]$")
  if v6 and v6:find(":", 1, true) then
    return v6:lower(), "inet6"
  end
  return nil
end

--- follow(name, qtype, resolver) -> final result, steps | nil, token, err
-- Queries name for qtype; when the answer is a CNAME, queries the target
-- again, up to MAX_CNAMES steps, refusing loops. steps lists each name
-- queried with its authenticity: { {name=, authentic=}, ... }.
function M.follow(name, qtype, resolver)
  local steps, seen = {}, {}
  name = M.normalise(name)
  while true do
    if seen[name] then
      return fail("dns", false, ("CNAME loop at %s (looking up %s %s)"):format(name, steps[1].name, qtype),
        { steps = steps })
    end
    if #steps > M.MAX_CNAMES then
      return fail("dns", false, ("more than %d CNAMEs from %s (looking up %s)"):format(M.MAX_CNAMES,
        steps[1].name, qtype), { steps = steps })
    end
    seen[name] = true
    local res, token, detail = resolver.query(name, qtype)
    if not res then
      steps[#steps + 1] = { name = name, authentic = false }
      return fail(token or "dns", false, ("%s %s: %s"):format(name, qtype, tostring(detail or token)),
        { steps = steps })
    end
    steps[#steps + 1] = { name = name, authentic = res.authentic and true or false }
    local target = res.cname and M.normalise(res.cname)
    if not target or target == name then
      return res, steps
    end
    name = target
  end
end

local function all_authentic(steps, from)
  for i = from or 1, #steps do
    if not steps[i].authentic then return false end
  end
  return true
end

--- destinations(domain, resolver [, opts]) -> dest | nil, token, err
-- dest = {
--   domain,                 the recipient domain (normalised)
--   literal = true,         for "[192.0.2.1]"; hosts[1].address is it
--   expanded,               the domain after CNAMEs
--   have_mx,                MX records exist (false: implicit MX)
--   authentic,              the domain's own records were DNSSEC-secure
--   expanded_authentic,     every step of the chain was
--   hosts = { {name, preference}, ... } in the order to try
--   cnames = { {name, authentic}, ... }
-- }
-- Errors: a null MX or a domain that does not exist is permanent
-- (err.permanent, err.null_mx); a DNS failure is temporary.
-- opts.random(n) -> 1..n picks the order among equal preferences
-- (math.random by default).
function M.destinations(domain, resolver, opts)
  opts = opts or {}
  assert(type(domain) == "string" and domain ~= "", "domain must be a non-empty string")
  local address = M.literal(domain)
  if address then
    return { domain = domain, literal = true, expanded = domain, have_mx = false,
      authentic = false, expanded_authentic = false, hosts = { { name = domain, address = address } },
      cnames = {} }
  end
  if domain:find("^%[") then
    return fail("invalid", true, "malformed address literal " .. domain)
  end
  domain = M.normalise(domain)
  if not domain:find("^[%w_%-%.]+$") or domain:find("%.%.") or domain:find("^%.") then
    return fail("invalid", true, "malformed domain " .. domain)
  end
  local res, steps_or_token, err = M.follow(domain, "MX", resolver)
  if not res then
    err.message = "MX lookup for " .. domain .. ": " .. err.message
    return nil, steps_or_token, err
  end
  local steps = steps_or_token
  local dest = {
    domain = domain,
    expanded = steps[#steps].name,
    authentic = steps[1].authentic,
    expanded_authentic = all_authentic(steps),
    cnames = steps,
    hosts = {},
  }
  if res.rcode == "NXDOMAIN" then
    return fail("dns", true, ("domain %s does not exist%s"):format(domain,
      dest.expanded ~= domain and (" (CNAME to " .. dest.expanded .. ")") or ""), { destinations = dest })
  end
  local mx = {}
  for _, rr in ipairs(res.answers or {}) do
    if type(rr) == "table" and type(rr.exchange) == "string" then
      mx[#mx + 1] = rr
    end
  end
  if #mx == 0 then
    -- RFC 5321 5.1: no MX, the domain itself is the host (implicit MX)
    dest.have_mx = false
    dest.hosts[1] = { name = dest.expanded, implicit = true }
    return dest
  end
  dest.have_mx = true
  -- RFC 7505: a single MX with the root as exchange says "no mail here"
  local real = {}
  for _, rr in ipairs(mx) do
    local host = M.normalise(rr.exchange)
    if host ~= "" then
      real[#real + 1] = { name = host, preference = tonumber(rr.preference) or 0 }
    end
  end
  if #real == 0 then
    return fail("nomail", true, ("%s does not accept mail (null MX, RFC 7505)"):format(domain),
      { null_mx = true, destinations = dest })
  end
  -- RFC 5321 5.1: by preference, in random order among equal ones
  local random = opts.random or math.random
  for i = #real, 2, -1 do
    local j = random(i)
    real[i], real[j] = real[j], real[i]
  end
  for i, h in ipairs(real) do h.rank = i end
  table.sort(real, function(a, b)
    if a.preference ~= b.preference then return a.preference < b.preference end
    return a.rank < b.rank
  end)
  for i, h in ipairs(real) do
    dest.hosts[i] = { name = h.name, preference = h.preference }
  end
  return dest
end

local function addresses_of(res)
  local list = {}
  if res and res.rcode == "NOERROR" then
    for _, a in ipairs(res.answers or {}) do
      if type(a) == "string" then list[#list + 1] = a end
    end
  end
  return list
end

--- interleave(v6, v4) -> { v6[1], v4[1], v6[2], ... } (RFC 8305 4)
function M.interleave(v6, v4)
  local out = {}
  for i = 1, math.max(#v6, #v4) do
    if v6[i] then out[#out + 1] = { address = v6[i], family = "inet6" } end
    if v4[i] then out[#out + 1] = { address = v4[i], family = "inet" } end
  end
  return out
end

--- addresses(host, resolver [, opts]) -> info | nil, token, err
-- host = { name, address? } from destinations. info = {
--   name, expanded (after CNAMEs), authentic (the host's own records),
--   expanded_authentic (every step), addresses = { {address, family}...}
--   (IPv6 and IPv4 interleaved, IPv6 first) }.
-- opts.family = "inet" | "inet6" keeps one family.
-- A host without addresses is a permanent error for that host; a DNS
-- failure a temporary one.
function M.addresses(host, resolver, opts)
  opts = opts or {}
  if host.address then
    local fam = host.address:find(":", 1, true) and "inet6" or "inet"
    return { name = host.name, expanded = host.name, authentic = false, expanded_authentic = false,
      addresses = { { address = host.address, family = fam } } }
  end
  local info = { name = host.name }
  local results, failures = {}, {}
  local authentic, expanded_authentic = true, true
  -- Both families are asked at once: the A lookup runs in a task of its
  -- own while this one follows AAAA (each bounded by the resolver's
  -- timeout), so a slow AAAA answer does not delay the IPv4 addresses.
  local answers = {}
  local want4 = not opts.family or opts.family == "inet"
  local want6 = not opts.family or opts.family == "inet6"
  local a_task
  if want4 and want6 then
    a_task = core.spawn(function() return M.follow(host.name, "A", resolver) end)
  elseif want4 then
    answers.A = table.pack(M.follow(host.name, "A", resolver))
  end
  if want6 then answers.AAAA = table.pack(M.follow(host.name, "AAAA", resolver)) end
  if a_task then
    local ok, res, steps, err = a_task:join()
    if ok then
      answers.A = table.pack(res, steps, err)
    else -- the lookup raised: report it as a DNS failure of that family
      answers.A = table.pack(fail("dns", false, ("%s A: %s"):format(host.name, tostring(res))))
    end
  end
  for _, qtype in ipairs({ "AAAA", "A" }) do
    local got = answers[qtype]
    if got then
      local res, steps, err = got[1], got[2], got[3]
      if res then
        results[qtype] = res
        authentic = authentic and steps[1].authentic
        expanded_authentic = expanded_authentic and all_authentic(steps)
        info.expanded = steps[#steps].name
      else
        failures[#failures + 1] = err
        authentic, expanded_authentic = false, false
      end
    end
  end
  info.authentic, info.expanded_authentic = authentic, expanded_authentic
  info.expanded = info.expanded or host.name
  info.addresses = M.interleave(addresses_of(results.AAAA), addresses_of(results.A))
  if #info.addresses == 0 then
    if #failures > 0 then
      return fail(failures[1].token, false, "address lookup for " .. host.name .. ": " .. failures[1].message,
        { host = info })
    end
    return fail("dns", true, host.name .. " has no address (A or AAAA) records", { host = info })
  end
  return info
end

return M
