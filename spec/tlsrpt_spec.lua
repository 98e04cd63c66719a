--- TLS reporting (lua/luasmtp/delivery/tlsrpt.lua): the _smtp._tls record,
-- recording that survives a restart, the RFC 8460 JSON report, and
-- send_due(): the gzipped report as a mail (submitted with luasmtp's own
-- client to aiosmtpd and read back with Python's email and gzip
-- modules) and as an HTTPS POST to spec/https_server.py.
local luasmtp = require "luasmtp"
local dkjson = require "dkjson"
local client = require "luasmtp.client"
local tlsrpt = require "luasmtp.delivery.tlsrpt"
local fake = require "spec.fake_smtp"
local H = require "spec.helper"

local DAY = 86400
local D0 = 1764547200 -- 2025-12-01T00:00:00Z

local STS_STRINGS = { "version: STSv1", "mode: enforce", "mx: mx1.example.test", "mx: *.mx.example.test",
  "max_age: 86400" }
local TLSA_STRINGS = { "3 1 1 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef" }

local function fresh_dir(name)
  local dir = H.tmp .. "/" .. name
  os.execute("rm -rf " .. H.shquote(dir))
  return dir
end

local function new(dir, extra)
  local o = { dir = dir, organization = "Luasmtp Test Org", contact = "tlsrpt@sender.test",
    submitter = "mail.sender.test" }
  for k, v in pairs(extra or {}) do o[k] = v end
  return tlsrpt.new(o)
end

--- Run spec/tlsrpt_check.py on data; returns its decoded JSON output.
local function python_check(kind, data)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
  H.need("python3 https server")
  local p = assert(io.popen(H.python3 .. " " .. H.shquote(H.root .. "/spec/tlsrpt_check.py") .. " " .. kind .. " " ..
    H.shquote(path) .. " 2>&1"))
  local out = p:read("a")
  p:close()
  os.remove(path)
  return assert(dkjson.decode(out), out)
end

--- A typical day for example.test (and two other domains).
local function record_day(rec, t0)
  local base = { policy_domain = "example.test", policy_type = "sts", policy_strings = STS_STRINGS,
    mx_host = "mx1.example.test", sending_mta_ip = "192.0.2.1", receiving_ip = "127.0.0.1" }
  local function rec_one(dt, extra)
    local r = {}
    for k, v in pairs(base) do r[k] = v end
    for k, v in pairs(extra) do r[k] = v end
    r.time = t0 + dt
    assert(rec:record(r))
  end
  for i = 1, 3 do rec_one(100 + i, { result = "success" }) end
  rec_one(200, { result = "certificate-expired", failure_reason_code = "X509_V_ERR_CERT_HAS_EXPIRED" })
  rec_one(300, { result = "certificate-expired", failure_reason_code = "X509_V_ERR_CERT_HAS_EXPIRED" })
  rec_one(400, { result = "starttls-not-supported", mx_host = "A.MX.Example.Test.", receiving_ip = "127.0.0.2",
    receiving_mx_helo = "a.mx.example.test", additional_info = "tab\there, comma, 100% sure\nnewline" })
  -- DANE for the MX host of another domain, no policy for a third
  assert(rec:record { policy_domain = "mx.other.test", policy_type = "tlsa", policy_strings = TLSA_STRINGS,
    mx_host = "mx.other.test", result = "success", time = t0 + 500 })
  assert(rec:record { policy_domain = "mx.other.test", policy_type = "tlsa", policy_strings = TLSA_STRINGS,
    mx_host = "mx.other.test", result = "tlsa-invalid", time = t0 + 600 })
  assert(rec:record { policy_domain = "plain.test", policy_type = "no-policy-found", mx_host = "mx.plain.test",
    result = "success", time = t0 + 700 })
end

