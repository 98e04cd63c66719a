--- Asynchronous DNS (src/dns.c): resolve, resolve_mx, resolve_txt and
-- dns_configure, against spec/fake_dns.py on loopback.
--
-- No lookup may leave the machine: before_each points the resolver at
-- the fake server before every test, and only numeric literals and
-- "localhost" are looked up otherwise. lazy_teardown goes back to the
-- system defaults (the other spec files only resolve "localhost").
local luasmtp = require "luasmtp"
local H = require "spec.helper"

local LIFETIME = 60 -- seconds: the fake servers exit by themselves

local RECORDS = {
  "a.test=192.0.2.1,2001:db8::1",
  "v4.test=192.0.2.4",
  "v6.test=,2001:db8::6",
  "dup.test=192.0.2.7,192.0.2.7,2001:db8::7,2001:db8::7",
  "many.test=192.0.2.10,192.0.2.11,192.0.2.12",
  "conn.test=127.0.0.1",
  "m.test=192.0.2.20",
  "mx:m.test=20:mx2.m.test,10:mx1.m.test,20:mx3.m.test,5:mx0.m.test",
  "mx:null.test=0:.",
  "txt:t.test=v=spf1 -all",
  "txt:t.test=part1|part2|part3",
  "txt:long.test=" .. string.rep("x", 300),
  "ptr:4.2.0.192.in-addr.arpa=v4.test,alias.v4.test",
  "delay:late.test=0.2", "late.test=192.0.2.30",
  "delay:lagged.test=0.1", "lagged.test=192.0.2.31",
}

-- The second server, on [::1], knows a single name.
local RECORDS6 = { "six.test=192.0.2.66" }

local shquote = H.shquote

--- Start spec/fake_dns.py on host; returns its pid, UDP port and log file
-- (the port on the first line, then one "query NAME TYPE" line per query).
local function start_fake(host, records, tag)
  return H.fake_dns(host, records, tag, LIFETIME)
end

--- "family address" strings of a resolve() result, sorted: a set.
local function set_of(list)
  local out = {}
  for i, a in ipairs(list) do
    out[i] = a.family .. " " .. a.address
  end
  table.sort(out)
  return out
end

local function elapsed_since(t0)
  return luasmtp.update_now() - t0
end

