local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local queue = require "luasmtp.queue"
local store = require "luasmtp.queue.store"
local H = require "spec.helper"
local QH = require "spec.queue_helper"

local TMP = H.tmp .. "/queue"
local count = 0

local function fresh_dir(name)
  count = count + 1
  local dir = ("%s/%s-%d"):format(TMP, name, count)
  os.execute("rm -rf " .. H.shquote(dir))
  return H.mkdir(dir)
end

local receiver, smarthost = QH.receiver, QH.smarthost
local started = {} -- the front servers a test starts

-- The body of a queued entry, wherever the store keeps it.
local function body_of(dir, id)
  local e = assert(store.load(store.paths(dir), id))
  return assert(store.read_body(e))
end

local names_in = QH.names

local open = QH.open

-- Run the scheduler until the queue is empty (bounded).
local function drain(q, timeout)
  q:start()
  local deadline = luasmtp.update_now() + (timeout or 20)
  while q:pending() > 0 and luasmtp.update_now() < deadline do luasmtp.sleep(0.05) end
  q:stop()
  return q:pending() == 0
end

local function msg(n)
  return ("Message-ID: <m%d@test>\r\nSubject: %d\r\n\r\nbody %d\r\n"):format(n, n, n)
end

local ids_of = QH.ids_of

after_each(function()
  for _, srv in ipairs(started) do srv:close() end
  started = {}
  H.close_servers()
end)

