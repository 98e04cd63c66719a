--- luasmtp.dns: DNS queries with their DNSSEC status, and a cache.
--
--   local dns = require "luasmtp.dns"
--   local r, err, detail = dns.query("example.org", "MX")
--   if r and r.authentic then ... end
--
-- The queries are built in C (src/dns.c, src/dnsmsg.c): AD and an EDNS0
-- OPT record with DO set, the reply read raw. `authentic` is the AD bit
-- of the reply, believed only from a resolver on a loopback address
-- (127.0.0.0/8, ::1) unless configure{trust_ad = true}: anything on the
-- network path to a remote resolver could set the bit. Postfix makes
-- the same demand of its DANE setups (a validating resolver on the
-- host itself).
--
-- A per-process cache keeps each answer for its TTL (capped), and
-- NXDOMAIN / NODATA answers for the negative TTL of RFC 2308. Failures
-- (SERVFAIL, timeouts, REFUSED) are never cached. Tasks that ask the
-- same question while it is in flight wait for that one query.
local core = require "luasmtp.core"

local M = {}

local DEFAULTS = {
  max_ttl = 3600,          -- seconds an answer stays cached at most
  max_negative_ttl = 900,  -- the same for NXDOMAIN / NODATA
  max_entries = 10000,     -- the cache is emptied when it grows past this
}

local QTYPES = { A = true, AAAA = true, MX = true, CNAME = true, TXT = true, TLSA = true, PTR = true }

local state = {
  trust_ad = false,
  max_ttl = DEFAULTS.max_ttl,
  max_negative_ttl = DEFAULTS.max_negative_ttl,
  max_entries = DEFAULTS.max_entries,
}

local DEFAULT_TIMEOUT = 10

local cache, entries = {}, 0
local stats = { hits = 0, misses = 0, joined = 0 }
-- Queries in flight: key -> { cond, result | err, detail }. A query
-- made before the last cache_clear (another resolver) is not cached.
local inflight = {}
local generation = 0

--- cache_clear(): forget every cached answer (tests, resolver changes).
function M.cache_clear()
  cache, entries = {}, 0
  inflight = {}
  generation = generation + 1
  stats.hits, stats.misses, stats.joined = 0, 0, 0
end

--- cache_stats() -> { entries, hits, misses, joined }
-- joined: queries that waited for the same query already in flight.
function M.cache_stats()
  return { entries = entries, hits = stats.hits, misses = stats.misses, joined = stats.joined }
end

local function check_seconds(name, v)
  assert(v == nil or (type(v) == "number" and v >= 0 and v == v and v < math.huge),
    name .. " must be a number of seconds >= 0")
end

--- configure{ servers =, trust_ad =, timeout =, tries =, rotate =,
--   max_ttl =, max_negative_ttl = } -> true | nil, "dns", detail
-- servers: "ip", "ip:port", "[ip6]:port" or an array of them (omitted:
-- the system resolvers from resolv.conf). trust_ad: believe the AD bit
-- also from resolvers that are not on loopback. timeout/tries: per try,
-- tries per server. Resets the cache. configure{} goes back to the
-- system resolvers and the defaults.
function M.configure(opts)
  opts = opts or {}
  assert(type(opts) == "table", "configure expects a table")
  assert(opts.trust_ad == nil or type(opts.trust_ad) == "boolean", "trust_ad must be a boolean")
  check_seconds("max_ttl", opts.max_ttl)
  check_seconds("max_negative_ttl", opts.max_negative_ttl)
  for k in pairs(opts) do
    assert(k == "servers" or k == "trust_ad" or k == "timeout" or k == "tries" or k == "rotate"
      or k == "max_ttl" or k == "max_negative_ttl", "unknown option " .. tostring(k))
  end
  local ok, err, detail = core.dns_configure {
    servers = opts.servers, timeout = opts.timeout, tries = opts.tries, rotate = opts.rotate,
  }
  if not ok then
    return nil, err, detail
  end
  state.trust_ad = opts.trust_ad == true
  state.max_ttl = opts.max_ttl or DEFAULTS.max_ttl
  state.max_negative_ttl = opts.max_negative_ttl or DEFAULTS.max_negative_ttl
  M.cache_clear()
  return true
