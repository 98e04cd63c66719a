--- luasmtp.mailauth.dmarc: Domain-based Message Authentication,
-- Reporting and Conformance (RFC 7489): the policy of the From domain
-- and the result a receiving policy acts on.
--
--   local dmarc = require "luasmtp.mailauth.dmarc"
--   local v = dmarc.evaluate {
--     from_domain = "example.org",
--     spf = { result = "pass", domain = "bounces.example.org" },   -- MAIL FROM (or HELO) domain
--     dkim = { { result = "pass", domain = "example.org" }, ... }, -- one per signature
--   }
--   if v.result == "fail" and v.disposition == "reject" then ... end
--
-- The organizational domain comes from the Public Suffix List (libpsl,
-- src/psl.c). Aggregate report data is recorded by a recorder (new{})
-- as one line per message in the log of its UTC day; building and
-- sending the rua reports themselves is not done yet.
local core = require "luasmtp.core"
local options = require "luasmtp.options"
local txt = require "luasmtp.delivery.txt"

local M = {}

local DAY = 86400

local function normalize(domain)
  return type(domain) == "string" and txt.domain(domain) or nil
end

--- organizational_domain(domain) -> domain: the registrable domain
-- (public suffix plus one label); a public suffix is its own.
function M.organizational_domain(domain)
  local name = assert(normalize(domain), "organizational_domain: not a domain name")
  return core.psl_organizational_domain(name) or name
end

--- aligned(a, b, mode) -> boolean: "s" strict (the same name), "r"
-- relaxed (the same organizational domain).
function M.aligned(a, b, mode)
  a, b = normalize(a), normalize(b)
  if not a or not b then
    return false
  end
  if mode == "s" then
    return a == b
  end
  return a == b or M.organizational_domain(a) == M.organizational_domain(b)
end

local POLICIES = { none = true, quarantine = true, reject = true }