describe("dns", function()
  local pid, port, log, pid6, port6

  local function configure()
    assert(luasmtp.dns_configure { servers = { "127.0.0.1:" .. port }, timeout = 0.3, tries = 1 })
  end

  -- What the main fake server has logged since mark (a log size).
  local function log_mark()
    return #H.readfile(log)
  end
  local function log_since(mark)
    return H.readfile(log):sub(mark + 1)
  end

  lazy_setup(function()
    pid, port, log = start_fake("127.0.0.1", RECORDS, "main")
    pid6, port6 = start_fake("::1", RECORDS6, "six")
    configure()
  end)

  lazy_teardown(function()
    -- Back to the system defaults for the other spec files; no lookup of
    -- a name follows in this file.
    assert(luasmtp.dns_configure {})
    if pid then H.kill(pid) end
    if pid6 then H.kill(pid6) end
  end)

  before_each(configure)
  after_each(H.assert_no_leaks)

  it("answers numeric literals at once, without a query", function()
    local mark = log_mark()
    H.run(function()
      local cases = {
        { "127.0.0.1", "inet", "127.0.0.1" },
        { "192.0.2.1", "inet", "192.0.2.1" },
        { "[192.0.2.1]", "inet", "192.0.2.1" },
        { "::1", "inet6", "::1" },
        { "::0001", "inet6", "::1" },
        { "[::1]", "inet6", "::1" },
        { "[IPv6:2001:DB8::1]", "inet6", "2001:db8::1" },
        { "[ipv6:::1]", "inet6", "::1" },
        { "::ffff:192.0.2.1", "inet6", "::ffff:192.0.2.1" },
      }
      for _, c in ipairs(cases) do
        assert.same({ { family = c[2], address = c[3] } }, luasmtp.resolve(c[1]), c[1])
        assert.same({ { family = c[2], address = c[3] } }, luasmtp.resolve(c[1], { family = c[2], timeout = 0 }))
      end
      assert.same({ nil, "dns", "192.0.2.1: not an inet6 address" },
        { luasmtp.resolve("192.0.2.1", { family = "inet6" }) })
      assert.same({ nil, "dns", "[::1]: not an inet address" }, { luasmtp.resolve("[::1]", { family = "inet" }) })
      for _, junk in ipairs { "[nonsense]", "[]", "fe80::1%eth0", "[IPv6:192.0.2.1]", "1:2:3", "::1::2",
        "[IPv6:]", "[1.2.3]", "[192.0.2.1" .. string.rep("0", 300) .. "]" } do
        assert.same({ nil, "dns", junk .. ": invalid address literal" }, { luasmtp.resolve(junk) })
      end
      assert.same({ nil, "dns", "empty name" }, { luasmtp.resolve("") })
      assert.same({ nil, "dns", "name too long" }, { luasmtp.resolve(string.rep("a", 256)) })
      assert.same({ nil, "dns", "empty name" }, { luasmtp.resolve_mx("") })
      assert.same({ nil, "dns", "name too long" }, { luasmtp.resolve_txt(string.rep("a", 256)) })
      assert.equal(0, luasmtp.stats().dns_queries)
    end, 5)
    -- (queries of other tests may still be logged late: all are *.test)
    for name in log_since(mark):gmatch("query (%S+)") do
      assert.matches("%.test$", name)
    end
  end)

  it("resolves localhost from the hosts file, in both families", function()
    local mark = log_mark()
    H.run(function()
      local all = assert(luasmtp.resolve("localhost"))
      local found = false
      for _, a in ipairs(all) do
        assert.is_truthy(a.address:match("^127%.") or a.address == "::1", a.address)
        found = found or (a.family == "inet" and a.address == "127.0.0.1")
      end
      assert.is_true(found)
      local v4 = { { family = "inet", address = "127.0.0.1" } }
      local v6 = { { family = "inet6", address = "::1" } }
      assert.same(v4, luasmtp.resolve("localhost", { family = "inet" }))
      assert.same(v4, luasmtp.resolve("LOCALHOST", { family = "inet" }))
      -- ::1 even where the hosts file has no IPv6 entry (RFC 6761)
      assert.same(v6, luasmtp.resolve("localhost", { family = "inet6" }))
      assert.same(v6, luasmtp.resolve("LocalHost.", { family = "inet6" }))
    end, 5)
    for name in log_since(mark):gmatch("query (%S+)") do
      assert.matches("%.test$", name)
    end
  end)

  it("resolves a dual-stack name, with family filters and without duplicates", function()
    H.run(function()
      assert.same({ "inet 192.0.2.1", "inet6 2001:db8::1" }, set_of(assert(luasmtp.resolve("a.test"))))
      assert.same({ "inet 192.0.2.1" }, set_of(assert(luasmtp.resolve("A.Test.", { family = "inet" }))))
      assert.same({ "inet6 2001:db8::1" }, set_of(assert(luasmtp.resolve("a.test", { family = "inet6" }))))
      assert.same({ "inet 192.0.2.7", "inet6 2001:db8::7" }, set_of(assert(luasmtp.resolve("dup.test"))))
      assert.same({ "inet 192.0.2.10", "inet 192.0.2.11", "inet 192.0.2.12" },
        set_of(assert(luasmtp.resolve("many.test"))))
      assert.same({ "inet 192.0.2.4" }, set_of(assert(luasmtp.resolve("v4.test"))))
      assert.same({ "inet6 2001:db8::6" }, set_of(assert(luasmtp.resolve("v6.test"))))
      -- each entry has exactly the two documented fields
      for _, a in ipairs(assert(luasmtp.resolve("a.test"))) do
        local keys = {}
        for k in pairs(a) do keys[#keys + 1] = k end
        table.sort(keys)
        assert.same({ "address", "family" }, keys)
      end
      -- the name exists but has no address of that family (NODATA)
      local r, err, detail = luasmtp.resolve("v4.test", { family = "inet6" })
      assert.is_nil(r)
      assert.equal("dns", err)
      assert.matches("^v4%.test: ", detail)
      -- inside pcall within a task
      local ok, list = pcall(luasmtp.resolve, "v4.test")
      assert.is_true(ok)
      assert.same({ "inet 192.0.2.4" }, set_of(list))
    end, 5)
  end)

  it("reports NXDOMAIN and SERVFAIL as dns errors", function()
    H.run(function()
      local nx = { nil, "dns", "nx.test: Domain name not found" }
      assert.same(nx, { luasmtp.resolve("nx.test") })
      assert.same(nx, { luasmtp.resolve_mx("nx.test") })
      assert.same(nx, { luasmtp.resolve_txt("nx.test") })
      assert.same({ nil, "dns", "Nx.Test.: Domain name not found" }, { luasmtp.resolve("Nx.Test.") })
      for _, f in ipairs { luasmtp.resolve, luasmtp.resolve_mx, luasmtp.resolve_txt } do
        local t0 = luasmtp.update_now()
        local r, err, detail = f("servfail.test", { timeout = 2 })
        assert.is_nil(r)
        assert.equal("dns", err)
        assert.matches("^servfail%.test: ", detail)
        assert.is_true(elapsed_since(t0) < 1)
      end
    end, 10)
  end)

  it("times out by itself while a delayed answer is on its way; the answer wakes nothing", function()
    H.run(function()
      local t0 = luasmtp.update_now()
      assert.same({ nil, "timeout", "late.test: DNS lookup timed out" },
        { luasmtp.resolve("late.test", { timeout = 0.1 }) })
      local dt = elapsed_since(t0)
      assert.is_true(dt >= 0.09 and dt < 0.5, "elapsed " .. dt)
      assert.equal(1, luasmtp.stats().dns_queries) -- abandoned, still pending
      -- the answer arrives ~0.1 s into this sleep: it must not cut it short
      t0 = luasmtp.update_now()
      luasmtp.sleep(0.3)
      dt = elapsed_since(t0)
      assert.is_true(dt >= 0.29, "sleep cut short: " .. dt)
      assert.equal(0, luasmtp.stats().dns_queries) -- the late answer was dropped
    end, 5)
  end)

  it("returns a delayed answer that comes within the deadline", function()
    H.run(function()
      local t0 = luasmtp.update_now()
      assert.same({ "inet 192.0.2.31" }, set_of(assert(luasmtp.resolve("lagged.test", { timeout = 2 }))))
      assert.is_true(elapsed_since(t0) >= 0.09)
    end, 5)
  end)

  it("ends with a dns error when the resolver itself gives up; timeout 0 gives up at once", function()
    H.run(function()
      -- slow.test is never answered: c-ares' own limit (0.3 s x 1 try) ends it
      for _, f in ipairs { luasmtp.resolve, luasmtp.resolve_mx, luasmtp.resolve_txt } do
        local t0 = luasmtp.update_now()
        local r, err, detail = f("slow.test", { timeout = 5 })
        assert.is_nil(r)
        assert.equal("dns", err)
        assert.matches("^slow%.test: ", detail)
        local dt = elapsed_since(t0)
        assert.is_true(dt >= 0.25 and dt < 1.5, "elapsed " .. dt)
      end
      assert.equal(0, luasmtp.stats().dns_queries)
      -- our own limits, shorter than the resolver's
      assert.same({ nil, "timeout", "slow.test: DNS lookup timed out" },
        { luasmtp.resolve("slow.test", { timeout = 0 }) })
      assert.same({ nil, "timeout", "slow.test: DNS lookup timed out" },
        { luasmtp.resolve_mx("slow.test", { timeout = 0.05 }) })
      assert.same({ nil, "timeout", "slow.test: DNS lookup timed out" },
        { luasmtp.resolve_txt("slow.test", { timeout = 0.05 }) })
      assert.equal(3, luasmtp.stats().dns_queries)
      configure() -- drops the abandoned queries
      assert.equal(0, luasmtp.stats().dns_queries)
    end, 10)
  end)

  it("serves many concurrent lookups from tasks", function()
    H.run(function()
      local want = {
        ["a.test"] = "inet 192.0.2.1;inet6 2001:db8::1",
        ["v4.test"] = "inet 192.0.2.4",
        ["v6.test"] = "inet6 2001:db8::6",
        ["dup.test"] = "inet 192.0.2.7;inet6 2001:db8::7",
        ["lagged.test"] = "inet 192.0.2.31",
        ["m.test"] = "inet 192.0.2.20",
        ["nx.test"] = "dns:nx.test: Domain name not found",
        ["mx:m.test"] = "5 mx0.m.test;10 mx1.m.test;20 mx2.m.test;20 mx3.m.test",
        ["txt:t.test"] = "part1part2part3;v=spf1 -all",
      }
      local names = {}
      for k in pairs(want) do names[#names + 1] = k end
      table.sort(names)
      local n = 90
      local tasks, got = {}, {}
      local t0 = luasmtp.update_now()
      for i = 1, n do
        local name = names[(i - 1) % #names + 1]
        tasks[i] = luasmtp.spawn(function()
          local kind, host = name:match("^(%a+):(.*)$")
          local r, err, detail
          if kind == "mx" then
            r, err, detail = luasmtp.resolve_mx(host, { timeout = 3 })
            if r then
              for j, m in ipairs(r) do r[j] = m.preference .. " " .. m.exchange end
            end
          elseif kind == "txt" then
            r, err, detail = luasmtp.resolve_txt(host, { timeout = 3 })
            if r then table.sort(r) end
          else
            r, err, detail = luasmtp.resolve(name, { timeout = 3 })
            r = r and set_of(r)
          end
          got[i] = r and table.concat(r, ";") or (err .. ":" .. detail)
        end)
      end
      luasmtp.sleep(0.01)
      assert.is_true(luasmtp.stats().dns_queries >= n // #names) -- the lagged ones at least
      for i = 1, n do
        assert.is_true(tasks[i]:join(5))
      end
      -- ten lookups of lagged.test (0.1 s each) ran side by side
      assert.is_true(elapsed_since(t0) < 0.8)
      for i = 1, n do
        local name = names[(i - 1) % #names + 1]
        assert.equal(want[name], got[i], name)
      end
      assert.equal(0, luasmtp.stats().dns_queries)
    end, 10)
  end)

  it("survives timeouts racing late answers and reconfiguration", function()
    H.run(function()
      local timeouts = { 0, 0.05, 0.15, 0.25, 1 }
      local counts = { ok = 0, timeout = 0, dns = 0, reconfigured = 0 }
      local tasks = {}
      for i = 1, 100 do
        tasks[i] = luasmtp.spawn(function()
          for j = 1, 4 do
            local k = (i * 7 + j * 3) % 6
            local timeout = timeouts[(i + j) % #timeouts + 1]
            local r, err, detail, check
            if k == 0 then
              r, err, detail = luasmtp.resolve("a.test", { timeout = timeout })
              -- under load one of A/AAAA may time out in c-ares: the other
              -- one is still an answer
              check = function()
                local want = { ["192.0.2.1"] = true, ["2001:db8::1"] = true }
                for _, a in ipairs(r) do
                  if not want[a.address] then return false end
                end
                return #r >= 1
              end
            elseif k == 1 then
              r, err, detail = luasmtp.resolve("late.test", { timeout = timeout })
              check = function() return #r == 1 and r[1].address == "192.0.2.30" end
            elseif k == 2 then
              r, err, detail = luasmtp.resolve_mx("m.test", { timeout = timeout })
              check = function() return #r == 4 and r[1].exchange == "mx0.m.test" end
            elseif k == 3 then
              r, err, detail = luasmtp.resolve_txt("t.test", { timeout = timeout })
              check = function() return #r == 2 end
            elseif k == 4 then
              r, err, detail = luasmtp.resolve("slow.test", { timeout = timeout })
              check = function() return false end
            else
              r, err, detail = luasmtp.resolve("nx" .. i .. ".test", { timeout = timeout })
              check = function() return false end
            end
            if r then
              assert(check(), "wrong answer to lookup " .. k)
              counts.ok = counts.ok + 1
            elseif detail == "resolver reconfigured" then
              assert.equal("dns", err)
              counts.reconfigured = counts.reconfigured + 1
            else
              assert(err == "timeout" or err == "dns", err)
              assert.is_truthy(detail:match("^[%w.]+: "), detail)
              counts[err] = counts[err] + 1
            end
            if (i + j) % 10 == 0 then luasmtp.sleep(0.02) end
          end
        end)
      end
      luasmtp.sleep(0.1)
      configure()
      luasmtp.sleep(0.15)
      configure()
      for _, t in ipairs(tasks) do
        assert.is_true(t:join(5))
      end
      assert.equal(400, counts.ok + counts.timeout + counts.dns + counts.reconfigured)
      assert.is_true(counts.ok > 0 and counts.timeout > 0 and counts.dns > 0 and counts.reconfigured > 0)
      configure() -- drops the abandoned queries still pending
      assert.equal(0, luasmtp.stats().dns_queries)
    end, 10)
  end)

  it("resolve_mx sorts by preference (stable), gives {} without MX and keeps a null MX", function()
    H.run(function()
      assert.same({
        { preference = 5, exchange = "mx0.m.test" },
        { preference = 10, exchange = "mx1.m.test" },
        { preference = 20, exchange = "mx2.m.test" },
        { preference = 20, exchange = "mx3.m.test" },
      }, luasmtp.resolve_mx("m.test"))
      assert.same({}, luasmtp.resolve_mx("a.test"))
      assert.same({ { preference = 0, exchange = "" } }, luasmtp.resolve_mx("null.test"))
    end, 5)
  end)

  it("resolve_txt joins the strings of a record and returns every record", function()
    H.run(function()
      local txt = assert(luasmtp.resolve_txt("t.test"))
      table.sort(txt)
      assert.same({ "part1part2part3", "v=spf1 -all" }, txt)
      assert.same({ string.rep("x", 300) }, luasmtp.resolve_txt("long.test")) -- 255 + 45 bytes
      assert.same({}, luasmtp.resolve_txt("a.test"))
    end, 5)
  end)

  it("query asks for PTR records and returns their target names", function()
    H.run(function()
      local dns = require "luasmtp.dns"
      local r = assert(dns.query("4.2.0.192.in-addr.arpa", "PTR"))
      table.sort(r.answers)
      assert.same({ "alias.v4.test", "v4.test" }, r.answers)
      assert.equal("PTR", r.qtype)
      local none = assert(dns.query("5.2.0.192.in-addr.arpa", "PTR"))
      assert.equal("NXDOMAIN", none.rcode)
      assert.same({}, none.answers)
    end, 5)
  end)

  it("dns_configure fails pending queries with 'resolver reconfigured'", function()
    H.run(function()
      local got = {}
      local tasks = {
        luasmtp.spawn(function() got[1] = { luasmtp.resolve("slow.test", { timeout = 5 }) } end),
        luasmtp.spawn(function() got[2] = { luasmtp.resolve_mx("slow.test", { timeout = 5 }) } end),
        luasmtp.spawn(function() got[3] = { luasmtp.resolve_txt("slow.test", { timeout = 5 }) } end),
      }
      luasmtp.sleep(0.05)
      assert.equal(3, luasmtp.stats().dns_queries)
      local t0 = luasmtp.update_now()
      assert.is_true(luasmtp.dns_configure {
        servers = "127.0.0.1:" .. port, timeout = 0.3, tries = 1, rotate = false,
      })
      assert.equal(0, luasmtp.stats().dns_queries)
      for i, t in ipairs(tasks) do
        assert.is_true(t:join(1))
        assert.same({ nil, "dns", "resolver reconfigured" }, got[i])
      end
      assert.is_true(elapsed_since(t0) < 0.2)
      -- the new channel works
      assert.same({ "inet 192.0.2.4" }, set_of(assert(luasmtp.resolve("v4.test"))))
    end, 5)
  end)

  it("raises on bad arguments and leaves the resolver as it was", function()
    H.run(function()
      -- a query pending on the current channel must outlive every failed call
      local pending = luasmtp.spawn(function() return luasmtp.resolve("lagged.test", { timeout = 3 }) end)
      luasmtp.sleep(0)
      assert.equal(1, luasmtp.stats().dns_queries)
      local function raises(pat, f, ...)
        local ok, err = pcall(f, ...)
        assert.is_false(ok, "did not raise: " .. pat)
        assert.matches(pat, tostring(err), 1, true)
      end
      raises("string expected", luasmtp.resolve, nil)
      raises("string expected", luasmtp.resolve, {})
      raises("string expected", luasmtp.resolve_mx)
      raises("string expected", luasmtp.resolve_txt, true)
      raises("zero byte", luasmtp.resolve, "a\0b.test")
      raises("zero byte", luasmtp.resolve_mx, "a.test\0")
      raises("zero byte", luasmtp.resolve_txt, "\0")
      raises("table expected", luasmtp.resolve, "a.test", 5)
      raises("table expected", luasmtp.resolve_mx, "a.test", "fast")
      raises("family", luasmtp.resolve, "a.test", { family = "ipx" })
      raises("family", luasmtp.resolve, "a.test", { family = 4 })
      raises("family", luasmtp.resolve, "127.0.0.1", { family = "inet4" })
      for _, bad in ipairs { -1, 1 / 0, 0 / 0, "soon", true } do
        raises("timeout must be", luasmtp.resolve, "a.test", { timeout = bad })
        raises("timeout must be", luasmtp.resolve_mx, "m.test", { timeout = bad })
        raises("timeout must be", luasmtp.resolve_txt, "t.test", { timeout = bad })
      end
      raises("table expected", luasmtp.dns_configure, 5)
      raises("table expected", luasmtp.dns_configure, "127.0.0.1")
      raises("must not be empty", luasmtp.dns_configure, { servers = {} })
      raises("servers must be", luasmtp.dns_configure, { servers = 42 })
      for _, bad in ipairs { { true }, { {} }, { "" }, { "127.0.0.1,127.0.0.2" }, { "127.0.0.1 " },
        { "not an address" }, { "bogus:53" }, { "127.0.0.1:" .. port, "bogus" } } do
        raises("servers: each must be", luasmtp.dns_configure, { servers = bad })
      end
      raises("servers: each must be", luasmtp.dns_configure, { servers = "bogus" })
      for _, bad in ipairs { 0, -1, 3601, "x", 0 / 0 } do
        raises("timeout must be", luasmtp.dns_configure, { timeout = bad })
      end
      for _, bad in ipairs { 0, 101, 1.5, "many" } do
        raises("tries must be", luasmtp.dns_configure, { tries = bad })
      end
      raises("rotate must be", luasmtp.dns_configure, { rotate = "yes" })
      raises("rotate must be", luasmtp.dns_configure, { rotate = 1 })
      -- nothing replaced the channel: the pending query gets its answer
      local ok, list = pending:join(3)
      assert.is_true(ok)
      assert.same({ "inet 192.0.2.31" }, set_of(list))
    end, 5)
  end)

  it("refuses to wait in a plain coroutine inside a task", function()
    H.run(function()
      for _, f in ipairs { luasmtp.resolve, luasmtp.resolve_mx, luasmtp.resolve_txt } do
        local co = coroutine.create(function() return f("a.test") end)
        local ok, err = coroutine.resume(co)
        assert.is_false(ok)
        assert.matches("not a luasmtp task", err)
      end
      -- numeric literals need no wait
      local co = coroutine.create(function() return luasmtp.resolve("[::1]") end)
      assert.same({ true, { { family = "inet6", address = "::1" } } }, { coroutine.resume(co) })
      assert.equal(0, luasmtp.stats().dns_queries)
    end, 5)
    -- Outside any task a plain coroutine counts as the main chunk (which
    -- may itself run in one): the lookup runs the loop, as sleep does.
    local co = coroutine.create(function() return luasmtp.resolve("a.test") end)
    local ok, list = coroutine.resume(co)
    assert.is_true(ok)
    assert.equal("dead", coroutine.status(co))
    assert.same({ "inet 192.0.2.1", "inet6 2001:db8::1" }, set_of(list))
  end)

  it("works from the main chunk, outside any task", function()
    assert.same({ "inet 192.0.2.1", "inet6 2001:db8::1" }, set_of(assert(luasmtp.resolve("a.test"))))
    assert.equal(4, #assert(luasmtp.resolve_mx("m.test")))
    assert.equal(2, #assert(luasmtp.resolve_txt("t.test")))
    assert.same({ nil, "dns", "nx.test: Domain name not found" }, { luasmtp.resolve("nx.test") })
    assert.same({ nil, "timeout", "late.test: DNS lookup timed out" },
      { luasmtp.resolve("late.test", { timeout = 0.1 }) })
    -- the late answer comes during a later wait of the main chunk
    local t0 = luasmtp.update_now()
    luasmtp.sleep(0.3)
    local dt = elapsed_since(t0)
    assert.is_true(dt >= 0.29, "sleep cut short: " .. dt)
    assert.equal(0, luasmtp.stats().dns_queries)
    assert.same({ "inet 192.0.2.31" }, set_of(assert(luasmtp.resolve("lagged.test", { timeout = 2 }))))
  end)

  it("an abandoned query keeps neither run() nor deadlock detection waiting", function()
    assert.same({ nil, "timeout", "slow.test: DNS lookup timed out" },
      { luasmtp.resolve("slow.test", { timeout = 0.05 }) })
    assert.equal(1, luasmtp.stats().dns_queries)
    local t0 = luasmtp.update_now()
    assert.is_true(luasmtp.run())
    local c = luasmtp.cond()
    local ok, err = pcall(c.wait, c)
    assert.is_false(ok)
    assert.matches("deadlock", err)
    assert.is_true(elapsed_since(t0) < 0.1)
    configure()
    assert.equal(0, luasmtp.stats().dns_queries)
  end)

  it("talks to an IPv6 server, fails over to a second server, fails on a dead one", function()
    H.run(function()
      assert(luasmtp.dns_configure { servers = { "[::1]:" .. port6 }, timeout = 0.3, tries = 1 })
      assert.same({ "inet 192.0.2.66" }, set_of(assert(luasmtp.resolve("six.test"))))
      -- nothing listens on the first one
      local dead = H.free_port()
      assert(luasmtp.dns_configure {
        servers = { "127.0.0.1:" .. dead, "[::1]:" .. port6 }, timeout = 0.3, tries = 2, rotate = false,
      })
      assert.same({ "inet 192.0.2.66" }, set_of(assert(luasmtp.resolve("six.test", { timeout = 3 }))))
      assert(luasmtp.dns_configure { servers = "127.0.0.1:" .. dead, timeout = 0.3, tries = 1 })
      local t0 = luasmtp.update_now()
      local r, err, detail = luasmtp.resolve("a.test", { timeout = 3 })
      assert.is_nil(r)
      assert.equal("dns", err)
      assert.matches("^a%.test: ", detail)
      assert.is_true(elapsed_since(t0) < 1.5)
    end, 10)
  end)

  it("connect() resolves a name to reach a local listener", function()
    H.run(function()
      local l, lport = H.listen()
      local t = luasmtp.spawn(function()
        local s = assert(l:accept(2))
        assert(s:send("220 hi\r\n"))
        s:close()
      end)
      local c = assert(luasmtp.connect("conn.test", lport, { timeout = 2 }))
      assert.equal("127.0.0.1", (c:getpeername()))
      assert.equal("220 hi", c:receiveline())
      c:close()
      assert.is_true(t:join(2))
      assert.same({ nil, "dns", "nx.test: Domain name not found" },
        { luasmtp.connect("nx.test", lport, { timeout = 2 }) })
      local s, err = luasmtp.connect("conn.test", lport, { timeout = 2, family = "inet6" })
      assert.is_nil(s)
      assert.equal("dns", err)
      -- the whole connect's timeout covers the lookup
      assert.same({ nil, "timeout", "slow.test: DNS lookup timed out" },
        { luasmtp.connect("slow.test", lport, { timeout = 0.05 }) })
      l:close()
      configure() -- drops the abandoned query
    end, 5)
  end)

  it("frees pending queries when the Lua state closes", function()
    local script = H.tmp .. "/dns_exit.lua"
    local f = assert(io.open(script, "w"))
    f:write(string.format([[
package.path = %q
package.cpath = %q
local luasmtp = require "luasmtp"
assert(luasmtp.dns_configure { servers = { "127.0.0.1:%d" }, timeout = 5, tries = 1 })
for _, fn in ipairs { luasmtp.resolve, luasmtp.resolve_mx, luasmtp.resolve_txt } do
  luasmtp.spawn(function() fn("slow.test", { timeout = 30 }) print("resumed") end)
end
luasmtp.step(0)
print("pending " .. luasmtp.stats().dns_queries)
]], package.path, package.cpath, port))
    f:close()
    local p = assert(io.popen("timeout 10 lua5.4 " .. shquote(script) .. " 2>&1"))
    local out = p:read("a")
    local ok, how, code = p:close()
    assert.equal("pending 3\n", out)
    assert.same({ true, "exit", 0 }, { ok, how, code })
  end)
end)