end

local function copy(v)
  if type(v) ~= "table" then
    return v
  end
  local out = {}
  for k, x in pairs(v) do
    out[k] = copy(x)
  end
  return out
end

local function store(key, result, now)
  local cap = #result.answers > 0 and state.max_ttl or state.max_negative_ttl
  local ttl = math.min(result.ttl, cap)
  if ttl <= 0 then
    return
  end
  if entries >= state.max_entries then
    for k, e in pairs(cache) do
      if e.expires <= now then
        cache[k] = nil
        entries = entries - 1
      end
    end
    if entries >= state.max_entries then
      cache, entries = {}, 0
    end
  end
  if not cache[key] then
    entries = entries + 1
  end
  cache[key] = { expires = now + ttl, result = result }
end

--- query(name, qtype [, opts]) -> result | nil, "dns", detail
-- qtype: "MX", "A", "AAAA", "CNAME", "TXT", "TLSA" or "PTR"; opts: timeout
-- (seconds, default 10). The name is used as is (no search list).
-- result = { name, qtype, rcode = "NOERROR" | "NXDOMAIN",
--   authentic = bool, ttl = seconds left, cname = canonical name or nil,
--   answers = { ... } }
-- answers: MX { preference, exchange } (exchange "" is a null MX,
-- RFC 7505), A / AAAA address strings, TXT strings (the
-- character-strings of one record joined), CNAME and PTR target names, TLSA
-- { usage, selector, mtype, data = binary }. NXDOMAIN and NODATA are
-- results with no answers. SERVFAIL (a bogus signature behind a
-- validating resolver), REFUSED and timeouts are nil, "dns", detail:
-- temporary failures.
function M.query(name, qtype, opts)
  assert(type(name) == "string", "name must be a string")
  assert(QTYPES[qtype], "qtype must be one of A, AAAA, MX, CNAME, TXT, TLSA, PTR")
  local key = qtype .. " " .. name:lower():gsub("%.$", "")
  local now = core.update_now()
  local hit = cache[key]
  if hit then
    if hit.expires > now then
      stats.hits = stats.hits + 1
      local r = copy(hit.result)
      r.ttl = math.max(0, math.floor(hit.expires - now))
      return r
    end
    cache[key] = nil
    entries = entries - 1
  end
  local flight = inflight[key]
  if flight then
    stats.joined = stats.joined + 1
    flight.cond:wait(opts and opts.timeout or DEFAULT_TIMEOUT)
    if flight.result then
      return copy(flight.result)
    end
    if flight.err then
      return nil, flight.err, flight.detail
    end
    return nil, "dns", name .. " " .. qtype .. ": DNS lookup timed out"
  end
  stats.misses = stats.misses + 1
  flight = { cond = core.cond() }
  inflight[key] = flight
  local gen = generation
  local ok, r, err, detail = pcall(core.dns_query, name, qtype, opts)
  if inflight[key] == flight then
    inflight[key] = nil
  end
  if not ok then -- a programming error: raise it, after waking the others
    flight.err, flight.detail = "dns", tostring(r)
    flight.cond:close()
    error(r, 0)
  end
  local result
  if r then
    result = {
      name = r.name, qtype = r.qtype, rcode = r.rcode, ttl = r.ttl, cname = r.cname,
      answers = r.answers,
      authentic = r.ad and (state.trust_ad or r.loopback) or false,
    }
    if gen == generation then
      store(key, result, now)
    end
    flight.result = result
  else
    if err == "timeout" then
      err = "dns" -- one token for every temporary DNS failure
    end
    flight.err, flight.detail = err, detail
  end
  flight.cond:close() -- wakes every waiter
  if not result then
    return nil, err, detail
  end
  return copy(result)
end

return M
