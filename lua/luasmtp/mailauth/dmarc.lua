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
-- as one line per message in the log of its UTC day; rec:send_due()
-- sends each finished day's XML report (appendix C), gzipped, to the
-- rua addresses of each policy domain (section 7.2), once.
local core = require "luasmtp.core"
local options = require "luasmtp.options"
local reports = require "luasmtp.report"
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
-- Aggregate reports (section 7.2): one line per message, a report per
-- policy domain and UTC day

local Recorder = {}
Recorder.__index = Recorder

--- new{ dir =, org_name =, email =, ... } -> recorder: lines go to
-- dir/<UTC day>.dmarc, each fsynced before record() returns. Recording
-- needs dir only; report() and send_due() need org_name and email too.
M.schema = options.schema("dmarc", {
  { "dir", "string", nil, "directory of the aggregate data, one file per UTC day (created; required)" },
  { "org_name", "string", nil, "`org_name` of the reports: this receiver's organization (required to report)" },
  { "email", "string", nil, "`email` of the reports, the From of report mails (required to report)" },
  { "extra_contact_info", "string", nil, "`extra_contact_info` of the reports (left out when nil)" },
  { "receiver", "string", nil, "this receiver's domain: `Submitter:` of the Subject, report ids and file names " ..
    "(default the domain of `email`)" },
  { "sync", "boolean", true, "fsync each recorded line" },
  { "retry_days", "number", 3, "days a report that could not be sent is tried again" },
  { "keep_days", "number", 7, "days the data of reported days is kept" },
})

function M.new(opts)
  assert(type(opts) == "table", "dmarc.new: options table expected")
  opts = M.schema:apply(opts, 2)
  assert(opts.dir and opts.dir ~= "", "dmarc.new: dir (a string) is required")
  local self = setmetatable({
    dir = opts.dir, suffix = "dmarc", sync = opts.sync, retry_days = opts.retry_days, keep_days = opts.keep_days,
    org_name = opts.org_name, email = opts.email, extra_contact_info = opts.extra_contact_info,
  }, Recorder)
  if opts.email then
    local domain = opts.email:match("^[^@%s<>%c]+@([^@]+)$")
    assert(domain and normalize(domain), "dmarc.new: email must be an address")
  end
  local receiver = opts.receiver or (opts.email and opts.email:match("@(.+)$"))
  if receiver then
    self.receiver = assert(normalize(receiver), "dmarc.new: receiver must be a domain name")
  end
  assert(core.mkdir(opts.dir))
  return self
end

-- A line: "2" then FIELDS, tab-separated and percent-escaped;
-- dkim_results a list "domain:selector:result,...". Lines of version 1
-- (without adkim, aspf, fo, reason and spf_scope) are still read.
local FIELDS = { "time", "source_ip", "header_from", "policy_domain", "p", "sp", "pct", "adkim", "aspf", "fo",
                 "disposition", "reason", "dkim", "spf", "envelope_from", "spf_domain", "spf_scope", "spf_result",
                 "dkim_results" }
local FIELDS_1 = { "time", "source_ip", "header_from", "policy_domain", "p", "sp", "pct", "disposition",
                   "dkim", "spf", "envelope_from", "spf_domain", "spf_result", "dkim_results" }
local VERSIONS = { ["1"] = FIELDS_1, ["2"] = FIELDS }
local DEFAULTS = { adkim = "r", aspf = "r", fo = "0", reason = "", spf_scope = "mfrom" }

local escape, unescape = reports.escape, reports.unescape

function Recorder:day_path(t)
  return reports.path(self, t, self.suffix)
end

