--- luasmtp.delivery.tlsrpt: SMTP TLS Reporting (RFC 8460).
--
--   local tlsrpt = require "luasmtp.delivery.tlsrpt"
--   local rec = tlsrpt.new { dir = "/var/lib/luasmtp/tlsrpt", organization = "Example Inc.",
--                            contact = "postmaster@example.org", submitter = "mail.example.org" }
--   rec:record { policy_domain = "example.com", policy_type = "sts", policy_strings = {...},
--                mx_host = "mx1.example.com", result = "success" }
--   rec:send_due(luasmtp.time(), { submit = function(from, to, message) ... end })
--
-- Every delivery attempt is recorded as one line appended (and fsynced)
-- to the log of its UTC day in dir, so a restart keeps the counts.
-- send_due() reports each finished day once per policy domain that
-- publishes a _smtp._tls TXT record: the RFC's JSON, gzipped, as a mail
-- to its mailto: addresses (through the submit function given) and as a
-- POST to its https: addresses.
local core = require "luasmtp.core"
local http = require "luasmtp.http"
local json = require "luasmtp.json"
local options = require "luasmtp.options"
local reports = require "luasmtp.report"
local txt = require "luasmtp.delivery.txt"

local M = {}


--- The result types of RFC 8460 section 4.3, and "success".
M.RESULT_TYPES = {
  -- negotiation failures (4.3.1)
  "starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
  "validation-failure",
  -- DANE policy failures (4.3.2.1)
  "tlsa-invalid", "dnssec-invalid", "dane-required",
  -- MTA-STS policy failures (4.3.2.2)
  "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
}
local IS_RESULT = { success = true }
for _, r in ipairs(M.RESULT_TYPES) do IS_RESULT[r] = true end

local IS_POLICY_TYPE = { sts = true, tlsa = true, ["no-policy-found"] = true }

-- ---------------------------------------------------------------------
-- The _smtp._tls record (RFC 8460 section 3)

