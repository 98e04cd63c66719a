--- luasmtp.mailauth.spf: every case is evaluated by us and by pyspf
-- (Debian python3-spf) against the same records, served by
-- spec/fake_dns.py on loopback; both must give the expected result.
local luasmtp = require "luasmtp"
local dns = require "luasmtp.dns"
local spf = require "luasmtp.mailauth.spf"
local H = require "spec.helper"

local IP, IP6, OTHER = "192.0.2.10", "2001:db8::10", "198.51.100.1"

local RECORDS = {
  "txt:pass-all.test=v=spf1 +all",
  "txt:fail-all.test=v=spf1 -all",
  "txt:soft.test=v=spf1 ~all",
  "txt:neutral.test=v=spf1 ?all",
  "txt:empty.test=v=spf1",
  "nospf.test=192.0.2.1", "txt:nospf.test=some other text",
  "txt:two.test=v=spf1 -all", "txt:two.test=v=spf1 +all",
  "txt:ip4.test=v=spf1 ip4:192.0.2.0/24 -all",
  "txt:ip4one.test=v=spf1 ip4:192.0.2.10 -all",
  "txt:ip6.test=v=spf1 ip6:2001:db8::/32 -all",
  "txt:case.test=V=SPF1 IP4:192.0.2.10 -ALL",
  "txt:a.test=v=spf1 a -all", "a.test=192.0.2.10",
  "txt:acidr.test=v=spf1 a:host.acidr.test/24 -all", "host.acidr.test=192.0.2.99",
  "txt:a6.test=v=spf1 a//64 -all", "a6.test=,2001:db8::99",
  "txt:mx.test=v=spf1 mx -all", "mx:mx.test=10:mx1.mx.test,20:mx2.mx.test",
  "mx1.mx.test=198.51.100.5", "mx2.mx.test=192.0.2.10",
  "txt:mxc.test=v=spf1 mx:mxh.test/24 -all", "mx:mxh.test=10:mx1.mxh.test", "mx1.mxh.test=192.0.2.200",
  "txt:mx11.test=v=spf1 mx -all",
  "mx:mx11.test=1:a.test,2:a.test,3:a.test,4:a.test,5:a.test,6:a.test,7:a.test,8:a.test,9:a.test,"
    .. "10:a.test,11:a.test",
  "txt:include.test=v=spf1 include:ip4.test -all",
  "txt:incnone.test=v=spf1 include:nospf.test -all",
  "txt:inctemp.test=v=spf1 include:servfail.test -all",
  "txt:incperm.test=v=spf1 include:two.test -all",
  "txt:redirect.test=v=spf1 redirect=ip4.test",
  "txt:redirnone.test=v=spf1 redirect=nospf.test",
  "txt:redirmatch.test=v=spf1 +ip4:192.0.2.10 redirect=fail-all.test",
  "txt:exists.test=v=spf1 exists:%{i}.ok.exists.test -all", "192.0.2.10.ok.exists.test=127.0.0.2",
  "txt:ptr.test=v=spf1 ptr -all",
  "ptr:10.2.0.192.in-addr.arpa=mail.ptr.test", "mail.ptr.test=192.0.2.10",
  "ptr:11.2.0.192.in-addr.arpa=mail.ptr.test",
  "txt:ptrother.test=v=spf1 ptr:elsewhere.test -all",
  "txt:macp.test=v=spf1 exists:%{p}.p.mac.test -all", "mail.ptr.test.p.mac.test=127.0.0.2",
  "txt:macl.test=v=spf1 exists:%{l}.l.mac.test -all", "alice.l.mac.test=127.0.0.2",
  "txt:maclr.test=v=spf1 exists:%{lr-}.lr.mac.test -all", "last.first.lr.mac.test=127.0.0.2",
  "txt:maco.test=v=spf1 exists:%{o}.o.mac.test -all", "maco.test.o.mac.test=127.0.0.2",
  "txt:sub.macd.test=v=spf1 exists:%{d2}.d2.mac.test -all", "macd.test.d2.mac.test=127.0.0.2",
  "txt:macdr.test=v=spf1 exists:%{dr}.dr.mac.test -all", "test.macdr.dr.mac.test=127.0.0.2",
  "txt:maci.test=v=spf1 exists:%{ir}.%{v}.mac.test -all", "10.2.0.192.in-addr.mac.test=127.0.0.2",
  "txt:maci6.test=v=spf1 exists:%{i8r}.%{v}.mac.test -all", "8.b.d.0.1.0.0.2.ip6.mac.test=127.0.0.2",
  "txt:mach.test=v=spf1 exists:%{h}.h.mac.test -all", "helo.example.test.h.mac.test=127.0.0.2",
  "txt:macl1.test=v=spf1 exists:%{l1r+}.l1.mac.test -all", "x.l1.mac.test=127.0.0.2",
  "txt:badmacro.test=v=spf1 exists:%{x}.mac.test -all",
  "txt:badpct.test=v=spf1 a:%z.mac.test -all",
  "txt:expmacro.test=v=spf1 exists:%{c}.mac.test -all",
  "txt:lim10.test=v=spf1 a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test "
    .. "a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test -all",
  "txt:lim11.test=v=spf1 a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test "
    .. "a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test -all",
  "txt:limip.test=v=spf1 a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test "
    .. "a:h.lim.test a:h.lim.test a:h.lim.test a:h.lim.test ip4:198.51.100.2 ip4:198.51.100.3 -all",
  "h.lim.test=198.51.100.1",
  "txt:loop1.test=v=spf1 include:loop2.test -all", "txt:loop2.test=v=spf1 include:loop1.test -all",
  "txt:void2.test=v=spf1 a:nx1.test a:nodata.test -all", "nodata.test=,2001:db8::1",
  "txt:void3.test=v=spf1 a:nx1.test a:nodata.test exists:nx3.test -all",
  "txt:unknown.test=v=spf1 foo -all",
  "txt:badip.test=v=spf1 ip4:192.0.2.300 -all",
  "txt:badcidr.test=v=spf1 a/33 -all",
  "txt:allarg.test=v=spf1 -all:foo",
  "txt:tworedir.test=v=spf1 redirect=a.test redirect=ip4.test",
  "txt:incbare.test=v=spf1 include -all",
  "txt:late.test=v=spf1 +all foo",
  "txt:unkmod.test=v=spf1 foo=bar -all",
  "txt:notop.test=v=spf1 a:nodot -all",
  "txt:atemp.test=v=spf1 a:servfail.test -all",
  "txt:expfail.test=v=spf1 -all exp=why.expfail.test",
  "txt:why.expfail.test=%{s} from %{i} not allowed by %{d} (%{c}, %{r}) %% %_ %- %{L} %{o2}",
  "txt:expredir.test=v=spf1 redirect=expfail.test",
  "txt:expnone.test=v=spf1 -all exp=missing.expfail.test",
  "txt:helohost.test=v=spf1 a -all", "helohost.test=192.0.2.10",
}

