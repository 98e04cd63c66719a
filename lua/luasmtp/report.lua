--- luasmtp.report: what the aggregate reports of TLS-RPT (RFC 8460,
-- luasmtp.delivery.tlsrpt) and DMARC (RFC 7489, luasmtp.mailauth.dmarc)
-- share: a log of one line per event in a file per UTC day, report
-- mails with a gzipped attachment, report destinations, and sending each
-- finished day once per policy domain, with retries, restart-safe.
--
-- A "log" is any object with dir, retry_days, keep_days and suffix (the
-- extension of its day files): the recorders of both modules.
local core = require "luasmtp.core"
local store = require "luasmtp.store"
local txt = require "luasmtp.delivery.txt"

local M = {}

local DAY = 86400
M.DAY = DAY

-- ---------------------------------------------------------------------
-- Day files

--- day_of(t) -> "YYYY-MM-DD" (UTC)
function M.day_of(t)
  return os.date("!%Y-%m-%d", math.floor(t))
end

--- iso(t) -> "YYYY-MM-DDTHH:MM:SSZ"
function M.iso(t)
  return os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(t))
end

--- path(log, t, suffix) -> dir/<UTC day of t>.<suffix>
function M.path(log, t, suffix)
  return ("%s/%s.%s"):format(log.dir, M.day_of(t), suffix)
end

--- escape(s): the fields of a log line, percent-escaped so that no tab,
-- line break, "," or ":" (the separators of lists inside a field) is
-- left in them.
function M.escape(s)
  return (tostring(s or ""):gsub("[%%%c,:]", function(c) return ("%%%02X"):format(c:byte()) end))
end

function M.unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