--- parse_record(text) -> record | nil, why (section 6.3). record =
-- { p =, sp =, adkim = "r"|"s", aspf = "r"|"s", pct = 0..100,
--   rua = {uri...}, ruf = {uri...}, fo =, rf =, ri = seconds }.
-- A record with a missing or unknown p but a valid rua is p=none, as
-- section 6.6.3 says.
function M.parse_record(text)
  local fields, why = txt.fields(text, "v=DMARC1")
  if not fields then
    return nil, why
  end
  local rec = { adkim = "r", aspf = "r", pct = 100, rua = {}, ruf = {}, fo = "0", rf = "afrf", ri = DAY }
  local seen = {}
  for _, f in ipairs(fields) do
    local name, value = f[1]:lower(), f[2]
    if not seen[name] then -- the first of a repeated tag counts
      seen[name] = true
      if name == "p" or name == "sp" then
        rec[name] = POLICIES[value:lower()] and value:lower() or false
      elseif name == "adkim" or name == "aspf" then
        local mode = value:lower()
        if mode ~= "r" and mode ~= "s" then
          return nil, "invalid " .. name
        end
        rec[name] = mode
      elseif name == "pct" then
        local n = value:match("^%d%d?%d?$") and tonumber(value)
        if not n or n > 100 then
          return nil, "invalid pct"
        end
        rec.pct = n
      elseif name == "ri" then
        local n = value:match("^%d+$") and tonumber(value)
        if not n then
          return nil, "invalid ri"
        end
        rec.ri = n
      elseif name == "rua" or name == "ruf" then
        for uri in (value .. ","):gmatch("[ \t]*([^,]-)[ \t]*,") do
          if not uri:match("^[%a][%w+.-]*:[!-~]+$") then
            return nil, "invalid URI in " .. name
          end
          rec[name][#rec[name] + 1] = uri
        end
      elseif name == "fo" or name == "rf" then
        rec[name] = value
      end
    end
  end
  if not rec.p then
    if #rec.rua == 0 then
      return nil, "no valid p"
    end
    rec.p = "none"
  end
  if not rec.sp then
    rec.sp = rec.p
  end
  return rec
end

-- The DMARC record at _dmarc.<domain>: rec | nil (none) | nil, "temperror", why
local function lookup(query, domain)
  local records, token, detail = txt.lookup(query, "_dmarc." .. domain)
  if not records then
    return nil, "temperror", detail or token
  end
  local found
  for _, r in ipairs(records) do
    local next_char = r:sub(9, 9)
    if r:sub(1, 8) == "v=DMARC1" and (next_char == "" or next_char:match("[ \t;]")) then
      if found then
        return nil, nil, "more than one DMARC record at _dmarc." .. domain
      end
      found = r
    end
  end
  if not found then
    return nil
  end
  local rec, why = M.parse_record(found)
  if not rec then
    return nil, nil, "invalid DMARC record at _dmarc." .. domain .. ": " .. why
  end
  return rec
end

--- discover(from_domain [, query]) -> record, policy_domain | nil, token, why
-- Section 6.6.3: _dmarc.<from_domain>, else _dmarc.<organizational
-- domain>. token: nil when there is no (valid) record, "temperror" when
-- DNS failed.
function M.discover(from_domain, query)
  query = query or txt.default_query()
  local domain = normalize(from_domain)
  if not domain then
    return nil, "permerror", "not a domain name: " .. tostring(from_domain)
  end
  local rec, token, why = lookup(query, domain)
  if rec or token then
    return rec, token == nil and domain or token, why
  end
  local org = M.organizational_domain(domain)
  if org ~= domain then
    local why_here = why
    rec, token, why = lookup(query, org)
    if rec then
      return rec, org
    end
    return nil, token, why or why_here
  end
  return nil, nil, why
end

local WEAKER = { reject = "quarantine", quarantine = "none", none = "none" }

--- evaluate{ from_domain =, spf = { result =, domain = }, dkim = { {result =, domain =}, ... },
--   query =, random = } -> verdict
-- spf.domain: the MAIL FROM domain SPF checked (the HELO domain for a
-- null sender). random: a function returning [0, 1) for pct (default
-- math.random). verdict = {
--   result = "pass" | "fail" | "none" | "temperror" | "permerror",
--   policy = "none" | "quarantine" | "reject" (p, or sp below the
--            organizational domain; nil without a record),
--   disposition = what to do after pct: the policy for a sampled
--            failure, the next weaker one for the rest, "none" otherwise,
--   from_domain, policy_domain, org_domain, spf_aligned, dkim_aligned,
--   dkim_domain (the aligned signature's d=), record, reason }
function M.evaluate(opts)
  assert(type(opts) == "table", "evaluate expects a table")
  local v = { disposition = "none", spf_aligned = false, dkim_aligned = false }
  local from = normalize(opts.from_domain)
  if not from then
    v.result, v.reason = "permerror", "no valid From domain"
    return v
  end
  v.from_domain = from
  v.org_domain = M.organizational_domain(from)
  local rec, policy_domain, why = M.discover(from, opts.query)
  if not rec then
    v.result = policy_domain == "temperror" and "temperror" or "none"
    v.reason = why
    return v
  end
  v.record, v.policy_domain = rec, policy_domain
  v.policy = (policy_domain ~= from) and rec.sp or rec.p
  local spf = opts.spf
  if spf and spf.result == "pass" and M.aligned(spf.domain, from, rec.aspf) then
    v.spf_aligned = true
  end
  for _, sig in ipairs(opts.dkim or {}) do
    if sig.result == "pass" and M.aligned(sig.domain, from, rec.adkim) then
      v.dkim_aligned, v.dkim_domain = true, normalize(sig.domain)
      break
    end
  end
  if v.spf_aligned or v.dkim_aligned then
    v.result = "pass"
    return v
  end
  v.result = "fail"
  local random = opts.random or math.random
  if rec.pct >= 100 or random() * 100 < rec.pct then
    v.disposition = v.policy
  else
    v.disposition, v.sampled_out = WEAKER[v.policy], true
  end
  return v
end

-- ---------------------------------------------------------------------
-- Aggregate report data (section 7.2): one line per message

local Recorder = {}
Recorder.__index = Recorder

--- new{ dir = } -> recorder: lines go to dir/<UTC day>.dmarc, each
-- fsynced before record() returns.
M.schema = options.schema("dmarc", {
  { "dir", "string", nil, "directory of the aggregate data, one file per UTC day (created; required)" },
})

function M.new(opts)
  assert(type(opts) == "table", "dmarc.new: options table expected")
  opts = M.schema:apply(opts, 2)
  assert(opts.dir and opts.dir ~= "", "dmarc.new: dir (a string) is required")
  assert(core.mkdir(opts.dir))
  return setmetatable({ dir = opts.dir }, Recorder)
end

local FIELDS = { "time", "source_ip", "header_from", "policy_domain", "p", "sp", "pct", "disposition",
                 "dkim", "spf", "envelope_from", "spf_domain", "spf_result", "dkim_results" }

local function escape(s)
  return (tostring(s or ""):gsub("[%%:,%c]", function(c)
    return ("%%%02X"):format(c:byte())
  end))
end

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h)
    return string.char(tonumber(h, 16))
  end))