-- { ip, sender, helo, expected [, explanation] }
local CASES = {
  { IP, "u@pass-all.test", "h.test", "pass" },
  { IP, "u@fail-all.test", "h.test", "fail" },
  { IP, "u@soft.test", "h.test", "softfail" },
  { IP, "u@neutral.test", "h.test", "neutral" },
  { IP, "u@empty.test", "h.test", "neutral" },
  { IP, "u@nospf.test", "h.test", "none" },
  { IP, "u@nxdomain.test", "h.test", "none" },
  { IP, "u@two.test", "h.test", "permerror" },
  { IP, "u@ip4.test", "h.test", "pass" },
  { OTHER, "u@ip4.test", "h.test", "fail" },
  { IP, "u@ip4one.test", "h.test", "pass" },
  { "192.0.2.11", "u@ip4one.test", "h.test", "fail" },
  { IP6, "u@ip6.test", "h.test", "pass" },
  { IP, "u@ip6.test", "h.test", "fail" },
  { IP, "u@case.test", "h.test", "pass" },
  { IP, "u@a.test", "h.test", "pass" },
  { OTHER, "u@a.test", "h.test", "fail" },
  { IP, "u@acidr.test", "h.test", "pass" },
  { IP6, "u@a6.test", "h.test", "pass" },
  { IP, "u@a6.test", "h.test", "fail" },
  { IP, "u@mx.test", "h.test", "pass" },
  { OTHER, "u@mx.test", "h.test", "fail" },
  { IP, "u@mxc.test", "h.test", "pass" },
  { IP, "u@mx11.test", "h.test", "permerror" },
  { IP, "u@include.test", "h.test", "pass" },
  { OTHER, "u@include.test", "h.test", "fail" },
  { IP, "u@incnone.test", "h.test", "permerror" },
  { IP, "u@inctemp.test", "h.test", "temperror" },
  { IP, "u@incperm.test", "h.test", "permerror" },
  { IP, "u@redirect.test", "h.test", "pass" },
  { OTHER, "u@redirect.test", "h.test", "fail" },
  { IP, "u@redirnone.test", "h.test", "permerror" },
  { IP, "u@redirmatch.test", "h.test", "pass" },
  { OTHER, "u@redirmatch.test", "h.test", "fail" },
  { IP, "u@exists.test", "h.test", "pass" },
  { OTHER, "u@exists.test", "h.test", "fail" },
  { IP, "u@ptr.test", "h.test", "pass" },
  { "192.0.2.11", "u@ptr.test", "h.test", "fail" }, -- the PTR name does not point back
  { IP, "u@ptrother.test", "h.test", "fail" },
  { IP, "u@macp.test", "h.test", "pass" },
  { IP, "alice@macl.test", "h.test", "pass" },
  { IP, "bob@macl.test", "h.test", "fail" },
  { IP, "first-last@maclr.test", "h.test", "pass" },
  { IP, "u@maco.test", "h.test", "pass" },
  { IP, "u@sub.macd.test", "h.test", "pass" },
  { IP, "u@macdr.test", "h.test", "pass" },
  { IP, "u@maci.test", "h.test", "pass" },
  { IP6, "u@maci6.test", "h.test", "pass" },
  { IP, "u@mach.test", "helo.example.test", "pass" },
  { IP, "x+y@macl1.test", "h.test", "pass" },
  { IP, "u@badmacro.test", "h.test", "permerror" },
  { IP, "u@badpct.test", "h.test", "permerror" },
  { IP, "u@expmacro.test", "h.test", "permerror" },
  { IP, "u@lim10.test", "h.test", "fail" },
  { IP, "u@lim11.test", "h.test", "permerror" },
  { "198.51.100.2", "u@limip.test", "h.test", "pass" }, -- ip4 after ten lookups queries nothing
  { IP, "u@loop1.test", "h.test", "permerror" },
  { IP, "u@void2.test", "h.test", "fail" },
  { IP, "u@void3.test", "h.test", "permerror" },
  { IP, "u@unknown.test", "h.test", "permerror" },
  { IP, "u@badip.test", "h.test", "permerror" },
  { IP, "u@badcidr.test", "h.test", "permerror" },
  { IP, "u@allarg.test", "h.test", "permerror" },
  { IP, "u@tworedir.test", "h.test", "permerror" },
  { IP, "u@incbare.test", "h.test", "permerror" },
  { IP, "u@late.test", "h.test", "permerror" },
  { IP, "u@unkmod.test", "h.test", "fail" },
  { IP, "u@notop.test", "h.test", "permerror" },
  { IP, "u@atemp.test", "h.test", "temperror" },
  { IP, "u@servfail.test", "h.test", "temperror" },
  { IP, "a+b@expfail.test", "h.test", "fail",
    "a+b@expfail.test from 192.0.2.10 not allowed by expfail.test (192.0.2.10, unknown) %   %20 a%2Bb expfail.test" },
  { IP, "a+b@expredir.test", "h.test", "fail",
    "a+b@expredir.test from 192.0.2.10 not allowed by expfail.test (192.0.2.10, unknown) %   %20 a%2Bb expredir.test" },
  { IP, "", "helohost.test", "pass" },
  { OTHER, "", "helohost.test", "fail" },
}