describe("queue store", function()
  it("writes an entry durably and rebuilds its state when opened again", function()
    local dir = fresh_dir("store")
    local q = open(dir)
    local id = assert(q:enqueue { from = "a@example.org", envid = "E 1",
      rcpt = { { address = "b@example.net", notify = { "success", "failure" }, orcpt = "rfc822;b@example.net" },
        "c@example.net" }, ret = "hdrs", body = msg(1) })
    assert.matches("^%x+$", id)
    assert.equal(msg(1), body_of(dir, id))
    local e = store.load(store.paths(dir), id)
    assert.equal("a@example.org", e.from)
    assert.equal("E 1", e.envid)
    assert.equal("hdrs", e.ret)
    assert.equal("SUCCESS,FAILURE", e.rcpt[1].notify)
    assert.equal("rfc822;b@example.net", e.rcpt[1].orcpt)
    assert.equal("c@example.net", e.rcpt[2].address)
    -- a state line, then a torn one (a crash in the write)
    assert(store.append(store.paths(dir), id, store.log_line("attempt", 100, 1, "temp", 200, "451 4.3.0 later", "mx")
      .. "final 101 2 fai"))
    q:close() -- one queue per directory at a time
    local q2 = open(dir)
    local e2 = q2.entries[id]
    assert.equal(1, e2.rcpt[1].attempts)
    assert.equal(200, e2.rcpt[1].next_attempt)
    assert.equal("451 4.3.0 later", e2.rcpt[1].last_reply)
    assert.equal("pending", e2.rcpt[2].state)
    assert.equal(1, q2:stats().messages)
    assert.equal(2, q2:stats().recipients)
  end)

  it("removes half-written entries at start and never delivers them", function()
    local dir = fresh_dir("half")
    local q = open(dir)
    local id = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg(1) })
    H.writefile(dir .. "/tmp/0000X.body", "partial")
    H.writefile(dir .. "/queue/DEAD01.body", "body without envelope")
    H.writefile(dir .. "/queue/DEAD02.env", "luasmtp-queue 1\nid DEAD02\nfrom a@test\n") -- torn envelope
    H.writefile(dir .. "/queue/DEAD02.body", "x")
    q:close()
    local q2 = open(dir)
    assert.is_table(q2.entries[id])
    assert.is_nil(q2.entries.DEAD02)
    assert.equal(1, q2:pending())
    -- the entry is in its segment; nothing else is left
    assert.same({}, names_in(dir .. "/queue"))
    assert.equal(1, #names_in(dir .. "/segments"))
    assert.same({}, names_in(dir .. "/tmp"))
  end)

  it("keeps a new entry's message in memory up to CACHE_MAX in all, and lets go of it with the entry", function()
    H.run(function()
      local _, port, got = receiver()
      local q = open(fresh_dir("cache"), { route = smarthost(port) })
      local max = store.CACHE_MAX
      store.CACHE_MAX = #msg(1) * 2
      local ok, err = pcall(function()
        local ids = {}
        for i = 1, 3 do ids[i] = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg(i) }) end
        assert.equal(msg(1), q.entries[ids[1]].data)
        assert.equal(msg(2), q.entries[ids[2]].data)
        assert.is_nil(q.entries[ids[3]].data) -- over the budget: read from its segment
        assert.equal(msg(3), store.read_body(q.entries[ids[3]]))
        assert.equal(#msg(1) + #msg(2), q.paths.cached)
        assert(drain(q))
        assert.equal(0, q.paths.cached)
        assert.same({ ["m1@test"] = 1, ["m2@test"] = 1, ["m3@test"] = 1 }, ids_of(got))
      end)
      store.CACHE_MAX = max
      assert(ok, err)
    end, 30)
  end)

  it("gives IDs unique across queues opened again", function()
    local dir = fresh_dir("ids")
    local seen = {}
    for _ = 1, 3 do
      local q = open(dir)
      for _ = 1, 20 do
        local id = assert(q:enqueue { from = "", rcpt = { "b@test" }, body = "x\r\n" })
        assert.is_nil(seen[id])
        seen[id] = true
      end
      q:close()
    end
  end)

  it("takes bodies as files, chunk functions and objects with chunks()", function()
    local dir = fresh_dir("bodies")
    local q = open(dir)
    local path = dir .. "/in.eml"
    H.writefile(path, msg(7))
    local f = assert(io.open(path, "rb"))
    local a = assert(q:enqueue { from = "", rcpt = { "b@test" }, body = f })
    f:close()
    local parts = { "Subject: x\r\n", "\r\n", "hi\r\n" }
    local i = 0
    local b = assert(q:enqueue { from = "", rcpt = { "b@test" }, body = function() i = i + 1; return parts[i] end })
    local c = assert(q:enqueue { from = "", rcpt = { "b@test" },
      body = { chunks = function() local k = 0; return function() k = k + 1; return parts[k] end end } })
    assert.equal(msg(7), body_of(dir, a))
    assert.equal("Subject: x\r\n\r\nhi\r\n", body_of(dir, b))
    assert.equal("Subject: x\r\n\r\nhi\r\n", body_of(dir, c))
    -- a body larger than INLINE_MAX takes files of its own, read in pieces
    local big = ("y"):rep(store.INLINE_MAX + 70000)
    local pos = 1
    local d = assert(q:enqueue { from = "", rcpt = { "b@test" }, body = function()
      if pos > #big then return nil end
      local piece = big:sub(pos, pos + 9999)
      pos = pos + #piece
      return piece
    end })
    assert.equal(big, H.readfile(dir .. "/queue/" .. d .. ".body"))
    assert.equal(#big, q.entries[d].size)
    -- a body function that fails leaves nothing behind
    local id, token = q:enqueue { from = "", rcpt = { "b@test" }, body = function() return nil, "broken" end }
    assert.is_nil(id)
    assert.equal("io", token)
    assert.same({}, require("luasmtp.core").listdir(dir .. "/tmp"))
  end)

  it("refuses an enqueue on a full disk and loses nothing queued", function()
    local dir = H.tmp .. "/queue-full"
    os.execute("umount " .. H.shquote(dir) .. " 2>/dev/null")
    local umount, why = H.mount_tmpfs(dir, "512k")
    if not umount then pending(why) return end
    local ok, err = pcall(function()
      local q = open(dir)
      local kept = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg(1) })
      local id, token, _, kind = q:enqueue { from = "a@test", rcpt = { "b@test" }, body = ("x"):rep(1024 * 1024) }
      assert.is_nil(id)
      assert.equal("io", token)
      assert.equal("full", kind)
      q:close()
      local q2 = open(dir)
      assert.equal(1, q2:pending())
      assert.equal(msg(1), body_of(dir, kept))
      assert.same({}, require("luasmtp.core").listdir(dir .. "/tmp"))
      q2:close()
    end)
    collectgarbage() -- a queue left open by a failed assertion holds its lock file
    umount()
    assert(ok, err)
  end)
