-- Random and mutated input for the record and header parsers written in
-- Lua (SPF, DMARC, MTA-STS, TLS-RPT, Authentication-Results): whatever a
-- DNS server or a peer sends, a parser returns a result or nil and a
-- reason; it never raises and never loops. Deterministic: a fixed seed.
local spf = require "luasmtp.mailauth.spf"
local dmarc = require "luasmtp.mailauth.dmarc"
local ar = require "luasmtp.mailauth.ar"
local mtasts = require "luasmtp.delivery.mtasts"
local tlsrpt = require "luasmtp.delivery.tlsrpt"
local txt = require "luasmtp.delivery.txt"

local ROUNDS = tonumber(os.getenv("FUZZ_ROUNDS")) or 3000

local ALPHABET = {
  " ", " ", ";", "=", ":", "/", ".", "%", "{", "}", "-", "_", "+", "~", "?", "!", ",", "\"",
  "\\", "(", ")", "<", ">", "@", "\t", "\r", "\n", "\0", "\255", "a", "v", "1", "0", "9",
  "%{", "%{i}", "%{d4r}", "%{l1r-}", "%-", "%_", "%%", "ip4:", "ip6:", "a/", "mx/", "//",
  "include:", "redirect=", "exp=", "exists:", "ptr", "all", "-all", "~all", "?all",
  "v=spf1", "v=DMARC1", "v=STSv1", "v=TLSRPTv1", "p=", "sp=", "pct=", "rua=", "mailto:",
  "adkim=", "aspf=", "fo=", "ri=", "id=", "mode:", "enforce", "testing", "none", "mx:",
  "max_age:", "*.", "dkim=", "spf=", "dmarc=", "pass", "fail", "header.d=", "smtp.mailfrom=",
  "192.0.2.1", "::1", "/33", "/129", "/-1", "/99999999999999999999", "4294967296",
}

-- Seeds: valid records of each kind; rounds mutate them.
local SEEDS = {
  spf = {
    "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 a mx include:inc.test -all",
    "v=spf1 redirect=other.test",
    "v=spf1 exists:%{ir}.%{l1r-}.x.test exp=why.test ~all",
    "v=spf1 a:%{d2}/24//64 mx:m.test/30 ptr:%{d} ?all",
  },
  dmarc = {
    "v=DMARC1; p=reject; sp=quarantine; pct=50; rua=mailto:a@x.test!10m; adkim=s; aspf=r",
    "v=DMARC1; p=none; fo=1:d:s; ri=3600; ruf=mailto:f@x.test",
  },
  sts_txt = { "v=STSv1; id=20260101T000000;", "v=STSv1;id=abc" },
  sts_policy = {
    "version: STSv1\r\nmode: enforce\r\nmx: mx1.x.test\r\nmx: *.x.test\r\nmax_age: 86400\r\n",
    "version: STSv1\nmode: testing\nmx: a.test\nmax_age: 604800\n",
  },
  tlsrpt = { "v=TLSRPTv1; rua=mailto:r@x.test,https://r.x.test/v1" },
  ar = {
    "mx.test; spf=pass smtp.mailfrom=a@x.test; dkim=pass header.d=x.test",
    "\"quoted \\\" id\" (comment (nested)) 1; none",
  },
}

local rng_state = 0x2545F491
local function rand(n) -- 1..n
  rng_state = (rng_state * 1103515245 + 12345) % 2147483648
  return rng_state % n + 1
end