end

function Recorder:day_path(t)
  return ("%s/%s.dmarc"):format(self.dir, os.date("!%Y-%m-%d", math.floor(t)))
end

--- rec:record(verdict, { source_ip =, envelope_from =, spf = {result, domain},
--   dkim = { {result, domain, selector}, ... }, time = }) -> true | nil, "io", detail
-- Records what a report's <record> needs: the row (source IP, the
-- disposition and the aligned dkim/spf outcome), the identifiers and
-- the raw SPF and DKIM results. Messages without a DMARC record are
-- not recorded (nobody asked for reports).
function Recorder:record(verdict, info)
  assert(type(verdict) == "table" and type(info) == "table", "record: verdict and info tables expected")
  if not verdict.record then
    return true
  end
  local dkim = {}
  for i, sig in ipairs(info.dkim or {}) do
    dkim[i] = table.concat({ escape(sig.domain), escape(sig.selector), escape(sig.result) }, ":")
  end
  local spf = info.spf or {}
  local entry = {
    time = math.floor(info.time or core.time()), source_ip = info.source_ip, header_from = verdict.from_domain,
    policy_domain = verdict.policy_domain, p = verdict.record.p, sp = verdict.record.sp,
    pct = verdict.record.pct, disposition = verdict.disposition,
    dkim = verdict.dkim_aligned and "pass" or "fail", spf = verdict.spf_aligned and "pass" or "fail",
    envelope_from = info.envelope_from, spf_domain = spf.domain, spf_result = spf.result,
  }
  local cols = { "1" }
  for _, f in ipairs(FIELDS) do
    cols[#cols + 1] = f == "dkim_results" and table.concat(dkim, ",") or escape(entry[f])
  end
  return core.append_file_sync(self:day_path(entry.time), table.concat(cols, "\t") .. "\n")
end

--- rec:records(start, stop [, policy_domain]) -> { entry, ... }: the
-- lines of [start, stop), as tables with the fields of record() (dkim_results
-- a list of { domain, selector, result }).
function Recorder:records(start, stop, domain)
  local out = {}
  local day = start - start % DAY
  while day < stop do
    local f = io.open(self:day_path(day), "rb")
    if f then
      for line in f:lines() do
        local cols = {}
        for col in (line .. "\t"):gmatch("([^\t]*)\t") do
          cols[#cols + 1] = col
        end
        if cols[1] == "1" and #cols == #FIELDS + 1 then
          local e = {}
          for i, name in ipairs(FIELDS) do
            e[name] = unescape(cols[i + 1])
          end
          e.time, e.pct = tonumber(e.time), tonumber(e.pct)
          local results = {}
          for item in cols[#cols]:gmatch("[^,]+") do
            local d, s, r = item:match("^([^:]*):([^:]*):([^:]*)$")
            if d then
              results[#results + 1] = { domain = unescape(d), selector = unescape(s), result = unescape(r) }
            end
          end
          e.dkim_results = results
          if e.time and e.time >= start and e.time < stop and (domain == nil or e.policy_domain == domain) then
            out[#out + 1] = e
          end
        end
      end
      f:close()
    end
    day = day + DAY
  end
  return out
end

return M