end)

describe("queue crash safety", function()
  local child = "lua5.4 " .. H.shquote(H.root .. "/spec/queue_child.lua")
  local run_child = QH.run_child

  it("delivers every message after a crash right after the enqueue", function()
    H.run(function()
      local dir = fresh_dir("crash1")
      local _, port, got = receiver()
      local out = run_child(dir, port, 3, "after_enqueue", "c1a")
      assert.matches("crash point after_enqueue", out)
      assert.equal(0, #got.messages)
      out = run_child(dir, port, 0, nil, "c1b")
      assert.matches("empty", out)
      assert.same({ ["child-1@test"] = 1 }, ids_of(got))
      assert.same({ "a@test", "b@test" }, got.messages[1].rcpt)
    end, 60)
  end)

  it("delivers every message after a crash during a delivery", function()
    H.run(function()
      local dir = fresh_dir("crash2")
      local pid
      local _, port, got = receiver { data = function(_, _, attempt)
        if attempt == 1 then
          H.kill(pid) -- the queue dies while its DATA is in flight
          os.execute("kill -9 " .. math.tointeger(pid) .. " 2>/dev/null")
          return server.tempfail("gone")
        end
      end }
      local log = H.tmp .. "/queue-child-c2a.log"
      pid = H.start(child .. " " .. H.shquote(dir) .. " " .. port .. " 1", log)
      assert(H.wait_pid(pid, 30))
      assert.equal(0, #got.messages)
      local out = run_child(dir, port, 0, nil, "c2b")
      assert.matches("empty", out)
      assert.same({ ["child-1@test"] = 1 }, ids_of(got))
    end, 60)
  end)

  it("after the remote 250 and before the state is written: a duplicate, the documented window", function()
    H.run(function()
      local dir = fresh_dir("crash3")
      local _, port, got = receiver()
      local out = run_child(dir, port, 3, "after_remote_reply", "c3a")
      assert.matches("crash point after_remote_reply", out)
      -- the messages the remote took before the crash (up to 3: they
      -- go over parallel connections); no state was written for them
      local before = #got.messages
      assert.is_true(before >= 1)
      out = run_child(dir, port, 0, nil, "c3b")
      assert.matches("empty", out)
      local seen = ids_of(got)
      local dup = 0
      for k = 1, 3 do
        local n = seen["child-" .. k .. "@test"]
        assert(n == 1 or n == 2, "message " .. k .. " delivered " .. tostring(n) .. " times")
        if n == 2 then dup = dup + 1 end
      end
      assert.equal(before, dup) -- only those the remote took before the crash
      assert.same({}, names_in(dir .. "/queue"))
    end, 60)
  end)
end)

describe("queue scheduler", function()
  it("retries after a 4xx and delivers on the 250", function()
    H.run(function()
      local dir = fresh_dir("retry")
      local _, port, got = receiver { data = function(_, _, attempt)
        if attempt == 1 then return server.reply(451, "4.3.0", "try again") end
      end }
      local q = open(dir, { route = smarthost(port) })
      local id = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg(1) })
      local log = {}
      q.opts.log = function(_, m) log[#log + 1] = m end
      assert(drain(q))
      assert.equal(2, got.attempts)
      assert.equal(1, #got.messages)
      local text = table.concat(log, "\n")
      assert.matches(id .. ": to=<b@test> deferred until %+%d+s: 451 4%.3%.0 try again", text)
      assert.matches(id .. ": to=<b@test> via smtp:127%.0%.0%.1:" .. port .. ": 250", text)
    end, 30)
  end)

  it("a 5xx fails the recipient with a notice; no notice for the null sender", function()
    H.run(function()
      local dir = fresh_dir("fail")
      local _, port, got = receiver { rcpt = function(_, rcpt)
        if rcpt:match("^nobody") then return server.reply(550, "5.1.1", "No such user") end
      end }
      local notices = {}
      local q = open(dir, { route = smarthost(port), on_notice = function(e, list)
        notices[#notices + 1] = { entry = e, list = list }
      end })
      assert(q:enqueue { from = "a@test", rcpt = { "nobody@test", "b@test" }, body = msg(1) })
      assert(q:enqueue { from = "", rcpt = { "nobody@test" }, body = msg(2) })
      assert(drain(q))
      assert.equal(1, #got.messages)
      assert.same({ "b@test" }, got.messages[1].rcpt)
      assert.equal(1, #notices)
      local n = notices[1].list[1]
      assert.equal("nobody@test", n.address)
      assert.equal("failed", n.action)
      assert.equal("5.1.1", n.status)
      assert.matches("^550 5%.1%.1 No such user", n.diagnostic)
      assert.equal("127.0.0.1", n.remote_mta)
    end, 30)
  end)

  it("bounces after the lifetime", function()
    H.run(function()
      local dir = fresh_dir("lifetime")
      local _, port = receiver { data = function() return server.reply(452, "4.2.2", "full") end }
      local notices = {}
      local q = open(dir, { route = smarthost(port), lifetime = 0.5,
        on_notice = function(_, list) notices[#notices + 1] = list[1] end })
      assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg(1) })
      assert(drain(q))
      assert.equal(1, #notices)
      assert.equal("failed", notices[1].action)
      assert.equal("4.2.2", notices[1].status)
    end, 30)
  end)

  it("sends one delay warning after delay_warning, then delivers", function()
    H.run(function()
      local dir = fresh_dir("delay")
      local _, port, got = receiver { data = function(_, _, attempt)
        if attempt <= 3 then return server.reply(451, "4.7.1", "greylisted") end
      end }
      local notices = {}
      local q = open(dir, { route = smarthost(port), delay_warning = 0,
        on_notice = function(_, list) for _, n in ipairs(list) do notices[#notices + 1] = n end end })
      assert(q:enqueue { from = "a@test", rcpt = { { address = "b@test", notify = "DELAY,FAILURE" } }, body = msg(1) })
      assert(drain(q))
      assert.equal(1, #got.messages)
      assert.equal(1, #notices)
      assert.equal("delayed", notices[1].action)
      assert.equal("4.7.1", notices[1].status)
      assert.is_number(notices[1].will_retry_until)
    end, 30)
  end)

  it("backs a destination off after 421 and throttles it; flush lifts it", function()
    H.run(function()
      local dir = fresh_dir("backoff")
      local refuse = true
      local _, port, got = receiver { connect = function()
        if refuse then return server.disconnect("busy") end
      end }
      local q = open(dir, { route = smarthost(port), retry = { 60 } })
      for k = 1, 3 do assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg(k) }) end
      q:start()
      local key = "smtp:127.0.0.1:" .. port
      local deadline = luasmtp.update_now() + 10
      while not (q.dests[key] and q.dests[key].failures > 0) and luasmtp.update_now() < deadline do
        luasmtp.sleep(0.05)
      end
      luasmtp.sleep(0.3)
      local d = q.dests[key]
      assert.is_true(d.failures >= 1)
      assert.is_true(d.backoff_until > luasmtp.time() + 30)
      assert.equal(1, d.limit) -- throttled to one connection
      -- the attempts already under way took the 421; none follow during the backoff
      local function tried()
        local n = 0
        for _, e in pairs(q.entries) do n = n + e.rcpt[1].attempts end
        return n
      end
      local before = tried()
      luasmtp.sleep(0.5)
      assert.equal(before, tried())
      refuse = false
      q:flush()
      deadline = luasmtp.update_now() + 10
      while q:pending() > 0 and luasmtp.update_now() < deadline do luasmtp.sleep(0.05) end
      q:stop()
      assert.equal(3, #got.messages)
    end, 30)
  end)

  it("sends a destination's messages over one connection, within the limits", function()
    H.run(function()
      local dir = fresh_dir("reuse")
      local connections, busy, max_busy = 0, 0, 0
      local _, port, got = receiver {
        connect = function() connections = connections + 1 end,
        data = function()
          busy = busy + 1
          if busy > max_busy then max_busy = busy end
          luasmtp.sleep(0.02)
          busy = busy - 1
        end }
      local q = open(dir, { route = smarthost(port), max_connections_per_destination = 1 })
      for k = 1, 5 do assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg(k) }) end
      assert(drain(q))
      assert.equal(5, #got.messages)
      assert.equal(1, connections)
      assert.equal(1, max_busy)
    end, 30)
  end)

  it("rate shaping spaces a destination's messages", function()
    H.run(function()
      local dir = fresh_dir("rate")
      local _, port, got = receiver()
      local q = open(dir, { route = smarthost(port) })
      q:shape("smtp:127.0.0.1:" .. port, { max_connections = 1, rate = 20 })
      for k = 1, 4 do assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg(k) }) end
      local t0 = luasmtp.update_now()
      assert(drain(q))
      assert.equal(4, #got.messages)
      assert.is_true(luasmtp.update_now() - t0 >= 3 / 20) -- at least the spacing of 4 messages at 20/s
      assert.equal(20, q.dests["smtp:127.0.0.1:" .. port].rate)
    end, 30)
  end)

  it("computes retries from the table with jitter", function()
    local scheduler = require "luasmtp.queue.scheduler"
    local o = { retry = { 300, 600, 1200, 2400, 4000 }, jitter = 0 }
    assert.equal(300, scheduler.backoff(o, 1))
    assert.equal(1200, scheduler.backoff(o, 3))
    assert.equal(4000, scheduler.backoff(o, 9))
    o.jitter = 0.1
    for _ = 1, 50 do
      local b = scheduler.backoff(o, 2)
      assert(b >= 540 and b <= 660, b)
    end
  end)
end)

describe("queue routes", function()
  it("delivers to a Maildir, discards and rejects", function()
    H.run(function()
      local dir = fresh_dir("routes")
      local notices = {}
      local q = open(dir, { route = function(rcpt)
        if rcpt.address:match("^local") then return { kind = "maildir", dir = dir .. "/Maildir" } end
        if rcpt.address:match("^null") then return "discard" end
        return { kind = "reject", reply = "550 5.7.1 not here" }
      end, on_notice = function(_, list) for _, n in ipairs(list) do notices[#notices + 1] = n end end })
      assert(q:enqueue { from = "a@test", body = msg(1),
        rcpt = { { address = "local@test", notify = "SUCCESS" }, "null@test", "else@test" } })
      assert(drain(q))
      local files = require("luasmtp.core").listdir(dir .. "/Maildir/new")
      assert.equal(1, #files)
      assert.equal(msg(1), H.readfile(dir .. "/Maildir/new/" .. files[1]))
      table.sort(notices, function(a, b) return a.address < b.address end)
      assert.equal(2, #notices)
      assert.equal("else@test", notices[1].address)
      assert.equal("failed", notices[1].action)
      assert.equal("5.7.1", notices[1].status)
      assert.equal("local@test", notices[2].address)
      assert.equal("delivered", notices[2].action)
    end, 30)
  end)

  it("relays to a smarthost with AUTH", function()
    H.run(function()
      local credentials = require "luasmtp.credentials"
      local dir = fresh_dir("auth")
      local pw = dir .. "/passwd"
      H.writefile(pw, "relay:{PLAIN}secret\n")
      local verifier = assert(credentials.passwd_file(pw))
      local _, port, got = receiver { auth = { verifier = verifier } }
      local q = open(dir, { route = smarthost(port, { auth = { user = "relay", password = "secret",
        allow_plaintext = true } }) })
      assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg(1) })
      assert(drain(q))
      assert.equal(1, #got.messages)
      assert.equal("relay", got.messages[1].user)
    end, 30)
  end)

  it("queues what the server accepts (on_data) and relays it", function()
    H.run(function()
      local client = require "luasmtp.client"
      local dir = fresh_dir("plugin")
      local _, port, got = receiver()
      local q = open(dir, { route = smarthost(port) })
      local front = assert(server.new { listen = { "127.0.0.1:0" }, hostname = "front.test", log_level = "error",
        hooks = { on_data = queue.plugin(q).on_data } })
      started[#started + 1] = front
      local res = assert(client.send { server = "127.0.0.1:" .. front:addresses()[1].port, tls = "none",
        from = "a@test", to = { "b@test", "c@test" }, body = msg(1) })
      assert.matches("queued as %x+", client.format_reply(res.reply))
      assert.equal(1, q:pending())
      assert(drain(q))
      assert.equal(1, #got.messages)
      assert.same({ "b@test", "c@test" }, got.messages[1].rcpt)
    end, 30)
  end)
end)

describe("queue plugin", function()
  it("queues in the deliver phase of the plugin chain, with the DSN parameters, and relays", function()
    H.run(function()
      local client = require "luasmtp.client"
      local dir = fresh_dir("deliver")
      local _, port, got = receiver()
      local q = open(dir, { route = smarthost(port), retry = { 3600 } })
      local front = assert(server.new { listen = { "127.0.0.1:0" }, hostname = "front.test", log_level = "error",
        dsn = true, plugins = { server.plugins.received(), queue.plugin(q) } })
      started[#started + 1] = front
      local res = assert(client.send { server = "127.0.0.1:" .. front:addresses()[1].port, tls = "none",
        from = "a@test", to = { { address = "b@test", notify = { "success", "failure" }, orcpt = "rfc822;b@test" } },
        dsn = { ret = "hdrs", envid = "ENV1" }, body = msg(1) })
      local id = client.format_reply(res.reply):match("queued as (%x+)")
      assert.is_string(id)
      local e = q.entries[id]
      assert.equal("hdrs", e.ret)
      assert.equal("ENV1", e.envid)
      assert.equal("SUCCESS,FAILURE", e.rcpt[1].notify)
      assert.equal("rfc822;b@test", e.rcpt[1].orcpt)
      assert.matches("^Received: from ", store.read_body(e))
      assert(drain(q))
      -- the smarthost does not advertise DSN: NOTIFY=SUCCESS gets the
      -- "relayed" notice from here (RFC 3461 section 6.2)
      assert.equal(2, #got.messages)
      assert.matches("Message%-ID: <m1@test>", got.messages[1].data)
      assert.equal("", got.messages[2].from)
      assert.matches("Action: relayed", got.messages[2].data, 1, true)
    end, 30)
  end)
end)

describe("luasmtp queue", function()
  local dkjson = require "dkjson"
  local tool = QH.tool

  local function until_true(fn)
    local deadline = luasmtp.update_now() + 10
    while not fn() and luasmtp.update_now() < deadline do luasmtp.sleep(0.05) end
    return fn()
  end

  it("lists, shows, holds, releases, flushes, bounces and deletes while the scheduler runs", function()
    H.run(function()
      local dir = fresh_dir("tool")
      local _, port = receiver { data = function() return server.reply(451, "4.3.0", "later") end }
      local notices = {}
      local q = open(dir, { route = smarthost(port), retry = { 3600 },
        on_notice = function(e, list) notices[#notices + 1] = { id = e.id, list = list } end })
      local a = assert(q:enqueue { from = "a@test", rcpt = { "b@one.test" }, body = msg(1) })
      local b = assert(q:enqueue { from = "a@test", rcpt = { "c@two.test", "d@two.test" }, body = msg(2) })
      q:start()
      assert(until_true(function()
        return q.entries[a].rcpt[1].attempts == 1 and q.entries[b].rcpt[2].attempts == 1
      end))

      local text, ok = tool(dir, "--json list")
      assert(ok, text)
      local list = assert(dkjson.decode(text))
      assert.equal(2, #list)
      local byid = {}
      for _, e in ipairs(list) do byid[e.id] = e end
      assert.equal("451 4.3.0 later", byid[a].recipients[1].last_reply)
      assert.equal(1, byid[a].recipients[1].attempts)
      assert.equal(2, #byid[b].recipients)

      text = assert(tool(dir, "--json stats"))
      local st = assert(dkjson.decode(text))
      assert.equal(2, st.messages)
      assert.equal(3, st.recipients)
      assert.equal(2, st.destinations["two.test"])

      text = tool(dir, "show " .. a)
      assert.matches("from: <a@test>", text)
      assert.matches("Message%-ID: <m1@test>", text)
      assert.matches("rcpt: <b@one%.test> pending attempts 1", text)

      assert(tool(dir, "hold " .. a))
      assert(until_true(function() return q.entries[a].held end))
      assert(tool(dir, "flush"))
      assert(until_true(function() return q.entries[b].rcpt[1].attempts == 2 end))
      assert.equal(1, q.entries[a].rcpt[1].attempts) -- held: not flushed
      text = tool(dir, "list")
      assert.matches(a .. " !", text, 1, true)

      assert(tool(dir, "release " .. a))
      assert(until_true(function() return not q.entries[a].held and q.entries[a].rcpt[1].attempts == 2 end))

      assert(tool(dir, "bounce " .. b))
      assert(until_true(function() return q.entries[b] == nil end))
      assert.equal(1, #notices)
      assert.equal(b, notices[1].id)
      assert.equal(2, #notices[1].list)
      assert.equal("failed", notices[1].list[1].action)

      assert(tool(dir, "delete " .. a))
      assert(until_true(function() return q.entries[a] == nil end))
      assert.equal(1, #notices)
      q:stop()
      assert.matches("queue is empty", (tool(dir, "list")))
      local _, found = tool(dir, "show " .. a)
      assert.is_falsy(found)
    end, 60)
  end)
end)

describe("queue interop", function()
  local postfix = require "spec.postfix"
  local dovecot = require "spec.dovecot"
  after_each(function()
    postfix.cleanup()
    dovecot.cleanup()
  end)

  it("relays through the queue into Postfix's smtpd", function()
    H.run(function()
      local pf = postfix.start {}
      local dir = fresh_dir("postfix")
      local q = open(dir, { route = smarthost(pf.port) })
      local a = assert(q:enqueue { from = "a@client.test", rcpt = { "b@dest.test", "c@dest.test" }, body = msg(1) })
      assert(q:enqueue { from = "", rcpt = { "d@dest.test" }, body = msg(2) })
      assert(drain(q, 30), "not delivered: " .. pf:logtext())
      local queued = {}
      for _, m in ipairs(pf:queue("hold")) do queued[m.sender .. ">" .. table.concat(m.recipients, ",")] = m end
      assert.is_table(queued["a@client.test>b@dest.test,c@dest.test"], pf:logtext())
      assert.is_table(queued[">d@dest.test"], pf:logtext())
      assert.is_nil(q.entries[a])
      pf:stop()
    end, 90)
  end)

  it("delivers through the queue into Dovecot's LMTP on a UNIX socket; an unknown user fails", function()
    H.run(function()
      local dc = dovecot.start { users = { "bob@example.test" } }
      local dir = fresh_dir("dovecot")
      local notices = {}
      local q = open(dir, { route = function() return { kind = "lmtp", path = dc.lmtp } end,
        on_notice = function(_, list) for _, n in ipairs(list) do notices[#notices + 1] = n end end })
      assert(q:enqueue { from = "a@client.test", body = msg(1),
        rcpt = { { address = "bob@example.test", notify = "SUCCESS,FAILURE" }, "nobody@example.test" } })
      assert(drain(q, 30), "not delivered: " .. dc:logtext())
      local msgs = dc:maildir("bob@example.test")
      assert.equal(1, #msgs, dc:logtext())
      assert.matches("Message%-ID: <m1@test>", msgs[1].data)
      table.sort(notices, function(x, y) return x.address < y.address end)
      assert.equal(2, #notices)
      assert.equal("delivered", notices[1].action) -- LMTP is final delivery: NOTIFY=SUCCESS is ours
      assert.equal("failed", notices[2].action)
      assert.equal("5.1.1", notices[2].status)
      dc:stop()
    end, 90)
  end)
end)