describe("spf", function()
  local pid, port

  lazy_setup(function()
    H.need("pyspf")
    pid, port = H.fake_dns("127.0.0.1", RECORDS, "spf", 120)
  end)

  lazy_teardown(function()
    assert(luasmtp.dns_configure {})
    if pid then H.kill(pid) end
  end)

  after_each(H.assert_no_leaks)

  it("agrees with pyspf and the expected result on every case", function()
    assert(dns.configure { servers = { "127.0.0.1:" .. port }, timeout = 2, tries = 2 })
    local ours = H.run(function()
      local out = {}
      for i, c in ipairs(CASES) do
        local result, detail = spf.check { ip = c[1], sender = c[2], helo = c[3] }
        out[i] = { result = result, detail = detail }
      end
      return out
    end, 60)
    local input = H.tmp .. "/spf_cases.txt"
    local lines = {}
    for i, c in ipairs(CASES) do
      lines[i] = table.concat({ c[1], c[2], c[3] }, "\t")
    end
    H.writefile(input, table.concat(lines, "\n") .. "\n")
    local p = assert(io.popen(("%s %s --port %d < %s 2>&1"):format(H.python3,
      H.shquote(H.root .. "/spec/pyspf_check.py"), port, H.shquote(input))))
    local theirs = {}
    for line in p:lines() do
      local result, explanation = line:match("^(%a+)\t(.*)$")
      theirs[#theirs + 1] = result and { result = result, explanation = explanation } or { result = line }
    end
    p:close()
    assert.equal(#CASES, #theirs, "pyspf answered " .. #theirs .. " cases")
    local wrong = {}
    for i, c in ipairs(CASES) do
      local label = ("%s %s %s"):format(c[1], c[2], c[3])
      if ours[i].result ~= c[4] then
        wrong[#wrong + 1] = ("ours %s, expected %s: %s (%s)"):format(ours[i].result, c[4], label,
          tostring(ours[i].detail))
      end
      if theirs[i].result ~= c[4] then
        wrong[#wrong + 1] = ("pyspf %s, expected %s: %s"):format(theirs[i].result, c[4], label)
      end
      if c[5] then
        if ours[i].detail ~= c[5] then
          wrong[#wrong + 1] = ("our explanation %q for %s"):format(tostring(ours[i].detail), label)
        end
        if theirs[i].explanation ~= c[5] then
          wrong[#wrong + 1] = ("pyspf explanation %q for %s"):format(tostring(theirs[i].explanation), label)
        end
      end
    end
    assert(#wrong == 0, table.concat(wrong, "\n"))
    assert(#CASES >= 40)
  end)

  it("counts every DNS-querying term, includes and redirects included", function()
    local calls = 0
    local function query(name, qtype)
      calls = calls + 1
      if qtype == "TXT" and name:match("^r%d+%.test$") then
        local n = tonumber(name:match("%d+"))
        return { rcode = "NOERROR", answers = { ("v=spf1 redirect=r%d.test"):format(n + 1) } }
      end
      return { rcode = "NXDOMAIN", answers = {} }
    end
    local result, detail = spf.check { ip = IP, sender = "u@r0.test", query = query }
    assert.equal("permerror", result)
    assert.matches("more than 10 DNS%-querying terms", detail)
    assert.equal(11, calls) -- r0 and the ten redirects it was allowed
  end)

  it("expands macros as section 7.4 shows", function()
    local vars = { ip = "192.0.2.3", sender = "strong-bad@email.example.com", domain = "email.example.com",
                   validated = { "mx.example.org" } }
    local function x(text, exp)
      vars.exp = exp
      return spf._expand(text, vars)
    end
    assert.equal("strong-bad@email.example.com", x("%{s}"))
    assert.equal("email.example.com", x("%{o}"))
    assert.equal("email.example.com", x("%{d}"))
    assert.equal("email.example.com", x("%{d4}"))
    assert.equal("email.example.com", x("%{d3}"))
    assert.equal("example.com", x("%{d2}"))
    assert.equal("com", x("%{d1}"))
    assert.equal("com.example.email", x("%{dr}"))
    assert.equal("example.email", x("%{d2r}"))
    assert.equal("strong-bad", x("%{l}"))
    assert.equal("strong.bad", x("%{l-}"))
    assert.equal("strong-bad", x("%{lr}"))
    assert.equal("bad.strong", x("%{lr-}"))
    assert.equal("strong", x("%{l1r-}"))
    assert.equal("3.2.0.192.in-addr._spf.example.com", x("%{ir}.%{v}._spf.%{d2}"))
    assert.equal("bad.strong.lp._spf.example.com", x("%{lr-}.lp._spf.%{d2}"))
    assert.equal("example.org.trusted-domains.example.net", x("%{p2}.trusted-domains.example.net"))
    assert.equal("strong-bad%40email.example.com", x("%{S}", true))
    vars.ip = "2001:db8::cb01"
    assert.equal("1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com",
      x("%{ir}.%{v}._spf.%{d2}"))
  end)
end)