local function random_text(max)
  local out = {}
  for i = 1, rand(max) do out[i] = ALPHABET[rand(#ALPHABET)] end
  return table.concat(out)
end

local function mutate(s)
  for _ = 1, rand(4) do
    local op = rand(5)
    local at = rand(#s + 1)
    if op == 1 then     -- insert a token
      s = s:sub(1, at - 1) .. ALPHABET[rand(#ALPHABET)] .. s:sub(at)
    elseif op == 2 then -- delete a run
      s = s:sub(1, at - 1) .. s:sub(at + rand(8))
    elseif op == 3 then -- duplicate a piece
      local piece = s:sub(at, at + rand(20))
      s = s:sub(1, at - 1) .. piece .. piece .. s:sub(at)
    elseif op == 4 then -- flip an octet
      s = s:sub(1, at - 1) .. string.char(rand(256) - 1) .. s:sub(at + 1)
    else                -- splice random text
      s = s:sub(1, at - 1) .. random_text(6) .. s:sub(at)
    end
  end
  return s
end

local function input(kind)
  if rand(4) == 1 then return random_text(40) end
  return mutate(SEEDS[kind][rand(#SEEDS[kind])])
end

-- A parser's answer is a value (not nil) or nil and a string.
local function well_formed(what, s, ok, res, why)
  if not ok then
    error(("%s raised on %q: %s"):format(what, s, tostring(res)), 0)
  end
  if res == nil and type(why) ~= "string" then
    error(("%s gave nil without a reason on %q"):format(what, s), 0)
  end
end

describe("parsers on hostile input", function()
  it("SPF evaluation gives one of the RFC 7208 results for any records", function()
    local RESULTS = { pass = true, fail = true, softfail = true, neutral = true, none = true,
      permerror = true, temperror = true }
    for _ = 1, ROUNDS do
      local records = {}
      local function query(name, qtype)
        assert(type(name) == "string" and #name <= 1024, "query name not capped")
        if qtype == "TXT" then
          local r = records[name]
          if not r then
            r = { input("spf") }
            if rand(6) == 1 then r[2] = input("spf") end
            records[name] = r
          end
          return { rcode = "NOERROR", answers = r }
        elseif qtype == "MX" then
          return { rcode = "NOERROR", answers = { { preference = 10, exchange = "mx." .. name } } }
        elseif qtype == "PTR" then
          return { rcode = "NOERROR", answers = { "host.x.test" } }
        elseif rand(3) == 1 then
          return { rcode = ({ "NXDOMAIN", "SERVFAIL", "NOERROR" })[rand(3)], answers = {} }
        end
        return { rcode = "NOERROR", answers = { qtype == "A" and "192.0.2.1" or "2001:db8::1" } }
      end
      local ip = rand(2) == 1 and "192.0.2.1" or "2001:db8::1"
      local ok, result, detail = pcall(spf.check, { ip = ip, sender = "u@x.test", helo = "h.test", query = query })
      if not ok or not RESULTS[result] then
        error(("spf.check: %s %s with records %q"):format(tostring(result), tostring(detail),
          table.concat(records["x.test"] or {}, " | ")), 0)
      end
    end
  end)

  it("DMARC, MTA-STS and TLS-RPT records parse or give a reason", function()
    for _ = 1, ROUNDS do
      local s = input("dmarc")
      local ok, res, why = pcall(dmarc.parse_record, s)
      well_formed("dmarc.parse_record", s, ok, res, why)
      if res then
        assert(({ none = true, quarantine = true, reject = true })[res.p], "p=" .. tostring(res.p))
        assert(math.type(res.pct) == "integer" and res.pct >= 0 and res.pct <= 100, "pct")
      end
      s = input("sts_txt")
      well_formed("mtasts.parse_txt", s, pcall(mtasts.parse_txt, s))
      s = input("sts_policy")
      ok, res, why = pcall(mtasts.parse_policy, s)
      well_formed("mtasts.parse_policy", s, ok, res, why)
      if res then
        assert(({ enforce = true, testing = true, none = true })[res.mode], "mode")
      end
      s = input("tlsrpt")
      well_formed("tlsrpt.parse_txt", s, pcall(tlsrpt.parse_txt, s))
      s = input(({ "dmarc", "sts_txt", "tlsrpt" })[rand(3)])
      well_formed("txt.fields", s, pcall(txt.fields, s, "v=DMARC1"))
    end
  end)

  it("Authentication-Results: the authserv-id is found or nil, never an error", function()
    for _ = 1, ROUNDS do
      local s = input("ar")
      local ok, id = pcall(ar.authserv_id, s)
      if not ok then error(("ar.authserv_id raised on %q: %s"):format(s, tostring(id)), 0) end
      assert(id == nil or type(id) == "string")
      ok = pcall(ar.ours, s, "mx.test")
      assert(ok, s)
    end
  end)
end)