--- parse_txt(record) -> { rua = { uri, ... } } | nil, why
--   v=TLSRPTv1; rua=mailto:a@example.com,https://r.example.com/x[; ext=value][;]
function M.parse_txt(record)
  local fields, why = txt.fields(record, "v=TLSRPTv1")
  if not fields then
    return nil, why
  end
  local rua
  for _, f in ipairs(fields) do
    local name, value = f[1], f[2]
    if name == "rua" then
      if rua then
        return nil, "more than one rua"
      end
      -- tlsrpt-rua = "rua=" uri *(*WSP "," *WSP uri)
      rua = {}
      for uri in (value .. ","):gmatch("[ \t]*([^,]-)[ \t]*,") do
        if not uri:match("^[!-~]+$") then
          return nil, "invalid URI in rua"
        end
        rua[#rua + 1] = uri
      end
    elseif not value:match("^[!-:<>-~]+$") then
      return nil, "invalid value of " .. name
    end
  end
  if not rua then
    return nil, "no rua"
  end
  return { rua = rua }
end

--- select_txt(records) -> { rua = {...} } | nil, why: exactly one
-- record starting with v=TLSRPTv1 must exist and be valid.
function M.select_txt(records)
  return txt.select(records, "v=TLSRPTv1", M.parse_txt)
end

--- destination(uri) -> { kind = "mailto", address = } | { kind = "https", url = } | nil, why
M.destination = reports.destination

-- ---------------------------------------------------------------------
-- Log lines: "1" then 11 fields, tab-separated, percent-escaped.

local FIELDS = { "time", "policy_domain", "policy_type", "policy_strings", "mx_host", "result",
  "sending_mta_ip", "receiving_ip", "receiving_mx_helo", "failure_reason_code", "additional_info" }

local escape, percent_decode = reports.escape, reports.unescape

local function encode_line(r)
  local strings = {}
  for i, s in ipairs(r.policy_strings or {}) do
    strings[i] = escape(s)
  end
  local cols = { "1" }
  for _, f in ipairs(FIELDS) do
    cols[#cols + 1] = f == "policy_strings" and table.concat(strings, ",") or
      f == "time" and tostring(math.floor(r.time)) or escape(r[f])
  end
  return table.concat(cols, "\t") .. "\n"
end

local function decode_line(line)
  local cols = reports.split(line)
  if cols[1] ~= "1" or #cols ~= #FIELDS + 1 then
    return nil
  end
  local r = {}
  for i, f in ipairs(FIELDS) do
    local v = cols[i + 1]
    if f == "policy_strings" then
      local list = {}
      if v ~= "" then
        for s in (v .. ","):gmatch("([^,]*),") do
          list[#list + 1] = percent_decode(s)
        end
      end
      r[f] = list
    elseif f == "time" then
      r[f] = math.tointeger(tonumber(v))
    else
      v = percent_decode(v)
      r[f] = v ~= "" and v or nil
    end
  end
  if not r.time or not r.policy_domain or not IS_RESULT[r.result or ""] then
    return nil
  end
  return r
end

-- ---------------------------------------------------------------------
-- The recorder

local Recorder = {}
Recorder.__index = Recorder

--- new{ dir =, organization =, contact =, submitter = [, from =] [, sync =] } -> recorder
--   dir           where the logs live (created)
--   organization  "organization-name" of the reports
--   contact       "contact-info" (an address or URL)
--   submitter     this host's domain: TLS-Report-Submitter, report ids
--   from          sender of the report mails (default "noreply-tlsrpt@" .. submitter)
--   sync          fsync every record (default true)
--   retry_days    days a report that failed to go out is retried (3)
--   keep_days     days the logs of reported days are kept (7)
M.schema = options.schema("tlsrpt", {
  { "dir", "string", nil, "directory of the daily logs and reports (created; required)" },
  { "organization", "string", nil, "`organization-name` of the reports (required)" },
  { "contact", "string", nil, "`contact-info` of the reports (required)" },
  { "submitter", "string", nil, "this host's domain: `TLS-Report-Submitter`, report ids and file names (required)" },
  { "from", "string", nil, "sender of report mails (default `noreply-tlsrpt@<submitter>`)" },
  { "sync", "boolean", true, "fsync each recorded line" },
  { "retry_days", "number", 3, "days a report that could not be sent is tried again" },
  { "keep_days", "number", 7, "days the logs of sent reports are kept" },
})

function M.new(opts)
  assert(type(opts) == "table", "tlsrpt.new: options table expected")
  opts = M.schema:apply(opts, 2)
  for _, k in ipairs { "dir", "organization", "contact", "submitter" } do
    assert(type(opts[k]) == "string" and opts[k] ~= "", "tlsrpt.new: " .. k .. " (a string) is required")
  end
  assert(not opts.submitter:find("[%s!]"), "tlsrpt.new: submitter must be a domain name")
  local self = setmetatable({
    dir = opts.dir,
    organization = opts.organization,
    contact = opts.contact,
    submitter = opts.submitter,
    from = opts.from or ("noreply-tlsrpt@" .. opts.submitter),
    sync = opts.sync,
    retry_days = opts.retry_days,
    keep_days = opts.keep_days,
    suffix = "log",
  }, Recorder)
  assert(not self.from:find("[%c<>]"), "tlsrpt.new: invalid from address")
  assert(core.mkdir(self.dir))
  return self
end

function Recorder:day_path(t, suffix)
  return reports.path(self, t, suffix)
end

--- rec:record{ ... } -> true | nil, "io", detail
--   policy_domain      the domain the policy belongs to: the recipient domain
--                      for "sts" and "no-policy-found", the TLSA base domain
--                      (the MX host) for "tlsa"
--   policy_type        "sts", "tlsa" or "no-policy-found"
--   policy_strings     the policy: MTA-STS policy lines, or TLSA records
--                      in presentation form
--   mx_host            the MX host name of the session
--   result             "success" or a result type (tlsrpt.RESULT_TYPES)
--   sending_mta_ip, receiving_ip, receiving_mx_helo, failure_reason_code,
--   additional_info    optional details of a failure
--   time               seconds (default now)
function Recorder:record(r)
  assert(type(r) == "table", "record: table expected")
  local domain = txt.domain(r.policy_domain)
  assert(domain, "record: policy_domain must be a domain name")
  assert(IS_POLICY_TYPE[r.policy_type], "record: policy_type must be sts, tlsa or no-policy-found")
  assert(IS_RESULT[r.result], "record: result must be \"success\" or an RFC 8460 result type")
  assert(r.policy_strings == nil or type(r.policy_strings) == "table", "record: policy_strings must be a list")
  local entry = {}
  for _, f in ipairs(FIELDS) do entry[f] = r[f] end
  entry.policy_domain = domain
  entry.mx_host = r.mx_host and r.mx_host:lower():gsub("%.$", "") or nil
  entry.time = r.time or core.time()
  return reports.append(self, entry.time, encode_line(entry), self.sync)
end

--- The records of the day files covering [start, stop).
function Recorder:records(start, stop, domain)
  return reports.read(self, start, stop, decode_line, domain)
end

local iso = reports.iso

--- The report id: stable for a day and domain (a retried report keeps
-- it), and a valid msg-id: "20261201T000000Z.example.com@submitter".
function Recorder:report_id(domain, start)
  return reports.report_id(domain, start, self.submitter)
end

--- rec:report(domain, start, stop) -> json, report table
-- The aggregate report for policy domain over [start, stop) (seconds;
-- the date range ends one second before stop, as the RFC's examples).
function Recorder:report(domain, start, stop)
  domain = assert(txt.domain(domain), "report: domain must be a domain name")
  local policies, order = {}, {}
  for _, r in ipairs(self:records(start, stop, domain)) do
    local key = table.concat({ r.policy_type, table.concat(r.policy_strings, "\n"),
      r.policy_type == "tlsa" and r.mx_host or "" }, "\0")
    local p = policies[key]
    if not p then
      p = { record = r, ok = 0, failed = 0, details = {}, detail_order = {}, mx = {}, mx_order = {} }
      policies[key] = p
      order[#order + 1] = key
    end
    if r.mx_host and not p.mx[r.mx_host] then
      p.mx[r.mx_host] = true
      p.mx_order[#p.mx_order + 1] = r.mx_host
    end
    if r.result == "success" then
      p.ok = p.ok + 1
    else
      p.failed = p.failed + 1
      local dkey = table.concat({ r.result, r.sending_mta_ip or "", r.receiving_ip or "", r.mx_host or "",
        r.receiving_mx_helo or "", r.failure_reason_code or "", r.additional_info or "" }, "\0")
      local d = p.details[dkey]
      if not d then
        d = {
          ["result-type"] = r.result,
          ["sending-mta-ip"] = r.sending_mta_ip,
          ["receiving-ip"] = r.receiving_ip,
          ["receiving-mx-hostname"] = r.mx_host,
          ["receiving-mx-helo"] = r.receiving_mx_helo,
          ["failure-reason-code"] = r.failure_reason_code,
          ["additional-information"] = r.additional_info,
          ["failed-session-count"] = 0,
        }
        p.details[dkey] = d
        p.detail_order[#p.detail_order + 1] = dkey
      end
      d["failed-session-count"] = d["failed-session-count"] + 1
    end
  end
  local list = json.array()
  for _, key in ipairs(order) do
    local p = policies[key]
    local r = p.record
    -- mx-host (an array since erratum 6241): the policy's patterns for
    -- MTA-STS, else the MX hosts seen
    local mx = json.array()
    if r.policy_type == "sts" then
      for _, s in ipairs(r.policy_strings) do
        local pattern = s:match("^mx:[ \t]*(.-)[ \t]*$")
        if pattern then mx[#mx + 1] = pattern end
      end
    else
      table.sort(p.mx_order)
      for i, h in ipairs(p.mx_order) do mx[i] = h end
    end
    local details = json.array()
    for i, dkey in ipairs(p.detail_order) do details[i] = p.details[dkey] end
    local policy = {
      ["policy-type"] = r.policy_type,
      ["policy-string"] = json.array { table.unpack(r.policy_strings) },
      ["policy-domain"] = domain,
    }
    if #mx > 0 then policy["mx-host"] = mx end
    local entry = {
      policy = policy,
      summary = {
        ["total-successful-session-count"] = p.ok,
        ["total-failure-session-count"] = p.failed,
      },
    }
    if #details > 0 then entry["failure-details"] = details end
    list[#list + 1] = entry
  end
  local report = {
    ["organization-name"] = self.organization,
    ["date-range"] = { ["start-datetime"] = iso(start), ["end-datetime"] = iso(stop - 1) },
    ["contact-info"] = self.contact,
    ["report-id"] = self:report_id(domain, start),
    policies = list,
  }
  return json.encode(report), report
end

--- The policy domains that have records in [start, stop), sorted.
function Recorder:domains(start, stop)
  return reports.domains(self:records(start, stop))
end

-- ---------------------------------------------------------------------
-- Sending

--- rec:mail(domain, start, stop, to, gz) -> message text (CRLF lines)
-- The report mail of RFC 8460 section 5.3: multipart/report with
-- report-type "tlsrpt", a text part and the application/tlsrpt+gzip
-- attachment.
function Recorder:mail(domain, start, stop, to, gz)
  local id = self:report_id(domain, start)
  return reports.mail {
    from = self.from, to = to, id = id,
    subject = "Report Domain: " .. domain .. " Submitter: " .. self.submitter .. " Report-ID: <" .. id .. ">",
    headers = { "TLS-Report-Domain: " .. domain, "TLS-Report-Submitter: " .. self.submitter },
    content_type = "multipart/report; report-type=\"tlsrpt\"",
    text = "This is an aggregate TLS report from " .. self.submitter .. " for " .. domain .. ",\n" ..
      iso(start) .. " to " .. iso(stop - 1) .. ".\n",
    attachment = {
      type = "application/tlsrpt+gzip", data = gz,
      filename = ("%s!%s!%d!%d.json.gz"):format(self.submitter, domain, math.floor(start), math.floor(stop - 1)),
    },
  }
end

--- Deliver the report of one day for one domain to one destination.
function Recorder:deliver(dest, domain, start, stop, gz, opts)
  if dest.kind == "mailto" then
    return reports.submit(opts, self.from, dest.address, self:mail(domain, start, stop, dest.address, gz))
  end
  local request = opts.http_request or http.request
  local status, headers, body = request {
    method = "POST", url = dest.url, body = gz, timeout = opts.timeout or 60, max_size = 64 * 1024,
    headers = { ["Content-Type"] = "application/tlsrpt+gzip" }, cafile = opts.cafile, capath = opts.capath,
    resolve = opts.resolve,
  }
  if not status then
    return nil, tostring(headers) .. ": " .. tostring(body)
  end
  if status < 200 or status > 299 then
    return nil, "HTTP " .. status
  end
  return true
end

--- rec:send_due(now, opts) -> results
-- Report every finished UTC day (before now's day, within retry_days)
-- not yet reported: for each policy domain with records that day, look
-- up _smtp._tls.<domain>; with exactly one valid v=TLSRPTv1 record, send
-- the gzipped report to each mailto: (opts.submit(from, to, message)
-- -> true | nil, err) and https: (POST) address. Destinations that
-- failed are retried at the next call until the day is retry_days old.
--   opts: dns_query, submit, http_request, cafile, capath, resolve (tests), timeout
-- results: { { domain =, day =, to =, ok =, error = }, ... }
-- Waits (DNS, HTTP and whatever submit does).
function Recorder:send_due(now, opts)
  opts = opts or {}
  local query = opts.dns_query or txt.default_query()
  return reports.send_due(self, now, {
    domains = function(start, stop) return self:domains(start, stop) end,
    destinations = function(domain)
      local records, _, detail = txt.lookup(query, "_smtp._tls." .. domain)
      if not records then
        return nil, detail, true -- DNS failed: try again later
      end
      local rec, why = M.select_txt(records)
      if not rec then
        return nil, why -- no record: nothing to send, ever
      end
      return rec.rua
    end,
    send = function(domain, uri, start, stop, cache)
      local dest, why = M.destination(uri)
      if not dest then
        return nil, why
      end
      cache.gz = cache.gz or core.gzip((self:report(domain, start, stop)))
      local ok, err = self:deliver(dest, domain, start, stop, cache.gz, opts)
      return ok, err, true
    end,
  })
end

return M