describe("tlsrpt", function()
  after_each(function()
    H.assert_no_leaks()
  end)

  it("reads _smtp._tls records and their destinations", function()
    local r = assert(tlsrpt.parse_txt("v=TLSRPTv1; rua=mailto:tlsrpt@example.test,https://r.example.test/v1"))
    assert.same({ "mailto:tlsrpt@example.test", "https://r.example.test/v1" }, r.rua)
    r = assert(tlsrpt.parse_txt("v=TLSRPTv1 ;rua=mailto:a@example.test , mailto:b@example.test ; ext=1;"))
    assert.same({ "mailto:a@example.test", "mailto:b@example.test" }, r.rua)
    for _, bad in ipairs { "v=TLSRPTv1", "v=TLSRPTv1;", "v=TLSRPTv2; rua=mailto:a@b.test", "rua=mailto:a@b.test",
      "v=TLSRPTv1; rua=mailto:a@b.test; rua=mailto:c@d.test", "v=TLSRPTv1 rua=mailto:a@b.test",
      "v=TLSRPTv1; rua=mailto:a b@c.test" } do
      assert.is_nil(tlsrpt.parse_txt(bad), bad)
    end
    assert.truthy(tlsrpt.select_txt { "v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@b.test" })
    assert.is_nil(tlsrpt.select_txt { "v=TLSRPTv1; rua=mailto:a@b.test", "v=TLSRPTv1; rua=mailto:c@b.test" })
    assert.is_nil(tlsrpt.select_txt {})
    assert.same({ kind = "mailto", address = "tls+rpt@example.test" },
      tlsrpt.destination("mailto:tls%2Brpt@example.test?subject=x"))
    assert.same({ kind = "https", url = "https://r.example.test/v1" }, tlsrpt.destination("https://r.example.test/v1"))
    for _, bad in ipairs { "http://r.example.test/", "ftp://x/", "mailto:", "mailto:no-at", "mailto:a@b@c.test",
      "mailto:a@bad_domain", "mailto:a%0D%0ABcc:x@y.test@z.test", "https://" } do
      assert.is_nil(tlsrpt.destination(bad), bad)
    end
  end)

  it("checks what it records", function()
    local rec = new(fresh_dir("tlsrpt_args"))
    local good = { policy_domain = "example.test", policy_type = "sts", result = "success" }
    assert(rec:record(good))
    for _, change in ipairs {
      { result = "failure" }, { result = "certificate_expired" }, { policy_type = "dane" },
      { policy_domain = "bad domain" }, { policy_strings = "x" },
    } do
      local r = {}
      for k, v in pairs(good) do r[k] = v end
      for k, v in pairs(change) do r[k] = v end
      assert.has_error(function() rec:record(r) end)
    end
    for _, rt in ipairs(tlsrpt.RESULT_TYPES) do
      assert(rec:record { policy_domain = "example.test", policy_type = "sts", result = rt })
    end
    assert.equal(11, #tlsrpt.RESULT_TYPES)
  end)

  it("builds the RFC 8460 JSON report, and keeps the counts across a restart", function()
    local dir = fresh_dir("tlsrpt_report")
    record_day(new(dir), D0)
    -- records of the day before and after are outside the range
    assert(new(dir):record { policy_domain = "example.test", policy_type = "sts", policy_strings = STS_STRINGS,
      result = "success", time = D0 - 1 })
    assert(new(dir):record { policy_domain = "example.test", policy_type = "sts", policy_strings = STS_STRINGS,
      result = "success", time = D0 + DAY })
    local rec = new(dir) -- a restarted process
    local text = rec:report("example.test", D0, D0 + DAY)
    local r = assert(dkjson.decode(text))
    assert.equal("Luasmtp Test Org", r["organization-name"])
    assert.same({ ["start-datetime"] = "2025-12-01T00:00:00Z", ["end-datetime"] = "2025-12-01T23:59:59Z" },
      r["date-range"])
    assert.equal("tlsrpt@sender.test", r["contact-info"])
    assert.equal("20251201T000000Z.example.test@mail.sender.test", r["report-id"])
    assert.equal(1, #r.policies)
    local p = r.policies[1]
    assert.same({ ["policy-type"] = "sts", ["policy-string"] = STS_STRINGS, ["policy-domain"] = "example.test",
      ["mx-host"] = { "mx1.example.test", "*.mx.example.test" } }, p.policy)
    assert.same({ ["total-successful-session-count"] = 3, ["total-failure-session-count"] = 3 }, p.summary)
    assert.same({
      { ["result-type"] = "certificate-expired", ["sending-mta-ip"] = "192.0.2.1", ["receiving-ip"] = "127.0.0.1",
        ["receiving-mx-hostname"] = "mx1.example.test", ["failure-reason-code"] = "X509_V_ERR_CERT_HAS_EXPIRED",
        ["failed-session-count"] = 2 },
      { ["result-type"] = "starttls-not-supported", ["sending-mta-ip"] = "192.0.2.1", ["receiving-ip"] = "127.0.0.2",
        ["receiving-mx-hostname"] = "a.mx.example.test", ["receiving-mx-helo"] = "a.mx.example.test",
        ["additional-information"] = "tab\there, comma, 100% sure\nnewline", ["failed-session-count"] = 1 },
    }, p["failure-details"])
    -- DANE: one policy per MX host, mx-host is that host
    r = assert(dkjson.decode((rec:report("mx.other.test", D0, D0 + DAY))))
    assert.same({ ["policy-type"] = "tlsa", ["policy-string"] = TLSA_STRINGS, ["policy-domain"] = "mx.other.test",
      ["mx-host"] = { "mx.other.test" } }, r.policies[1].policy)
    assert.same({ ["total-successful-session-count"] = 1, ["total-failure-session-count"] = 1 },
      r.policies[1].summary)
    assert.equal("tlsa-invalid", r.policies[1]["failure-details"][1]["result-type"])
    -- no policy: an empty policy-string, no failure details
    r = assert(dkjson.decode((rec:report("plain.test", D0, D0 + DAY))))
    assert.equal("no-policy-found", r.policies[1].policy["policy-type"])
    assert.same({}, r.policies[1].policy["policy-string"])
    assert.is_nil(r.policies[1]["failure-details"])
    -- a domain without records: no policies
    r = assert(dkjson.decode((rec:report("quiet.test", D0, D0 + DAY))))
    assert.same({}, r.policies)
    -- a torn last line (a crash while appending) is skipped
    local f = assert(io.open(dir .. "/2025-12-01.log", "ab"))
    f:write("1\t123")
    f:close()
    r = assert(dkjson.decode((new(dir):report("example.test", D0, D0 + DAY))))
    assert.equal(3, r.policies[1].summary["total-successful-session-count"])
  end)

  describe("send_due", function()
    local https, root, smtp_port, smtp_log, smtp_pid

    lazy_setup(function()
      root = fresh_dir("tlsrpt_root")
      H.run(function()
        https = H.https_server { tag = "tlsrpt_https", root = root }
        smtp_port, smtp_log, smtp_pid = fake.aiosmtpd("--tls none")
      end, 30)
    end)

    lazy_teardown(function()
      if https then H.kill(https.pid) end
      if smtp_pid then H.kill(smtp_pid) end
    end)

    local function received_posts()
      local list = {}
      for i = 1, 100 do
        local body = io.open(root .. "/received/" .. i .. ".body", "rb")
        if not body then break end
        list[i] = { body = body:read("a"), meta = dkjson.decode(H.readfile(root .. "/received/" .. i .. ".json")) }
        body:close()
      end
      return list
    end

    local function submit_to_aiosmtpd(from, to, message)
      local res, _, err = client.send { host = "127.0.0.1", port = smtp_port, tls = "none", helo = "mail.sender.test",
        from = from, to = { to }, body = message, timeouts = { connect = 10, command = 10, data_end = 10 } }
      if not res then return nil, tostring(err) end
      return true
    end

    it("mails and posts each finished day once, gzipped, to the domains that ask for it", function()
      H.run(function()
        local dir = fresh_dir("tlsrpt_send")
        local rec = new(dir)
        record_day(rec, D0)
        assert(rec:record { policy_domain = "example.test", policy_type = "sts", policy_strings = STS_STRINGS,
          result = "success", time = D0 + DAY + 10 }) -- today's: not yet due
        local queries = {}
        local zone = {
          ["_smtp._tls.example.test"] = { "v=TLSRPTv1; rua=mailto:tlsrpt@example.test,https://localhost:" ..
            https.port .. "/tlsrpt" },
          ["_smtp._tls.mx.other.test"] = { "v=spf1 -all" },
        }
        local function dns_query(name, qtype)
          assert.equal("TXT", qtype)
          queries[#queries + 1] = name
          local answers = zone[name]
          return { rcode = answers and "NOERROR" or "NXDOMAIN", authentic = false, answers = answers or {} }
        end
        local opts = { dns_query = dns_query, submit = submit_to_aiosmtpd, cafile = H.certs() .. "/ca.pem" }
        local results = rec:send_due(D0 + DAY + 3600, opts)
        table.sort(results, function(a, b) return (a.domain .. (a.to or "")) < (b.domain .. (b.to or "")) end)
        assert.equal(4, #results)
        assert.same({ domain = "example.test", day = "2025-12-01", ok = true,
          to = "https://localhost:" .. https.port .. "/tlsrpt" }, results[1])
        assert.same({ domain = "example.test", day = "2025-12-01", ok = true, to = "mailto:tlsrpt@example.test" },
          results[2])
        assert.is_false(results[3].ok) -- mx.other.test: no TLSRPT record
        assert.equal("mx.other.test", results[3].domain)
        assert.equal("plain.test", results[4].domain)
        table.sort(queries)
        assert.same({ "_smtp._tls.example.test", "_smtp._tls.mx.other.test", "_smtp._tls.plain.test" }, queries)

        local expected = assert(dkjson.decode((rec:report("example.test", D0, D0 + DAY))))
        -- the POST: application/tlsrpt+gzip, read with Python's gzip
        local posts = received_posts()
        assert.equal(1, #posts)
        assert.equal("/tlsrpt", posts[1].meta.path)
        local ctype
        for _, kv in ipairs(posts[1].meta.headers) do
          if kv[1]:lower() == "content-type" then ctype = kv[2] end
        end
        assert.equal("application/tlsrpt+gzip", ctype)
        assert.same(expected, python_check("gzip", posts[1].body))

        -- the mail, as aiosmtpd received it, read with Python's email package
        local mails = fake.messages(smtp_log)
        assert.equal(1, #mails)
        assert.equal("noreply-tlsrpt@mail.sender.test", mails[1].from)
        assert.same({ "tlsrpt@example.test" }, mails[1].to)
        local m = python_check("mail", mails[1].data)
        assert.same({}, m.defects)
        assert.equal("multipart/report", m.content_type)
        assert.equal("tlsrpt", m.report_type)
        assert.equal("example.test", m.headers["tls-report-domain"])
        assert.equal("mail.sender.test", m.headers["tls-report-submitter"])
        assert.matches("Report Domain: example.test", m.headers.subject, 1, true)
        assert.matches("Report-ID: <20251201T000000Z.example.test@mail.sender.test>", m.headers.subject, 1, true)
        assert.truthy(m.headers["message-id"])
        assert.truthy(m.headers.date)
        assert.equal(2, #m.parts)
        assert.equal("text/plain", m.parts[1].content_type)
        assert.equal("application/tlsrpt+gzip", m.parts[2].content_type)
        assert.equal("mail.sender.test!example.test!" .. D0 .. "!" .. (D0 + DAY - 1) .. ".json.gz", m.parts[2].filename)
        assert.same({}, m.parts[2].defects)
        assert.same(expected, m.report)

        -- once only, also after a restart
        assert.same({}, rec:send_due(D0 + DAY + 7200, opts))
        assert.same({}, new(dir):send_due(D0 + DAY + 7200, opts))
        assert.equal(1, #received_posts())
        assert.equal(1, #fake.messages(smtp_log))
      end, 60)
    end)

    it("retries a destination that failed, and only that one, within retry_days", function()
      H.run(function()
        local dir = fresh_dir("tlsrpt_retry")
        local rec = new(dir, { retry_days = 2 })
        assert(rec:record { policy_domain = "retry.test", policy_type = "no-policy-found", result = "success",
          time = D0 + 5 })
        local closed = H.free_port()
        local zone = { ["_smtp._tls.retry.test"] = { "v=TLSRPTv1; rua=https://localhost:" .. closed ..
          "/x,mailto:r@retry.test" } }
        local submitted = {}
        local opts = {
          dns_query = function(name) return { rcode = "NOERROR", answers = zone[name] or {} } end,
          submit = function(_, to, message)
            submitted[#submitted + 1] = { to = to, message = message }
            return true
          end,
          cafile = H.certs() .. "/ca.pem",
          timeout = 5,
        }
        local results = rec:send_due(D0 + DAY + 60, opts)
        assert.equal(2, #results)
        local by_to = {}
        for _, r in ipairs(results) do by_to[r.to] = r end
        assert.is_true(by_to["mailto:r@retry.test"].ok)
        assert.is_false(by_to["https://localhost:" .. closed .. "/x"].ok)
        assert.matches("refused", by_to["https://localhost:" .. closed .. "/x"].error)
        assert.equal(1, #submitted)
        assert.matches("TLS%-Report%-Domain: retry.test\r\n", submitted[1].message)
        -- the next run retries the POST only; on the last day of the window, it gives up
        results = rec:send_due(D0 + DAY + 3600, opts)
        assert.equal(1, #results)
        assert.is_false(results[1].ok)
        assert.equal(1, #submitted)
        results = rec:send_due(D0 + 2 * DAY + 60, opts)
        assert.equal(1, #results)
        assert.same({}, rec:send_due(D0 + 2 * DAY + 120, opts))
        assert.equal(0, luasmtp.stats().http_requests)
      end, 60)
    end)
  end)
end)