--- split(line) -> { column, ... } (tab-separated)
function M.split(line)
  local cols = {}
  for col in (line .. "\t"):gmatch("([^\t]*)\t") do
    cols[#cols + 1] = col
  end
  return cols
end

--- append(log, t, line [, sync]) -> true | nil, "io", detail: one line
-- added to the log of t's day, fsynced unless sync is false.
function M.append(log, t, line, sync)
  local path = M.path(log, t, log.suffix)
  if sync ~= false then
    return core.append_file_sync(path, line)
  end
  local f, err = io.open(path, "ab")
  if not f then
    return nil, "io", err
  end
  f:write(line)
  f:close()
  return true
end

--- read(log, start, stop, decode [, domain]) -> { entry, ... }: the lines
-- of the day files covering [start, stop) that decode(line) turns into
-- an entry ({ time =, policy_domain =, ... }; nil skips a line, such as
-- a torn last one) with a time inside the range and, given domain, that
-- policy domain.
function M.read(log, start, stop, decode, domain)
  local out = {}
  local day = start - start % DAY
  while day < stop do
    local f = io.open(M.path(log, day, log.suffix), "rb")
    if f then
      for line in f:lines() do
        local e = decode(line)
        if e and e.time >= start and e.time < stop and (domain == nil or e.policy_domain == domain) then
          out[#out + 1] = e
        end
      end
      f:close()
    end
    day = day + DAY
  end
  return out
end

--- domains(entries) -> the sorted policy domains of entries
function M.domains(entries)
  local seen, list = {}, {}
  for _, e in ipairs(entries) do
    if not seen[e.policy_domain] then
      seen[e.policy_domain] = true
      list[#list + 1] = e.policy_domain
    end
  end
  table.sort(list)
  return list
end

--- report_id(domain, start, submitter): stable for a day and domain (a
-- retried report keeps it) and a valid msg-id:
-- "20261201T000000Z.example.com@submitter".
function M.report_id(domain, start, submitter)
  return ("%s.%s@%s"):format(os.date("!%Y%m%dT%H%M%SZ", math.floor(start)), domain, submitter)
end

-- ---------------------------------------------------------------------
-- Destinations

local function percent_decode(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

--- destination(uri) -> { kind = "mailto", address = } | { kind = "https", url = } | nil, why
-- A mailto: address is percent-decoded and must be one plain address
-- (no header fields, no second address, no line breaks).
function M.destination(uri)
  local addr = uri:match("^[Mm][Aa][Ii][Ll][Tt][Oo]:([^?]+)")
  if addr then
    addr = percent_decode(addr)
    local domain = addr:match("^[^@%s<>()\",;:\\%[%]%c]+@([^@%s]+)$")
    if not domain or not txt.domain(domain) or #addr > 254 then
      return nil, "invalid mailto address"
    end
    return { kind = "mailto", address = addr }
  end
  if uri:match("^[Hh][Tt][Tt][Pp][Ss]://[^/?#%s]+") then
    return { kind = "https", url = uri }
  end
  return nil, "unsupported URI scheme"
end

-- ---------------------------------------------------------------------
-- The report mail

local function wrap76(s)
  local lines = {}
  for i = 1, #s, 76 do
    lines[#lines + 1] = s:sub(i, i + 75)
  end
  return table.concat(lines, "\r\n")
end

local function token()
  return (core.b64encode(core.random(12)):gsub("[+/=]", "x"))
end

--- header_text(s): s without control characters, as an RFC 2047
-- encoded-word when it is not plain ASCII.
function M.header_text(s)
  s = tostring(s):gsub("%c", " ")
  if s:find("[\128-\255]") then
    return "=?UTF-8?B?" .. core.b64encode(s) .. "?="
  end
  return s
end

--- mail{ from =, to =, subject =, id =, headers = { "Name: value", ... },
--   content_type =, text =, attachment = { type =, filename =, data = } }
--   -> message text (CRLF lines)
-- A two-part message: a text/plain part, then the attachment in base64.
-- content_type is the top-level multipart type and its parameters, e.g.
-- 'multipart/report; report-type="tlsrpt"' (boundary added); id the
-- report id the Message-ID is made from.
function M.mail(m)
  local boundary = "report-" .. token()
  local lines = {
    "From: <" .. m.from .. ">",
    "To: <" .. m.to .. ">",
    "Date: " .. os.date("!%a, %d %b %Y %H:%M:%S +0000"),
    "Subject: " .. M.header_text(m.subject),
    "Message-ID: <" .. token() .. "." .. m.id .. ">",
  }
  for _, h in ipairs(m.headers or {}) do
    lines[#lines + 1] = h
  end
  for _, l in ipairs {
    "MIME-Version: 1.0",
    "Content-Type: " .. m.content_type .. ";",
    " boundary=\"" .. boundary .. "\"",
    "",
    "This is a multipart message in MIME format.",
    "",
    "--" .. boundary,
    "Content-Type: text/plain; charset=\"us-ascii\"",
    "Content-Transfer-Encoding: 7bit",
    "",
    (m.text:gsub("[^\t\n -~]", "?"):gsub("\r?\n", "\r\n")),
    "",
    "--" .. boundary,
    "Content-Type: " .. m.attachment.type,
    "Content-Transfer-Encoding: base64",
    "Content-Disposition: attachment;",
    " filename=\"" .. m.attachment.filename .. "\"",
    "",
    wrap76(core.b64encode(m.attachment.data)),
    "--" .. boundary .. "--",
    "",
  } do
    lines[#lines + 1] = l
  end
  return table.concat(lines, "\r\n")
end

--- submit(opts, from, to, message) -> true | nil, err: through the
-- caller's opts.submit(from, to, message).
function M.submit(opts, from, to, message)
  if not opts.submit then
    return nil, "no submit function for mailto: reports"
  end
  local ok, err = opts.submit(from, to, message)
  if not ok then
    return nil, tostring(err or "submit failed")
  end
  return true
end

-- ---------------------------------------------------------------------
-- Sending each finished day once

local function exists(path)
  local f = io.open(path, "rb")
  if f then
    f:close()
    return true
  end
  return false
end

--- send_due(log, now, job) -> results
-- For every finished UTC day (before now's day, within log.retry_days)
-- not yet done: for each policy domain of job.domains(start, stop),
-- job.destinations(domain, start, stop) -> { uri, ... } | nil, why,
-- temporary; then, for each uri not yet sent,
-- job.send(domain, uri, start, stop, cache) -> true | nil, why, temporary
-- (cache: one table per domain and day, e.g. for the gzipped report).
-- What was sent, or will never be, is noted in <day>.sent (one line per
-- domain and URI, "domain\t*" when the domain is finished) and the day in
-- <day>.done, so a restart sends nothing twice. A temporary failure is
-- tried again at the next call until the day is retry_days old.
-- results: { { domain =, day =, to =, ok =, error = }, ... }
function M.send_due(log, now, job)
  local today = now - now % DAY
  local results = {}
  for age = log.retry_days, 1, -1 do
    local start = today - age * DAY
    M.send_day(log, start, start + DAY, job, age == log.retry_days, results)
  end
  M.cleanup(log, today)
  return results
end

function M.send_day(log, start, stop, job, last_chance, results)
  local done_path = M.path(log, start, "done")
  if exists(done_path) or not exists(M.path(log, start, log.suffix)) then
    return
  end
  local sent_path = M.path(log, start, "sent")
  local sent = {}
  local f = io.open(sent_path)
  if f then
    for line in f:lines() do sent[line] = true end
    f:close()
  end
  local day = M.day_of(start)
  local pending = false
  for _, domain in ipairs(job.domains(start, stop)) do
    if not sent[domain .. "\t*"] then
      local uris, why, temporary = job.destinations(domain, start, stop)
      local all = true
      if not uris then
        results[#results + 1] = { domain = domain, day = day, ok = false, error = why }
        all = not temporary
      else
        local cache = {}
        for _, uri in ipairs(uris) do
          if not sent[domain .. "\t" .. uri] then
            local ok, err, again = job.send(domain, uri, start, stop, cache)
            results[#results + 1] = { domain = domain, day = day, to = uri, ok = ok == true, error = err }
            if ok or not again then
              core.append_file_sync(sent_path, domain .. "\t" .. uri .. "\n")
            else
              all = false
            end
          end
        end
      end
      if all or last_chance then
        core.append_file_sync(sent_path, domain .. "\t*\n")
      else
        pending = true
      end
    end
  end
  if not pending then
    store.replace_file(done_path, day .. "\n")
  end
end

--- cleanup(log, today): remove the files of days older than keep_days
-- (looking back 60 days).
function M.cleanup(log, today)
  for age = log.keep_days + 1, log.keep_days + 60 do
    local t = today - age * DAY
    for _, suffix in ipairs { log.suffix, "sent", "done" } do
      os.remove(M.path(log, t, suffix))
    end
  end
end

return M