--- rec:record(verdict, { source_ip =, envelope_from =, spf = {result, domain [, identity]},
--   dkim = { {result, domain, selector}, ... }, time = }) -> true | nil, "io", detail
-- Records what a report's <record> needs: the row (source IP, the
-- disposition and the aligned dkim/spf outcome), the identifiers, the
-- raw SPF and DKIM results and the policy applied. spf.identity "helo"
-- (as the mailauth plugin sets it for a null sender) is scope helo.
-- Messages without a DMARC record are not recorded (nobody asked for
-- reports).
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
  local rec = verdict.record
  local entry = {
    time = math.floor(info.time or core.time()), source_ip = info.source_ip, header_from = verdict.from_domain,
    policy_domain = verdict.policy_domain, p = rec.p, sp = rec.sp, pct = rec.pct,
    adkim = rec.adkim, aspf = rec.aspf, fo = rec.fo, disposition = verdict.disposition,
    reason = verdict.sampled_out and "sampled_out" or nil,
    dkim = verdict.dkim_aligned and "pass" or "fail", spf = verdict.spf_aligned and "pass" or "fail",
    envelope_from = info.envelope_from, spf_domain = spf.domain,
    spf_scope = (spf.identity == "helo" or spf.scope == "helo") and "helo" or "mfrom", spf_result = spf.result,
  }
  local cols = { "2" }
  for _, f in ipairs(FIELDS) do
    cols[#cols + 1] = f == "dkim_results" and table.concat(dkim, ",") or escape(entry[f])
  end
  return reports.append(self, entry.time, table.concat(cols, "\t") .. "\n", self.sync)
end

local function decode_line(line)
  local cols = reports.split(line)
  local fields = VERSIONS[cols[1]]
  if not fields or #cols ~= #fields + 1 then
    return nil
  end
  local e = {}
  for i, name in ipairs(fields) do
    e[name] = unescape(cols[i + 1])
  end
  for k, v in pairs(DEFAULTS) do
    if e[k] == nil then e[k] = v end
  end
  e.time, e.pct = math.tointeger(tonumber(e.time)), math.tointeger(tonumber(e.pct))
  local results = {}
  for item in cols[#cols]:gmatch("[^,]+") do
    local d, s, r = item:match("^([^:]*):([^:]*):([^:]*)$")
    if d then
      results[#results + 1] = { domain = unescape(d), selector = unescape(s), result = unescape(r) }
    end
  end
  e.dkim_results = results
  if not e.time or e.policy_domain == "" then
    return nil
  end
  return e
end

--- rec:records(start, stop [, policy_domain]) -> { entry, ... }: the
-- lines of [start, stop), as tables with the fields of record() (dkim_results
-- a list of { domain, selector, result }).
function Recorder:records(start, stop, domain)
  return reports.read(self, start, stop, decode_line, domain)
end

-- ---------------------------------------------------------------------
-- The report (appendix C)

-- XML character data and attribute values: markup characters as
-- references; control characters, and bytes that are not UTF-8 or not
-- XML characters, as U+FFFD (XML 1.0 has no way to carry them).
local ENTITIES = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&apos;" }
local REPLACEMENT = "\u{FFFD}"

local function xml_text(v)
  local s = tostring(v == nil and "" or v)
  if not utf8.len(s) then
    s = s:gsub("[\128-\255]", REPLACEMENT)
  end
  s = s:gsub("\239\191[\190\191]", REPLACEMENT) -- U+FFFE, U+FFFF
  return (s:gsub("%c", REPLACEMENT):gsub("[&<>\"']", ENTITIES))
end
M.xml_text = xml_text

-- An XML writer over a list of lines: el(name, value) for text
-- elements, open(name)/close(name) around children.
local function writer()
  local out, depth = { '<?xml version="1.0" encoding="UTF-8"?>' }, 0
  local w = {}
  function w.el(name, value)
    out[#out + 1] = ("%s<%s>%s</%s>"):format(("  "):rep(depth), name, xml_text(value), name)
  end
  function w.open(name)
    out[#out + 1] = ("  "):rep(depth) .. "<" .. name .. ">"
    depth = depth + 1
  end
  function w.close(name)
    depth = depth - 1
    out[#out + 1] = ("  "):rep(depth) .. "</" .. name .. ">"
  end
  function w.text()
    return table.concat(out, "\n") .. "\n"
  end
  return w
end

--- rec:report_id(domain, start): "20261201T000000Z.example.org@<receiver>"
-- (the same when a report is retried).
function Recorder:report_id(domain, start)
  return reports.report_id(domain, start, self.receiver)
end

function Recorder:check_reporter()
  for _, k in ipairs { "org_name", "email", "receiver" } do
    assert(type(self[k]) == "string" and self[k] ~= "", "dmarc: " .. k .. " is needed to build reports")
  end
end

--- rec:report(policy_domain, start, stop) -> xml, groups | nil, "no data"
-- The aggregate report of the records of policy_domain in [start, stop)
-- (the date range ends one second before stop): one <record> per
-- distinct row, identifiers and auth_results, with its count; the
-- published policy is the one the latest message of the range met.
function Recorder:report(domain, start, stop)
  self:check_reporter()
  domain = assert(normalize(domain), "report: domain must be a domain name")
  local entries = self:records(start, stop, domain)
  if #entries == 0 then
    return nil, "no data"
  end
  local groups, order = {}, {}
  for _, e in ipairs(entries) do
    local parts = { e.source_ip, e.disposition, e.reason, e.dkim, e.spf, e.header_from, e.envelope_from,
      e.spf_domain, e.spf_scope, e.spf_result }
    for _, r in ipairs(e.dkim_results) do
      parts[#parts + 1] = r.domain .. "\0" .. r.selector .. "\0" .. r.result
    end
    local key = table.concat(parts, "\1")
    local g = groups[key]
    if not g then
      g = { entry = e, count = 0 }
      groups[key] = g
      order[#order + 1] = g
    end
    g.count = g.count + 1
  end
  local policy = entries[#entries]
  local w = writer()
  w.open("feedback")
  w.open("report_metadata")
  w.el("org_name", self.org_name)
  w.el("email", self.email)
  if self.extra_contact_info then
    w.el("extra_contact_info", self.extra_contact_info)
  end
  w.el("report_id", self:report_id(domain, start))
  w.open("date_range")
  w.el("begin", math.floor(start))
  w.el("end", math.floor(stop) - 1)
  w.close("date_range")
  w.close("report_metadata")
  w.open("policy_published")
  w.el("domain", domain)
  for _, k in ipairs { "adkim", "aspf", "p", "sp", "pct", "fo" } do
    w.el(k, policy[k])
  end
  w.close("policy_published")
  for _, g in ipairs(order) do
    local e = g.entry
    w.open("record")
    w.open("row")
    w.el("source_ip", e.source_ip)
    w.el("count", g.count)
    w.open("policy_evaluated")
    w.el("disposition", e.disposition)
    w.el("dkim", e.dkim)
    w.el("spf", e.spf)
    if e.reason ~= "" then
      w.open("reason")
      w.el("type", e.reason)
      w.close("reason")
    end
    w.close("policy_evaluated")
    w.close("row")
    w.open("identifiers")
    w.el("envelope_from", e.envelope_from)
    w.el("header_from", e.header_from)
    w.close("identifiers")
    w.open("auth_results")
    for _, r in ipairs(e.dkim_results) do
      w.open("dkim")
      w.el("domain", r.domain)
      if r.selector ~= "" then
        w.el("selector", r.selector)
      end
      w.el("result", r.result)
      w.close("dkim")
    end
    w.open("spf")
    w.el("domain", e.spf_domain ~= "" and e.spf_domain or e.envelope_from)
    w.el("scope", e.spf_scope)
    w.el("result", e.spf_result ~= "" and e.spf_result or "none")
    w.close("spf")
    w.close("auth_results")
    w.close("record")
  end
  w.close("feedback")
  return w.text(), order
end

-- ---------------------------------------------------------------------
-- Sending (sections 7.1 and 7.2.1.1)

local UNITS = { [""] = 1, k = 2 ^ 10, m = 2 ^ 20, g = 2 ^ 30, t = 2 ^ 40 }

--- report_uri(uri) -> { kind =, address = | url =, limit = bytes | nil } | nil, why
-- A dmarc-uri (section 6.2): a URI and an optional "!" size limit in
-- bytes with a unit k, m, g or t (powers of two).
function M.report_uri(uri)
  local base, n, unit = uri:match("^(.-)!(%d+)([kKmMgGtT]?)$")
  local limit
  if base then
    if #n > 15 then
      return nil, "invalid size limit"
    end
    limit = math.floor(tonumber(n) * UNITS[unit:lower()])
  else
    base = uri
  end
  local dest, why = reports.destination(base)
  if not dest then
    return nil, why
  end
  dest.limit = limit
  return dest
end

--- rec:mail(domain, start, stop, to, gz) -> message text (CRLF lines)
-- Section 7.2.1.1: multipart/mixed, a text part and the gzipped XML
-- as application/gzip named receiver!policy-domain!begin!end.xml.gz.
function Recorder:mail(domain, start, stop, to, gz)
  local id = self:report_id(domain, start)
  local b, e = math.floor(start), math.floor(stop) - 1
  return reports.mail {
    from = self.email, to = to, id = id,
    subject = "Report Domain: " .. domain .. " Submitter: " .. self.receiver .. " Report-ID: <" .. id .. ">",
    content_type = "multipart/mixed",
    text = "This is a DMARC aggregate report from " .. self.receiver .. " for " .. domain .. ",\n" ..
      reports.iso(b) .. " to " .. reports.iso(e) .. ".\n",
    attachment = { type = "application/gzip", data = gz, filename = ("%s!%s!%d!%d.xml.gz"):format(self.receiver,
      domain, b, e) },
  }
end

--- authorized(query, policy_domain, rua_domain) -> true | nil, why, temporary
-- Section 7.1: a destination outside the policy domain's organizational
-- domain must publish a v=DMARC1 record at
-- <policy-domain>._report._dmarc.<rua-domain>.
function M.authorized(query, policy_domain, rua_domain)
  if M.organizational_domain(policy_domain) == M.organizational_domain(rua_domain) then
    return true
  end
  local name = policy_domain .. "._report._dmarc." .. rua_domain
  if #name > 253 then
    return nil, name .. " is too long to verify the external destination"
  end
  local records, _, detail = txt.lookup(query, name)
  if not records then
    return nil, "external destination check: " .. tostring(detail), true
  end
  for _, r in ipairs(records) do
    local next_char = r:sub(9, 9)
    if r:sub(1, 8) == "v=DMARC1" and (next_char == "" or next_char:match("[ \t;]")) then
      return true
    end
  end
  return nil, "external destination not authorized: no v=DMARC1 record at " .. name
end

--- rec:send_due(now, opts) -> results
-- Report every finished UTC day (before now's day, within retry_days)
-- not yet reported: for each policy domain with data that day, its
-- DMARC record is looked up again; the gzipped report goes to each
-- mailto: URI of its rua (https: is not in RFC 7489) through
-- opts.submit(from, to, message) -> true | nil, err, unless the report
-- exceeds the URI's size limit or the destination is external and not
-- authorized (section 7.1). What failed for a temporary reason (DNS,
-- submit) is tried again at the next call until the day is retry_days
-- old; nothing is sent twice, also across a restart.
--   opts: submit, dns_query, log(level, fmt, ...) (told of every
--   destination skipped or failed)
-- results: { { domain =, day =, to =, ok =, error = }, ... }
function Recorder:send_due(now, opts)
  self:check_reporter()
  opts = opts or {}
  local query = opts.dns_query or txt.default_query()
  local results = reports.send_due(self, now, {
    domains = function(start, stop) return reports.domains(self:records(start, stop)) end,
    destinations = function(domain)
      local rec, token, why = lookup(query, domain)
      if not rec then
        return nil, why or ("no DMARC record at _dmarc." .. domain), token == "temperror"
      end
      if #rec.rua == 0 then
        return nil, "no rua in the DMARC record of " .. domain
      end
      return rec.rua
    end,
    send = function(domain, uri, start, stop, cache)
      local dest, why = M.report_uri(uri)
      if not dest then
        return nil, why
      end
      if dest.kind ~= "mailto" then
        return nil, "only mailto: report URIs are defined by RFC 7489"
      end
      local ok, err, temporary = M.authorized(query, domain, normalize(dest.address:match("@(.+)$")))
      if not ok then
        return nil, err, temporary
      end
      cache.gz = cache.gz or core.gzip((self:report(domain, start, stop)))
      if dest.limit and #cache.gz > dest.limit then
        return nil, ("the report (%d bytes gzipped) exceeds the limit of %d bytes"):format(#cache.gz, dest.limit)
      end
      local sent, serr = reports.submit(opts, self.email, dest.address,
        self:mail(domain, start, stop, dest.address, cache.gz))
      return sent, serr, true
    end,
  })
  if opts.log then
    for _, r in ipairs(results) do
      if not r.ok then
        opts.log("warning", "DMARC report for %s of %s%s not sent: %s", r.domain, r.day,
          r.to and (" to " .. r.to) or "", tostring(r.error))
      end
    end
  end
  return results
end

return M
