-- luasmtp.redis (src/redis.c) and the Redis store of luasmtp.kv, against
-- a real redis-server started here on loopback or a UNIX socket.
local H = require "spec.helper"
local luasmtp = require "luasmtp"
local redis = require "luasmtp.redis"
local kv = require "luasmtp.kv"
local server = require "luasmtp.server"

local running = {} -- pid -> true: the redis-servers of the current test
local seq = 0

--- start_redis{ port =, path =, password = } -> { pid =, path =, port = }
-- A redis-server without persistence on a UNIX socket in H.sockdir()
-- (and on 127.0.0.1:port when port is given); stopped by stop_redis or
-- after_each.
local function start_redis(opts)
  opts = opts or {}
  H.need("redis-server")
  seq = seq + 1
  local path = opts.path or H.sockpath(("redis-%d.sock"):format(seq))
  os.remove(path)
  local dir = H.tmpdir("redis")
  local args = {
    "exec redis-server", "--port", tostring(math.tointeger(opts.port or 0)), "--bind 127.0.0.1",
    "--unixsocket", H.shquote(path), "--unixsocketperm 700", "--save ''", "--appendonly no",
    "--enable-debug-command local", "--daemonize no", "--dir", H.shquote(dir),
    "--logfile ''",
  }
  if opts.password then args[#args + 1] = "--requirepass " .. H.shquote(opts.password) end
  local pid = H.start(table.concat(args, " "), dir .. "/redis.log")
  running[pid] = true
  local deadline = luasmtp.update_now() + 10
  while true do
    local s = luasmtp.connect_unix(path, { timeout = 1 })
    if s then
      s:close()
      break
    end
    if luasmtp.update_now() > deadline then
      error("redis-server did not start: " .. (H.readfile(dir .. "/redis.log") or ""))
    end
    luasmtp.sleep(0.05)
  end
  if opts.port then H.wait_port(opts.port) end
  return { pid = pid, path = path, port = opts.port, dir = dir }
end

local function stop_redis(rs)
  H.kill(rs.pid)
  H.wait_pid(rs.pid, 10)
  running[rs.pid] = nil
end

-- Poll until the client answers PING again (it reconnects by itself).
local function until_up(r, seconds)
  local deadline = luasmtp.update_now() + (seconds or 10)
  while luasmtp.update_now() < deadline do
    if r:command("PING") == "PONG" then return true end
    luasmtp.sleep(0.05)
  end
  return false
end

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

describe("luasmtp.redis", function()
  after_each(function()
    for pid in pairs(running) do
      H.kill(pid)
      H.wait_pid(pid, 10)
    end
    running = {}
    collectgarbage("collect")
  end)

  it("round-trips every reply type over a UNIX socket and TCP", function()
    H.run(function()
      local port = H.free_port()
      local rs = start_redis { port = port }
      for _, r in ipairs { redis.connect { path = rs.path }, redis.connect { host = "127.0.0.1", port = port } } do
        r:command("FLUSHDB")
        assert.equal("PONG", r:command("PING"))                    -- status
        assert.equal("OK", r:command("SET", "k", "v"))
        assert.equal("v", r:command("GET", "k"))                   -- bulk
        local bin = "a\0b\r\nc" .. ("x"):rep(100000)
        assert.equal("OK", r:command("SET", "bin", bin))
        assert.equal(bin, r:command("GET", "bin"))                 -- binary-safe, large
        assert.equal(42, r:command("INCRBY", "n", 42))             -- integer
        assert.equal(43, r:command("INCRBY", "n", 1.0))            -- numbers as arguments
        assert.is_nil(r:command("GET", "missing"))                 -- nil
        assert.is_nil(select(2, r:command("GET", "missing")))
        local a = r:command("MGET", "k", "missing", "n")           -- array with a nil
        assert.same({ "v", false, "43", n = 3 }, a)
        assert.same({ n = 0 }, r:command("LRANGE", "nothing", 0, -1)) -- empty array
        local nested = r:command("EVAL", "return {1, {2, 'three'}, {err = 'inner'}}", 0)
        assert.same({ 1, { 2, "three", n = 2 }, { err = "inner" }, n = 3 }, nested)
        local v, err = r:command("NOSUCHCOMMAND", "x")             -- error reply
        assert.is_nil(v)
        assert.matches("^ERR unknown command", err)
        v, err = r:command("INCR", "k")
        assert.is_nil(v)
        assert.matches("^ERR value is not an integer", err)
        assert.equal("OK", r:command("SET", "k", "still fine"))    -- the connection is fine
        assert.is_true(r:status().connected)
        assert.has_error(function() r:command("SUBSCRIBE", "c") end)
        assert.has_error(function() redis.connect { hots = "127.0.0.1" } end, "redis.connect: unknown option 'hots'")
        assert.has_error(function() redis.connect { port = "6379" } end)
        assert.has_error(function() redis.connect { tls = true } end)
        assert.has_error(function() kv.redis { prefx = "x" } end, "kv.redis: unknown option 'prefx'")
        assert.has_error(function() r:command("GET", {}) end)
        r:close()
        v, err = r:command("PING")
        assert.is_nil(v)
        assert.equal("closed", err)
      end
      stop_redis(rs)
    end, 30)
    H.assert_no_leaks()
  end)

  it("authenticates and selects the database; a wrong password is an error, not a hang", function()
    H.run(function()
      local rs = start_redis { password = "s3cret pass" }
      local r = redis.connect { path = rs.path, password = "s3cret pass", db = 3 }
      assert.equal("OK", r:command("SET", "where", "db3"))
      local r0 = redis.connect { path = rs.path, password = "s3cret pass" }
      assert.is_nil(r0:command("GET", "where"))
      assert.equal("OK", r0:command("SELECT", 3))
      assert.equal("db3", r0:command("GET", "where"))
      local bad = redis.connect { path = rs.path, password = "wrong", timeout = 2 }
      local v, err, detail = bad:command("GET", "where")
      assert.is_nil(v)
      assert.equal("protocol", err)
      assert.matches("WRONGPASS", detail)
      local none = redis.connect { path = rs.path }
      v, err, detail = none:command("GET", "where")
      assert.is_nil(v)
      assert.equal("protocol", err)
      assert.matches("NOAUTH", detail)
      for _, c in ipairs { r, r0, bad, none } do c:close() end
      stop_redis(rs)
    end, 30)
    H.assert_no_leaks()
  end)

  it("pipelines the commands of many tasks on one connection", function()
    H.run(function()
      local rs = start_redis()
      local r = redis.connect { path = rs.path, timeout = 10 }
      local seen, tasks = {}, {}
      for i = 1, 500 do
        tasks[i] = luasmtp.spawn(function()
          local n = assert(r:command("INCR", "counter"))
          seen[n] = true
          assert.equal("OK", r:command("SET", "task:" .. i, i))
          assert.equal(tostring(i), r:command("GET", "task:" .. i))
        end)
      end
      for _, t in ipairs(tasks) do assert.is_true((t:join(20))) end
      assert.equal(500, count(seen))
      for i = 1, 500 do assert.is_true(seen[i]) end
      assert.equal("500", r:command("GET", "counter"))
      -- one connection served them all
      local clients = r:command("INFO", "clients")
      assert.matches("connected_clients:1\r\n", clients, 1, true)
      r:close()
      stop_redis(rs)
    end, 60)
    H.assert_no_leaks()
  end)

  -- A fake Redis that reads `lines` request lines, then sends `answer`.
  local function fake_redis(lines, answer)
    local l, port = H.listen()
    local task = luasmtp.spawn(function()
      local s = l:accept(10)
      if not s then return end
      for _ = 1, lines do
        if not s:receiveline(1000, 10) then break end
      end
      s:send(answer)
      s:receive(1, 10) -- until the client drops the connection
      s:close()
    end)
    return port, function()
      task:join(20)
      l:close()
    end
  end

  it("survives hostile servers: out-of-turn replies, huge headers, endless bulks, garbage", function()
    H.run(function()
      -- PING (the set-up: 3 lines) and GET k (5 lines)
      local cases = {
        { "+PONG\r\n$1\r\nv\r\n+SURPRISE\r\n", "v", "protocol" },
        { "+PONG\r\n*2000000000\r\n", nil, "limit" },
        { "+PONG\r\n$1000000000\r\n" .. ("x"):rep(300000), nil, "limit" },
        { "+PONG\r\n?what\r\n", nil, "protocol" },
      }
      for _, case in ipairs(cases) do
        local port, done = fake_redis(8, case[1])
        local r = redis.connect { host = "127.0.0.1", port = port, timeout = 5, backoff_min = 30,
                                  max_reply = 65536 }
        local v, err = r:command("GET", "k")
        if case[2] then
          assert.equal(case[2], v)
          luasmtp.sleep(0.1)
          v, err = r:command("GET", "k") -- the connection was dropped after the surprise
        end
        assert.is_nil(v)
        assert.equal(case[3], err)
        assert.is_false(r:status().connected)
        r:close()
        done()
      end
    end, 60)
    H.assert_no_leaks()
  end)

  it("times out a command against a server that never answers, and never hangs", function()
    H.run(function()
      local l, port = H.listen()
      local accepted = {}
      local acceptor = luasmtp.spawn(function()
        for _ = 1, 3 do
          local s = l:accept(10)
          if not s then return end
          accepted[#accepted + 1] = s -- read nothing, answer nothing
        end
      end)
      local r = redis.connect { host = "127.0.0.1", port = port, timeout = 0.3 }
      local results = {}
      local tasks = {}
      for i = 1, 5 do
        tasks[i] = luasmtp.spawn(function()
          results[i] = table.pack(r:command("GET", "k" .. i))
        end)
      end
      for _, t in ipairs(tasks) do assert.is_true((t:join(10))) end
      for i = 1, 5 do
        assert.is_nil(results[i][1])
        assert.equal("timeout", results[i][2])
      end
      r:close()
      l:close()
      acceptor:join(10)
      for _, s in ipairs(accepted) do s:close() end
    end, 30)
    H.assert_no_leaks()
  end)

  it("gives up connecting after connect_timeout", function()
    H.need("python3")
    H.run(function()
      -- a listener whose accept queue is full: connecting hangs
      local dir = H.tmpdir("backlog")
      H.writefile(dir .. "/full.py", [[
import socket, sys, time
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(0)
port = l.getsockname()[1]
held = []
for _ in range(4):
    c = socket.socket(); c.setblocking(False)
    try: c.connect(("127.0.0.1", port))
    except BlockingIOError: pass
    held.append(c)
print(port, flush=True)
time.sleep(30)
]])
      local pid, port = H.start_server(H.python3 .. " " .. H.shquote(dir .. "/full.py"), "redis_backlog")
      local r = redis.connect { host = "127.0.0.1", port = port, timeout = 20, connect_timeout = 0.3,
                                backoff_min = 5 }
      local v, err, detail = r:command("PING") -- waits for the connection, which never comes
      assert.is_nil(v)
      assert.equal("timeout", err)
      assert.matches("connect timed out", detail, 1, true)
      r:close()
      H.kill(pid)
      H.wait_pid(pid)
    end, 30)
    H.assert_no_leaks()
  end)

  it("times out a command that Redis runs too long, then reconnects", function()
    H.run(function()
      local rs = start_redis()
      local r = redis.connect { path = rs.path, timeout = 0.3, backoff_min = 0.05, backoff_max = 0.2 }
      assert.equal("PONG", r:command("PING"))
      local v, err = r:command("DEBUG", "SLEEP", "1")
      assert.is_nil(v)
      assert.equal("timeout", err)
      assert.is_true(until_up(r))
      assert.equal("OK", r:command("SET", "after", "1"))
      r:close()
      stop_redis(rs)
    end, 30)
    H.assert_no_leaks()
  end)

  it("turns Redis going away mid-run into errors, and reconnects when it is back", function()
    H.run(function()
      local rs = start_redis()
      local r = redis.connect { path = rs.path, timeout = 2, backoff_min = 0.05, backoff_max = 0.3 }
      assert.equal("PONG", r:command("PING"))
      local ok, failed, stop = 0, 0, false
      local workers = {}
      for i = 1, 20 do
        workers[i] = luasmtp.spawn(function()
          while not stop do
            local v, err = r:command("INCR", "n")
            if v then ok = ok + 1 else
              failed = failed + 1
              assert.is_string(err)
              luasmtp.sleep(0.01)
            end
          end
        end)
      end
      luasmtp.sleep(0.3)
      stop_redis(rs) -- killed while commands are in flight
      local before = failed
      local deadline = luasmtp.update_now() + 10
      while failed <= before + 20 and luasmtp.update_now() < deadline do luasmtp.sleep(0.02) end
      assert.is_true(failed > before + 20) -- every worker goes on, failing
      local v, err = r:command("PING")
      assert.is_nil(v)
      assert.is_truthy(({ closed = true, io = true, refused = true, reset = true })[err])
      assert.is_false(r:status().connected)
      local rs2 = start_redis { path = rs.path } -- back, on the same socket
      assert.is_true(until_up(r))
      local ok_before = ok
      deadline = luasmtp.update_now() + 10
      while ok <= ok_before + 20 and luasmtp.update_now() < deadline do luasmtp.sleep(0.02) end
      assert.is_true(ok > ok_before + 20)
      stop = true
      for _, t in ipairs(workers) do assert.is_true((t:join(10))) end
      r:close()
      stop_redis(rs2)
    end, 60)
    H.assert_no_leaks()
  end)

  it("caps replies at max_reply and drops the connection that sent one", function()
    H.run(function()
      local rs = start_redis()
      local r = redis.connect { path = rs.path, max_reply = 4096, backoff_min = 0.05 }
      assert.equal("OK", r:command("SET", "big", ("x"):rep(100000)))
      local elements = {}
      for i = 1, 1000 do elements[i] = "e" end
      assert.equal(1000, r:command("RPUSH", "many", table.unpack(elements)))
      local v, err = r:command("GET", "big")
      assert.is_nil(v)
      assert.equal("limit", err)
      assert.is_true(until_up(r))
      v, err = r:command("LRANGE", "many", 0, -1) -- many small elements
      assert.is_nil(v)
      assert.equal("limit", err)
      assert.is_true(until_up(r))
      assert.equal(1000, r:command("LLEN", "many"))
      assert.equal("OK", r:command("SET", "huge", ("y"):rep(10000))) -- a large command is fine
      r:close()
      local small = redis.connect { path = rs.path, max_command = 1000 }
      v, err = small:command("SET", "huge", ("y"):rep(10000))
      assert.is_nil(v)
      assert.equal("limit", err)
      small:close()
      stop_redis(rs)
    end, 30)
    H.assert_no_leaks()
  end)

  it("frees waiting commands and the connection when the Lua state closes", function()
    -- a child process: a task waits on a server that never answers when
    -- the state closes (under the sanitizer build this checks the frees)
    local l, port = H.listen()
    local script = H.tmpdir("redis_exit") .. "/exit.lua"
    H.writefile(script, string.format([[
package.path = %q
package.cpath = %q
local luasmtp = require "luasmtp"
local redis = require "luasmtp.redis"
local r = redis.connect { host = "127.0.0.1", port = %d, timeout = 30 }
for _ = 1, 3 do luasmtp.spawn(function() r:command("GET", "x") print("resumed") end) end
for _ = 1, 20 do luasmtp.step(0.01) end
print("pending " .. luasmtp.stats().redis_requests)
os.exit(0, true)
]], package.path, package.cpath, port))
    -- the kernel completes the child's connection; nobody accepts it
    local p = assert(io.popen("timeout 10 lua5.4 " .. H.shquote(script) .. " 2>&1"))
    local out = p:read("a")
    local ok, how, code = p:close()
    l:close()
    assert.equal("pending 3\n", out)
    assert.same({ true, "exit", 0 }, { ok, how, code })
    H.assert_no_leaks()
  end)

  it("fails at once while Redis is down, without waiting for a timeout", function()
    H.run(function()
      local path = H.sockpath("redis-never.sock")
      local r = redis.connect { path = path, timeout = 30, backoff_min = 0.05 }
      local t0 = luasmtp.update_now()
      for _ = 1, 3 do
        local v, err = r:command("PING")
        assert.is_nil(v)
        assert.is_string(err)
        luasmtp.sleep(0.06)
      end
      assert.is_true(luasmtp.update_now() - t0 < 20) -- not one timeout of 30 s
      r:close()
    end, 60)
    H.assert_no_leaks()
  end)
end)

-- One behaviour suite for every store: what kv_spec checks for kv.memory,
-- run against kv.memory and kv.redis alike.
local function store_suite(name, make)
  describe("kv store " .. name, function()
    local rs
    before_each(function()
      if name == "redis" then rs = start_redis() end
    end)
    after_each(function()
      if rs then stop_redis(rs) end
      rs = nil
    end)

    it("gets, sets, deletes and expires values", function()
      H.run(function()
        local s = make(rs)
        assert.is_nil(s:get("a"))
        assert.is_true(s:set("a", "1"))
        assert.equal("1", s:get("a"))
        assert.is_true(s:set("t", 7, 2))
        assert.equal("7", tostring(s:get("t")))
        luasmtp.sleep(2.1)
        luasmtp.update_now()
        assert.is_nil(s:get("t"))
        assert.is_true(s:delete("a"))
        assert.is_nil(s:get("a"))
        assert.has_error(function() s:set("x", {}) end)
        if s.close then s:close() end
      end)
    end)

    it("counts with incr and starts again after the ttl", function()
      H.run(function()
        local s = make(rs)
        assert.equal(1, s:incr("n", 1, 2))
        assert.equal(4, s:incr("n", 3, 2))
        luasmtp.sleep(2.1)
        luasmtp.update_now()
        assert.equal(1, s:incr("n", 1))
        assert.equal(2, s:incr("n"))
        if s.close then s:close() end
      end)
    end)

    it("hands out at most limit slots and takes them back", function()
      H.run(function()
        local s = make(rs)
        local a = s:acquire("k", 2)
        local b = s:acquire("k", 2)
        assert.truthy(a)
        assert.truthy(b)
        assert.is_false(s:acquire("k", 2))
        local o = s:acquire("other", 2)
        assert.truthy(o)
        assert.is_true(s:release("k", a))
        local c = s:acquire("k", 2)
        assert.truthy(c)
        s:release("k", b); s:release("k", c); s:release("other", o)
        assert.truthy(s:acquire("k", 1))
        if s.close then s:close() end
      end)
    end)

    it("refuses events over the rate and lets them in once the window moves", function()
      H.run(function()
        local s = make(rs)
        for _ = 1, 3 do assert.is_true(s:hit("r", 3, 600)) end
        assert.is_false(s:hit("r", 3, 600))
        assert.is_true(s:hit("r2", 3, 600)) -- keys are apart
        for _ = 1, 3 do assert.is_truthy(s:hit("w", 3, 1)) end
        luasmtp.sleep(1.1) -- the window has moved past every event
        luasmtp.update_now()
        assert.is_true(s:hit("w", 3, 1))
        if s.close then s:close() end
      end)
    end)

    it("keeps slots, rates and values apart", function()
      H.run(function()
        local s = make(rs)
        assert.is_true(s:set("x", "value"))
        assert.truthy(s:acquire("x", 1))
        assert.is_true(s:hit("x", 1, 10))
        assert.equal("value", s:get("x"))
        if s.close then s:close() end
      end)
    end)
  end)
end

store_suite("memory", function() return kv.memory() end)
store_suite("redis", function(rs) return assert(kv.redis { path = rs.path, timeout = 2 }) end)

describe("kv.redis", function()
  after_each(function()
    for pid in pairs(running) do
      H.kill(pid)
      H.wait_pid(pid, 10)
    end
    running = {}
    H.close_servers()
    collectgarbage("collect")
  end)

  it("shares slots between nodes; a dead node's leases expire, a live node's are refreshed", function()
    H.run(function()
      local rs = start_redis()
      local a = assert(kv.redis { path = rs.path, lease_ttl = 2 })
      local b = assert(kv.redis { path = rs.path, lease_ttl = 2 })
      assert.truthy(a:acquire("ip", 2))
      assert.truthy(b:acquire("ip", 2))
      assert.is_false(a:acquire("ip", 2))
      assert.is_false(b:acquire("ip", 2))
      for i = 1, 5 do assert.truthy(a:acquire("other" .. i, 1)) end -- several keys per refresh
      luasmtp.sleep(4.5) -- more than two lease lifetimes: refreshed meanwhile
      assert.is_false(b:acquire("ip", 2))
      for i = 1, 5 do assert.is_false(b:acquire("other" .. i, 1)) end
      a:close() -- node a dies without releasing
      local deadline = luasmtp.update_now() + 10
      local lease
      repeat
        luasmtp.sleep(0.1)
        lease = b:acquire("ip", 2)
      until lease or luasmtp.update_now() > deadline
      assert.truthy(lease) -- a's slot came free once its lease expired
      b:close()
      stop_redis(rs)
    end, 30)
    H.assert_no_leaks()
  end)

  it("counts rates of several nodes in one window", function()
    H.run(function()
      local rs = start_redis()
      local a = assert(kv.redis { path = rs.path })
      local b = assert(kv.redis { path = rs.path })
      local ok = 0
      for i = 1, 10 do
        if (i % 2 == 0 and a or b):hit("r", 6, 60) then ok = ok + 1 end
      end
      assert.equal(6, ok)
      a:close(); b:close()
      stop_redis(rs)
    end, 30)
  end)

  it("reports Redis down as nil, err", function()
    H.run(function()
      local s = assert(kv.redis { path = H.sockpath("redis-down.sock"), timeout = 0.5 })
      for _, call in ipairs {
        function() return s:get("a") end, function() return s:set("a", 1) end,
        function() return s:delete("a") end, function() return s:incr("a", 1, 5) end,
        function() return s:hit("a", 3, 10) end, function() return s:acquire("a", 3) end,
        function() return s:release("a", "x") end,
      } do
        local v, err = call()
        assert.is_nil(v)
        assert.is_string(err)
      end
      s:close()
    end, 30)
    H.assert_no_leaks()
  end)

  -- Two SMTP servers (two nodes) whose limits share one Redis.
  -- Returns the two ports and shutdown(), which closes both servers,
  -- waits for their sessions to end, then closes the stores.
  local function two_nodes(rs, limits, on_error)
    local ports, stores, servers = {}, {}, {}
    for i = 1, 2 do
      stores[i] = assert(kv.redis { path = rs.path, timeout = 1, on_error = on_error, lease_ttl = 30 })
      local opts = { store = stores[i] }
      for k, v in pairs(limits) do opts[k] = v end
      servers[i], ports[i] = H.smtp_server { plugins = { server.plugins.limits(opts) } }
    end
    local function shutdown()
      for _, srv in ipairs(servers) do srv:close() end
      local deadline = luasmtp.update_now() + 5
      for _, srv in ipairs(servers) do
        while srv:connections() > 0 and luasmtp.update_now() < deadline do luasmtp.sleep(0.02) end
      end
      for _, st in ipairs(stores) do st:close() end
    end
    return ports, shutdown
  end

  it("holds max_connections_per_ip exactly across two servers", function()
    H.run(function()
      local rs = start_redis()
      local ports, shutdown = two_nodes(rs, { max_connections_per_ip = 3 })
      local held = {}
      for i, port in ipairs { ports[1], ports[2], ports[1] } do
        held[i] = H.smtp(port)
        assert.equal("220", (held[i].reply()))
      end
      for _, port in ipairs(ports) do -- the fourth is refused on either node
        local c = H.smtp(port)
        local code, text = c.reply()
        assert.equal("421", code)
        assert.matches("Too many connections from your address", text, 1, true)
        c.close()
      end
      held[2].cmd("QUIT") -- a slot of node 2 comes free: node 1 takes it
      held[2].close()
      local deadline = luasmtp.update_now() + 5
      local code, c
      repeat
        luasmtp.sleep(0.05)
        c = H.smtp(ports[1])
        code = c.reply()
        if code ~= "220" then c.close() end
      until code == "220" or luasmtp.update_now() > deadline
      assert.equal("220", code)
      c.cmd("QUIT"); c.close()
      held[1].cmd("QUIT"); held[1].close()
      held[3].cmd("QUIT"); held[3].close()
      shutdown()
      stop_redis(rs)
    end, 60)
  end)

  it("holds connection_rate_per_ip exactly across two servers", function()
    H.run(function()
      local rs = start_redis()
      local ports, shutdown = two_nodes(rs, { connection_rate_per_ip = 5, max_connections_per_ip = 100 })
      local codes = {}
      for i = 1, 8 do
        local c = H.smtp(ports[i % 2 + 1])
        codes[i] = c.reply()
        c.close()
      end
      assert.same({ "220", "220", "220", "220", "220", "421", "421", "421" }, codes)
      shutdown()
      stop_redis(rs)
    end, 60)
  end)

  -- A real SMTP client (Python's smtplib) against a node whose Redis is
  -- down: returns the code of the server's greeting (or the error).
  local function smtplib_greeting(port)
    local dir = H.tmpdir("smtplib")
    local script = dir .. "/greet.py"
    H.writefile(script, ([[
import smtplib, sys
try:
    s = smtplib.SMTP("127.0.0.1", %d, timeout=10)
    code, _ = s.noop()
    print("connected", code)
    s.quit()
except smtplib.SMTPConnectError as e:
    print("refused", e.smtp_code, e.smtp_error.decode())
except smtplib.SMTPServerDisconnected as e:
    print("disconnected", e)
]]):format(port))
    local pid = H.start(H.python3 .. " " .. H.shquote(script), dir .. "/out")
    assert.is_true(H.wait_pid(pid, 20))
    return H.readfile(dir .. "/out")
  end

  it("fails open with Redis down: the client is let in (smtplib)", function()
    H.need("python3 smtplib TLS")
    H.run(function()
      local rs = start_redis()
      local ports, shutdown = two_nodes(rs, { max_connections_per_ip = 1, connection_rate_per_ip = 10 }, "open")
      stop_redis(rs)
      local out = smtplib_greeting(ports[1])
      assert.matches("connected 250", out, 1, true)
      shutdown()
    end, 60)
  end)

  it("fails closed with Redis down: 421 (smtplib)", function()
    H.need("python3 smtplib TLS")
    H.run(function()
      local rs = start_redis()
      local ports, shutdown = two_nodes(rs, { max_connections_per_ip = 1 }, "closed")
      stop_redis(rs)
      local out = smtplib_greeting(ports[2])
      assert.matches("refused 421", out, 1, true)
      assert.matches("Service busy", out, 1, true)
      shutdown()
    end, 60)
  end)
end)
