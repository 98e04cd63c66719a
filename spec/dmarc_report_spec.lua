--- DMARC aggregate reports (lua/luasmtp/mailauth/dmarc.lua, RFC 7489
-- section 7): the appendix C XML built from recorded messages, read back
-- with Python's xml.etree, gzip and email modules (spec/dmarc_check.py);
-- send_due() with the external destination check, the size limit and
-- once-only sending across a restart; and a report sent with luasmtp's
-- client to aiosmtpd and read back there.
local dkjson = require "dkjson"
local client = require "luasmtp.client"
local dmarc = require "luasmtp.mailauth.dmarc"
local fake = require "spec.fake_smtp"
local H = require "spec.helper"

local DAY = 86400
local D0 = 1764547200 -- 2025-12-01T00:00:00Z
local FFFD = "\u{FFFD}"

local function fresh_dir(name)
  local dir = H.tmp .. "/" .. name
  os.execute("mkdir -p " .. H.shquote(H.tmp) .. "; rm -rf " .. H.shquote(dir))
  return dir
end

local ORG = "Example & <Sons> \"Mail\" 'Receivers'"

local function new(dir, extra)
  local o = { dir = dir, org_name = ORG, email = "dmarc-reports@receiver.test",
    extra_contact_info = "https://receiver.test/dmarc?a=1&b=2" }
  for k, v in pairs(extra or {}) do o[k] = v end
  return dmarc.new(o)
end

--- Run spec/dmarc_check.py on data; its decoded JSON output, or nil and
-- the output when it failed.
local function python_check(kind, data)
  H.need("python3")
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
  local p = assert(io.popen(H.python3 .. " " .. H.shquote(H.root .. "/spec/dmarc_check.py") .. " " .. kind .. " " ..
    H.shquote(path) .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  os.remove(path)
  if not ok then return nil, out end
  return assert(dkjson.decode(out), out)
end

--- A DNS function over a table: name -> list of TXT strings, or false
-- for SERVFAIL; asked names are noted in queries.
local function zone_query(zone, queries)
  return function(name, qtype)
    assert.equal("TXT", qtype)
    if queries then queries[#queries + 1] = name end
    local answers = zone[name]
    if answers == false then
      return nil, "dns", name .. " TXT: SERVFAIL"
    end
    return { rcode = answers and "NOERROR" or "NXDOMAIN", authentic = false, answers = answers or {} }
  end
end

local ZONE = {
  ["_dmarc.example.test"] = { "v=DMARC1; p=reject; sp=quarantine; adkim=s; aspf=r; fo=1; " ..
    "rua=mailto:agg@example.test!10m,mailto:dmarc@reports.other.test,mailto:tiny@example.test!50," ..
    "mailto:x@unauth.test,https://reports.other.test/dmarc,mailto:r@sub.example.test" },
  ["example.test._report._dmarc.reports.other.test"] = { "v=DMARC1" },
  ["_dmarc.half.test"] = { "v=DMARC1; p=reject; pct=50; rua=mailto:agg@half.test" },
}

-- hostile values, as a DKIM signature and a MAIL FROM can carry them
local SELECTOR = "sel<1>&\"'\1\27\255"
local SELECTOR_XML = "sel<1>&\"'" .. FFFD .. FFFD .. FFFD
local DKIM_DOMAIN = "x</domain><evil/>.test"
local ENVELOPE = "a&b<c>\"d'\tz\n"
local ENVELOPE_XML = "a&b<c>\"d'" .. FFFD .. "z" .. FFFD

--- The day: 3 aligned messages from one source, 2 unaligned from
-- another, one with hostile identifiers, one from a subdomain (sp) with
-- a null sender (SPF at HELO); one outside the day and one of another
-- policy domain.
local function record_day(rec, t0)
  local query = zone_query(ZONE)
  local function one(dt, from_domain, info, random)
    local spf = info.spf
    local v = dmarc.evaluate { from_domain = from_domain, query = query, random = random,
      spf = spf and { result = spf.result, domain = spf.domain }, dkim = info.dkim }
    assert.truthy(v.record, from_domain)
    info.time = t0 + dt
    assert(rec:record(v, info))
    return v
  end
  for i = 1, 3 do
    local v = one(10 + i, "example.test", { source_ip = "192.0.2.1", envelope_from = "example.test",
      spf = { result = "pass", domain = "example.test" },
      dkim = { { result = "pass", domain = "example.test", selector = "s2025" } } })
    assert.equal("pass", v.result)
  end
  for i = 1, 2 do
    local v = one(100 + i, "example.test", { source_ip = "192.0.2.2", envelope_from = "bounce.elsewhere.test",
      spf = { result = "pass", domain = "bounce.elsewhere.test" },
      dkim = { { result = "pass", domain = "elsewhere.test", selector = "k1" },
               { result = "fail", domain = "example.test", selector = "s2025" } } })
    assert.same({ "fail", "reject" }, { v.result, v.disposition })
  end
  one(200, "example.test", { source_ip = "2001:db8::5", envelope_from = ENVELOPE,
    spf = { result = "softfail", domain = ENVELOPE },
    dkim = { { result = "permerror", domain = DKIM_DOMAIN, selector = SELECTOR } } })
  local sub = one(300, "mail.example.test", { source_ip = "198.51.100.7", envelope_from = "",
    spf = { result = "none", domain = "helo.sender.test", identity = "helo" } })
  assert.same({ "example.test", "quarantine", "quarantine" }, { sub.policy_domain, sub.policy, sub.disposition })
  one(DAY + 5, "example.test", { source_ip = "192.0.2.1", spf = { result = "pass", domain = "example.test" } })
  -- and one before the days send_due looks at
  one(-10 * DAY + 5, "example.test", { source_ip = "192.0.2.1", spf = { result = "pass", domain = "example.test" } })
  local half = one(400, "half.test", { source_ip = "192.0.2.9", spf = { result = "fail", domain = "half.test" } },
    function() return 0.99 end)
  assert.is_true(half.sampled_out)
end

describe("dmarc reports", function()
  after_each(function()
    H.assert_no_leaks()
  end)

  it("build the appendix C XML: one record per row and results, counted, every value escaped", function()
    local dir = fresh_dir("dmarc_report")
    record_day(new(dir), D0)
    local rec = new(dir) -- a restarted process reads the same data
    local xml = assert(rec:report("example.test", D0, D0 + DAY))
    assert.is_nil(xml:find("<evil", 1, true))
    local r = assert(python_check("xml", xml))
    assert.equal("feedback", r.root)
    assert.same({ "report_metadata", "policy_published", "record", "record", "record", "record" }, r.order)
    assert.same({ org_name = ORG, email = "dmarc-reports@receiver.test",
      extra_contact_info = "https://receiver.test/dmarc?a=1&b=2",
      report_id = "20251201T000000Z.example.test@receiver.test" }, r.metadata)
    assert.same({ "org_name", "email", "extra_contact_info", "report_id", "date_range" }, r.metadata_order)
    assert.same({ begin = tostring(D0), ["end"] = tostring(D0 + DAY - 1) }, r.date_range)
    assert.same({ domain = "example.test", adkim = "s", aspf = "r", p = "reject", sp = "quarantine", pct = "100",
      fo = "1" }, r.policy)
    assert.same({ "domain", "adkim", "aspf", "p", "sp", "pct", "fo" }, r.policy_order)

    local a, b, c, d = table.unpack(r.records)
    assert.same({ source_ip = "192.0.2.1", count = "3" }, a.row)
    assert.same({ disposition = "none", dkim = "pass", spf = "pass" }, a.policy_evaluated)
    assert.same({ envelope_from = "example.test", header_from = "example.test" }, a.identifiers)
    assert.same({ { domain = "example.test", selector = "s2025", result = "pass" } }, a.dkim)
    assert.same({ { domain = "example.test", scope = "mfrom", result = "pass" } }, a.spf)

    assert.same({ source_ip = "192.0.2.2", count = "2" }, b.row)
    assert.same({ disposition = "reject", dkim = "fail", spf = "fail" }, b.policy_evaluated)
    assert.same({ envelope_from = "bounce.elsewhere.test", header_from = "example.test" }, b.identifiers)
    assert.same({ { domain = "elsewhere.test", selector = "k1", result = "pass" },
                  { domain = "example.test", selector = "s2025", result = "fail" } }, b.dkim)
    assert.same({ { domain = "bounce.elsewhere.test", scope = "mfrom", result = "pass" } }, b.spf)

    assert.same({ source_ip = "2001:db8::5", count = "1" }, c.row)
    assert.same({ envelope_from = ENVELOPE_XML, header_from = "example.test" }, c.identifiers)
    assert.same({ { domain = DKIM_DOMAIN, selector = SELECTOR_XML, result = "permerror" } }, c.dkim)
    assert.same({ { domain = ENVELOPE_XML, scope = "mfrom", result = "softfail" } }, c.spf)

    assert.same({ source_ip = "198.51.100.7", count = "1" }, d.row)
    assert.same({ disposition = "quarantine", dkim = "fail", spf = "fail" }, d.policy_evaluated)
    assert.same({ envelope_from = "", header_from = "mail.example.test" }, d.identifiers)
    assert.same({}, d.dkim)
    assert.same({ { domain = "helo.sender.test", scope = "helo", result = "none" } }, d.spf)

    -- pct: a failure outside the sample is reported with its reason
    r = assert(python_check("xml", (assert(rec:report("half.test", D0, D0 + DAY)))))
    assert.equal(1, #r.records)
    assert.same({ disposition = "quarantine", dkim = "fail", spf = "fail" }, r.records[1].policy_evaluated)
    assert.same({ "sampled_out" }, r.records[1].reasons)
    assert.equal("50", r.policy.pct)

    -- nothing recorded: no report
    assert.same({ nil, "no data" }, { rec:report("quiet.test", D0, D0 + DAY) })
    -- a torn last line (a crash while appending) is skipped
    local f = assert(io.open(dir .. "/2025-12-01.dmarc", "ab"))
    f:write("2\t" .. D0 .. "\t192.0.2.1")
    f:close()
    r = assert(python_check("xml", (assert(new(dir):report("example.test", D0, D0 + DAY)))))
    assert.equal("3", r.records[1].row.count)
    assert.equal(4, #r.records)
    -- the checker does refuse broken XML
    assert.is_nil(python_check("xml", "<feedback><a>&</a></feedback>"))
    -- reporting needs the reporter's identity
    assert.has_error(function() dmarc.new({ dir = dir }):report("example.test", D0, D0 + DAY) end)
  end)

  it("escape what XML cannot carry", function()
    assert.equal("&lt;a&gt;&amp;&quot;&apos;", dmarc.xml_text("<a>&\"'"))
    assert.equal(FFFD .. "x" .. FFFD, dmarc.xml_text("\0x\127"))
    assert.equal("caf\u{E9}", dmarc.xml_text("caf\u{E9}"))
    assert.equal("caf" .. FFFD, dmarc.xml_text("caf\233"))
    assert.equal(FFFD, dmarc.xml_text("\u{FFFE}"))
    -- a header_from as hostile as the rest, in a report read by Python
    local rec = new(fresh_dir("dmarc_hostile"))
    local record = assert(dmarc.parse_record("v=DMARC1; p=none; rua=mailto:a@example.test"))
    local from = "a<b>&\"c'\r\n</header_from><x>]]>.test"
    assert(rec:record({ record = record, from_domain = from, policy_domain = "example.test", disposition = "none" },
      { source_ip = "192.0.2.1", time = D0, dkim = { { domain = from, selector = from, result = "fail" } },
        spf = { domain = from, result = "none" }, envelope_from = from }))
    local xml = assert(rec:report("example.test", D0, D0 + DAY))
    local r = assert(python_check("xml", xml))
    local want = "a<b>&\"c'" .. FFFD .. FFFD .. "</header_from><x>]]>.test"
    assert.same({ envelope_from = want, header_from = want }, r.records[1].identifiers)
    assert.same({ { domain = want, selector = want, result = "fail" } }, r.records[1].dkim)
    assert.same({ { domain = want, scope = "mfrom", result = "none" } }, r.records[1].spf)
  end)

  it("read report URIs with their size limits", function()
    assert.same({ kind = "mailto", address = "a@example.test", limit = 10 * 1024 * 1024 },
      dmarc.report_uri("mailto:a@example.test!10m"))
    assert.same({ kind = "mailto", address = "a@example.test", limit = 50 },
      dmarc.report_uri("mailto:a@example.test!50"))
    assert.same({ kind = "mailto", address = "a@example.test", limit = 2048 },
      dmarc.report_uri("mailto:a@example.test!2K"))
    assert.same({ kind = "mailto", address = "a@example.test" }, dmarc.report_uri("mailto:a@example.test"))
    assert.same({ kind = "https", url = "https://r.test/x", limit = 1024 }, dmarc.report_uri("https://r.test/x!1k"))
    for _, bad in ipairs { "mailto:a@example.test!x", "mailto:a@b@c.test", "ftp://x/", "mailto:a@x!9999999999999999",
      "mailto:a%0D%0ABcc:b@c.test@x.test" } do
      assert.is_nil(dmarc.report_uri(bad), bad)
    end
  end)

  it("verify external destinations (section 7.1)", function()
    local queries = {}
    local query = zone_query({
      ["example.test._report._dmarc.reports.other.test"] = { "v=DMARC1;" },
      ["example.test._report._dmarc.wrong.test"] = { "v=DMARC2", "v=spf1 -all", "v=DMARC10" },
      ["example.test._report._dmarc.failing.test"] = false,
    }, queries)
    assert.is_true(dmarc.authorized(query, "example.test", "reports.other.test"))
    assert.is_true(dmarc.authorized(query, "mail.example.test", "sub.example.test")) -- same organizational domain
    local ok, why, temporary = dmarc.authorized(query, "example.test", "wrong.test")
    assert.same({ nil, false }, { ok, temporary == true })
    assert.matches("no v=DMARC1 record at example.test._report._dmarc.wrong.test", why, 1, true)
    ok, why, temporary = dmarc.authorized(query, "example.test", "nothing.test")
    assert.is_nil(ok)
    assert.matches("not authorized", why)
    assert.is_nil(temporary)
    ok, why, temporary = dmarc.authorized(query, "example.test", "failing.test")
    assert.same({ nil, true }, { ok, temporary })
    assert.matches("SERVFAIL", why)
    assert.same({ "example.test._report._dmarc.reports.other.test", "example.test._report._dmarc.wrong.test",
      "example.test._report._dmarc.nothing.test", "example.test._report._dmarc.failing.test" }, queries)
  end)

  it("send each finished day once per domain, to the rua addresses that may have it", function()
    local dir = fresh_dir("dmarc_send")
    local rec = new(dir)
    record_day(rec, D0)
    local zone = {}
    for k, v in pairs(ZONE) do zone[k] = v end
    local queries, submitted, logged = {}, {}, {}
    local opts = {
      dns_query = zone_query(zone, queries),
      submit = function(from, to, message)
        submitted[#submitted + 1] = { from = from, to = to, message = message }
        return true
      end,
      log = function(level, fmt, ...) logged[#logged + 1] = level .. ": " .. fmt:format(...) end,
    }
    -- the day is not over yet: nothing is due
    assert.same({}, rec:send_due(D0 + 3600, opts))
    zone["_dmarc.half.test"] = false -- a DNS failure: tried again at the next run
    local results = rec:send_due(D0 + DAY + 3600, opts)
    local by = {}
    for _, r in ipairs(results) do by[r.domain .. " " .. (r.to or "")] = r end
    assert.equal(7, #results)
    assert.is_true(by["example.test mailto:agg@example.test!10m"].ok)
    assert.is_true(by["example.test mailto:dmarc@reports.other.test"].ok)
    assert.is_true(by["example.test mailto:r@sub.example.test"].ok)
    assert.matches("exceeds the limit of 50 bytes", by["example.test mailto:tiny@example.test!50"].error)
    assert.matches("not authorized: no v=DMARC1 record at example.test._report._dmarc.unauth.test",
      by["example.test mailto:x@unauth.test"].error, 1, true)
    assert.matches("only mailto:", by["example.test https://reports.other.test/dmarc"].error)
    assert.matches("SERVFAIL", by["half.test "].error)
    local to = {}
    for i, m in ipairs(submitted) do
      to[i] = m.to
      assert.equal("dmarc-reports@receiver.test", m.from)
    end
    table.sort(to)
    assert.same({ "agg@example.test", "dmarc@reports.other.test", "r@sub.example.test" }, to)
    assert.equal(4, #logged)
    for _, l in ipairs(logged) do assert.matches("^warning: DMARC report for ", l) end
    -- the record was asked for again; only the external destinations were checked
    local asked = {}
    for _, q in ipairs(queries) do asked[q] = (asked[q] or 0) + 1 end
    assert.same({ ["_dmarc.example.test"] = 1, ["_dmarc.half.test"] = 1,
      ["example.test._report._dmarc.reports.other.test"] = 1, ["example.test._report._dmarc.unauth.test"] = 1 },
      asked)

    -- the mail, read with Python's email package
    local m = assert(python_check("mail", submitted[1].message))
    assert.same({}, m.defects)
    assert.equal("multipart/mixed", m.content_type)
    assert.equal("dmarc-reports@receiver.test", m.headers.from)
    assert.equal("Report Domain: example.test Submitter: receiver.test " ..
      "Report-ID: <20251201T000000Z.example.test@receiver.test>", m.headers.subject)
    assert.truthy(m.headers["message-id"])
    assert.truthy(m.headers.date)
    assert.equal(2, #m.parts)
    assert.equal("text/plain", m.parts[1].content_type)
    assert.equal("application/gzip", m.parts[2].content_type)
    assert.equal("attachment", m.parts[2].disposition)
    assert.equal("receiver.test!example.test!" .. D0 .. "!" .. (D0 + DAY - 1) .. ".xml.gz", m.parts[2].filename)
    assert.same({}, m.parts[2].defects)
    assert.equal(4, #m.report.records)
    assert.equal("3", m.report.records[1].row.count)
    -- the attachment is the gzip of the report (read with Python's gzip)
    local b64 = submitted[1].message:match("filename=\"[^\"]+\"\r\n\r\n(.-)\r\n%-%-")
    local gz = require("luasmtp.core").b64decode((b64:gsub("\r\n", "")))
    assert.same(m.report, python_check("gzip", gz))

    -- the next run retries half.test only; then nothing is left, also after a restart
    zone["_dmarc.half.test"] = ZONE["_dmarc.half.test"]
    results = rec:send_due(D0 + DAY + 7200, opts)
    assert.same({ { domain = "half.test", day = "2025-12-01", to = "mailto:agg@half.test", ok = true } }, results)
    assert.equal("agg@half.test", submitted[4].to)
    assert.same({}, rec:send_due(D0 + DAY + 10800, opts))
    assert.same({}, new(dir):send_due(D0 + 2 * DAY - 1, opts))
    assert.equal(4, #submitted)
  end)

  it("retry a failed submission, and give up when the day is retry_days old", function()
    local dir = fresh_dir("dmarc_retry")
    local rec = new(dir, { retry_days = 2 })
    local query = zone_query { ["_dmarc.example.test"] = { "v=DMARC1; p=none; rua=mailto:a@example.test" },
      ["_dmarc.half.test"] = { "v=DMARC1; p=none; rua=mailto:a@half.test" } }
    for _, domain in ipairs { "example.test", "half.test" } do
      local v = dmarc.evaluate { from_domain = domain, query = query, spf = { result = "pass", domain = domain } }
      assert(rec:record(v, { source_ip = "192.0.2.1", envelope_from = domain,
        spf = { result = "pass", domain = domain }, time = D0 + 60 }))
    end
    query = zone_query { ["_dmarc.example.test"] = { "v=DMARC1; p=none; rua=mailto:a@example.test" } }
    local tries = 0
    local opts = {
      dns_query = query,
      submit = function()
        tries = tries + 1
        return nil, "451 4.3.0 try later"
      end,
    }
    local results = rec:send_due(D0 + DAY + 60, opts)
    assert.equal(2, #results) -- example.test's rua, and half.test without a record here
    for _, r in ipairs(results) do
      if r.domain == "example.test" then
        assert.same({ false, "451 4.3.0 try later" }, { r.ok, r.error })
      else
        assert.matches("no DMARC record at _dmarc.half.test", r.error, 1, true)
      end
    end
    assert.equal(1, #rec:send_due(D0 + DAY + 120, opts)) -- only the failed one again
    assert.equal(1, #rec:send_due(D0 + 2 * DAY + 60, opts)) -- the last chance
    assert.same({}, rec:send_due(D0 + 2 * DAY + 120, opts))
    assert.equal(3, tries)
    -- the data of old days goes after keep_days
    assert.truthy(io.open(dir .. "/2025-12-01.dmarc")):close()
    rec:send_due(D0 + 9 * DAY, opts)
    assert.is_nil(io.open(dir .. "/2025-12-01.dmarc"))
    assert.is_nil(io.open(dir .. "/2025-12-01.sent"))
  end)

  describe("to a real SMTP server", function()
    local smtp_port, smtp_log, smtp_pid

    lazy_setup(function()
      H.run(function()
        smtp_port, smtp_log, smtp_pid = fake.aiosmtpd("--tls none")
      end, 30)
    end)

    lazy_teardown(function()
      if smtp_pid then H.kill(smtp_pid) end
    end)

    it("delivers the report through luasmtp's client, read back by Python", function()
      H.run(function()
        local dir = fresh_dir("dmarc_real")
        local rec = new(dir)
        record_day(rec, D0)
        local query = zone_query {
          ["_dmarc.example.test"] = { "v=DMARC1; p=reject; sp=quarantine; rua=mailto:dmarc@reports.other.test!1m" },
          ["example.test._report._dmarc.reports.other.test"] = { "v=DMARC1" },
        }
        local function submit(from, to, message)
          local res, _, err = client.send { host = "127.0.0.1", port = smtp_port, tls = "none", helo = "receiver.test",
            from = from, to = { to }, body = message, timeouts = { connect = 10, command = 10, data_end = 10 } }
          if not res then return nil, tostring(err) end
          return true
        end
        local results = rec:send_due(D0 + DAY + 60, { dns_query = query, submit = submit })
        table.sort(results, function(x, y) return x.domain < y.domain end)
        assert.equal(2, #results)
        assert.same({ domain = "example.test", day = "2025-12-01", to = "mailto:dmarc@reports.other.test!1m",
          ok = true }, results[1])
        local mails = fake.messages(smtp_log)
        assert.equal(1, #mails)
        assert.equal("dmarc-reports@receiver.test", mails[1].from)
        assert.same({ "dmarc@reports.other.test" }, mails[1].to)
        local m = assert(python_check("mail", mails[1].data))
        assert.same({}, m.defects)
        assert.equal("application/gzip", m.parts[2].content_type)
        assert.equal("receiver.test!example.test!" .. D0 .. "!" .. (D0 + DAY - 1) .. ".xml.gz", m.parts[2].filename)
        assert.equal("20251201T000000Z.example.test@receiver.test", m.report.metadata.report_id)
        local counts = {}
        for _, r in ipairs(m.report.records) do counts[#counts + 1] = r.row.source_ip .. "=" .. r.row.count end
        assert.same({ "192.0.2.1=3", "192.0.2.2=2", "2001:db8::5=1", "198.51.100.7=1" }, counts)
        assert.same({ SELECTOR_XML }, { m.report.records[3].dkim[1].selector })
        -- sent once, also by a restarted process
        assert.same({}, new(dir):send_due(D0 + DAY + 120, { dns_query = query, submit = submit }))
        assert.equal(1, #fake.messages(smtp_log))
      end, 60)
    end)
  end)
end)
