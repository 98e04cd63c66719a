-- `luasmtp serve --workers N`: the supervisor, its workers, the counter
-- service. Each test starts a real supervisor process (bounded by
-- timeout(1)), talks SMTP to it and stops it by its pid.
local H = require "spec.helper"
local luasmtp = require "luasmtp"

-- A script for the workers: one server on the inherited listener, its
-- greeting names the worker's pid ("w1234"), so each reply says which
-- worker gave it. `extra` goes into server.new's options.
local function script(extra, prelude)
  return ([[
local server = require "luasmtp.server"
local workers = require "luasmtp.workers"
local me = assert(workers.worker(), "not a worker")
%s
assert(server.new {
  listen = arg[1], hostname = "w" .. me.pid, log_level = "warning",
  received_header = false,
  %s
})
]]):format(prelude or "", extra or "")
end

local running = {} -- supervisors started by the current test

-- The log so far ("" before the shell has made the file).
local function read_log(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local data = f:read("a")
  f:close()
  return data
end

-- Start `luasmtp serve ARGS script` and wait for `ready` workers.
-- -> sv = { pid =, port =, log =, dir = }
-- tree: run the program, modules and script from this copy (tree.root,
-- tree.env) instead of the checkout.
local function start(name, args, source, script_args, ready, tree)
  local dir = H.tmpdir("workers-" .. name)
  local path = (tree and tree.root or dir) .. "/script.lua"
  H.writefile(path, source)
  local log = dir .. "/serve.log"
  if type(script_args) == "function" then script_args = script_args(dir) end
  local tpid = H.start(("exec %s timeout -k 5 120 lua5.4 %s/bin/luasmtp serve %s %s %s"):format(
    tree and tree.env or "", tree and tree.root or H.root, args, path, script_args or "127.0.0.1:0"), log)
  local sv = { tpid = tpid, log = log, dir = dir }
  running[#running + 1] = sv
  local deadline = luasmtp.update_now() + 20
  while luasmtp.update_now() < deadline do
    local text = read_log(log)
    sv.pid = sv.pid or math.tointeger(tonumber(text:match("supervisor pid (%d+)")))
    sv.port = sv.port or math.tointeger(tonumber(text:match("listening on 127%.0%.0%.1:(%d+)")))
    local _, n = text:gsub("%): ready", "")
    if sv.pid and n >= (ready or 0) then return sv end
    luasmtp.sleep(0.05)
  end
  error(name .. ": the supervisor did not start:\n" .. read_log(log))
end

local function text_of(sv) return read_log(sv.log) end

-- Wait until the log matches pattern (count times); -> the log
local function wait_log(sv, pattern, count, timeout)
  local deadline = luasmtp.update_now() + (timeout or 20)
  while luasmtp.update_now() < deadline do
    local text = text_of(sv)
    local _, n = text:gsub(pattern, "")
    if n >= (count or 1) then return text end
    luasmtp.sleep(0.05)
  end
  error(("log never matched %q %d times:\n%s"):format(pattern, count or 1, text_of(sv)))
end

-- pid -> generation of every worker started so far
local function workers_of(sv)
  local out = {}
  for slot, pid, gen in text_of(sv):gmatch("worker (%d+) %(pid (%d+), generation (%d+)%): started") do
    out[#out + 1] = { slot = tonumber(slot), pid = tonumber(pid), generation = tonumber(gen) }
  end
  return out
end

local function alive(pid)
  return os.execute("kill -0 " .. math.tointeger(pid) .. " 2>/dev/null") == true
end

-- Stop a supervisor: SIGTERM, wait; whatever is left gets SIGKILL.
local function stop(sv)
  -- (timeout(1) passes a SIGTERM on to the supervisor)
  os.execute("kill -TERM " .. ((sv.pid and alive(sv.pid)) and sv.pid or sv.tpid) .. " 2>/dev/null")
  local ended = H.wait_pid(sv.tpid, 40)
  for _, w in ipairs(workers_of(sv)) do
    if alive(w.pid) then os.execute("kill -KILL " .. w.pid .. " 2>/dev/null") end
  end
  return ended
end

-- Connect and read the greeting: -> client, code, text
local function greet(port)
  local c = H.smtp(port, 10)
  local code, text = c.reply()
  return c, code, text
end

local function pid_in(text)
  return tonumber(text and text:match("w(%d+)"))
end

describe("serve --workers", function()
  after_each(function()
    -- also when a test failed: nothing it started stays behind
    for _, sv in ipairs(running) do stop(sv) end
    running = {}
  end)

  it("runs 2 workers that both serve connections (smtplib), and exits on SIGTERM", function()
    H.need("python3")
    H.run(function()
      local sv = start("two", "--workers 2 --listen 127.0.0.1:0", script(), nil, 2)
      local ws = workers_of(sv)
      assert.equal(2, #ws)
      -- python3 smtplib: up to 400 messages, 8 connections at a time,
      -- until both workers have answered
      local client = sv.dir .. "/client.py"
      H.writefile(client, [[
import smtplib, sys, concurrent.futures
port = int(sys.argv[1])
def one(i):
    s = smtplib.SMTP("127.0.0.1", port, timeout=20)
    code, resp = s.ehlo("client.test")
    s.sendmail("a@client.test", ["b@example.test"], "Subject: %d\r\n\r\nhello\r\n" % i)
    s.quit()
    return resp.decode().split("\n")[0].split()[0]
seen = {}
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for batch in range(50):
        for name in pool.map(one, range(batch * 8, batch * 8 + 8)):
            seen[name] = seen.get(name, 0) + 1
        if len(seen) >= 2:
            break
for name, n in sorted(seen.items()):
    print(name, n)
]])
      local out = sv.dir .. "/client.out"
      local cpid = H.start(("timeout 60 %s %s %d"):format(H.python3, client, sv.port), out)
      assert.is_true(H.wait_pid(cpid, 70))
      local counts = {}
      for name, n in H.readfile(out):gmatch("(w%d+) (%d+)") do counts[tonumber(name:sub(2))] = tonumber(n) end
      for _, w in ipairs(ws) do
        assert(counts[w.pid] and counts[w.pid] > 0, "worker " .. w.pid .. " served nothing: " .. H.readfile(out))
      end
      -- SIGTERM: every worker drains, the supervisor exits
      os.execute("kill -TERM " .. sv.pid)
      assert.is_true(H.wait_pid(sv.tpid, 40), "the supervisor did not exit")
      local log = text_of(sv)
      assert.matches("SIGTERM: stopping: every worker drains", log)
      assert.matches("all workers ended; exit status 0", log)
      for _, w in ipairs(ws) do assert.is_false(alive(w.pid)) end
    end, 120)
  end)

  it("on SIGTERM drains the sessions of every worker: idle ones get 421 4.3.2, a busy one finishes", function()
    H.run(function()
      -- idle sessions until both workers hold one: one worker may take
      -- many first, more than the default per-address limit
      local sv = start("drain", "--workers 2 --drain 20 --listen 127.0.0.1:0",
        script("limits = { max_connections_per_ip = 1000 },"), nil, 2)
      local idle, by_pid = {}, {}
      for _ = 1, 200 do
        local c, code, text = greet(sv.port)
        assert.equal("220", code)
        idle[#idle + 1] = c
        by_pid[pid_in(text)] = true
        local n = 0
        for _ in pairs(by_pid) do n = n + 1 end
        if n == 2 then break end
      end
      -- one busy in DATA
      local busy, code = greet(sv.port)
      assert.equal("220", code)
      assert.equal("250", (busy.cmd("HELO client.test")))
      assert.equal("250", (busy.cmd("MAIL FROM:<a@client.test>")))
      assert.equal("250", (busy.cmd("RCPT TO:<b@example.test>")))
      assert.equal("354", (busy.cmd("DATA")))
      busy.sock:send("Subject: half\r\n\r\nfirst half\r\n")
      os.execute("kill -TERM " .. sv.pid)
      for _, c in ipairs(idle) do
        local rc, rtext = c.reply()
        assert.equal("421", rc)
        assert.matches("4%.3%.2", rtext)
        c.close()
      end
      busy.sock:send("second half\r\n.\r\n")
      assert.equal("250", (busy.reply()))
      busy.close()
      assert.is_true(H.wait_pid(sv.tpid, 40), "the supervisor did not exit")
      assert.matches("all workers ended", text_of(sv))
    end, 90)
  end)

  it("kills a worker still running past the drain deadline, and exits with status 1", function()
    H.run(function()
      -- HELO blocks the worker in open(2) of a FIFO nobody writes: it
      -- cannot act on its SIGTERM (a busy Lua loop would be ended by the
      -- plugin deadline)
      local sv = start("straggler", "--workers 1 --drain 1 --listen 127.0.0.1:0",
        script("hooks = { on_helo = function() io.open(arg[2]) end },"), function(dir)
          assert(os.execute("mkfifo " .. H.shquote(dir .. "/fifo")))
          return "127.0.0.1:0 " .. dir .. "/fifo"
        end, 1)
      local c, code = greet(sv.port)
      assert.equal("220", code)
      c.sock:send("HELO client.test\r\n")
      luasmtp.sleep(0.5)
      os.execute("kill -TERM " .. sv.pid)
      wait_log(sv, "still running 6 s after SIGTERM: SIGKILL", 1, 30)
      c.close()
      assert.is_true(H.wait_pid(sv.tpid, 20))
      local log = text_of(sv)
      assert.matches("ended %(signal KILL%)", log)
      assert.matches("all workers ended; exit status 1", log)
    end, 60)
  end)

  it("restarts a worker that is killed", function()
    H.run(function()
      local sv = start("restart", "--workers 2 --listen 127.0.0.1:0", script(), nil, 2)
      local victim = workers_of(sv)[1]
      os.execute("kill -KILL " .. victim.pid)
      local log = wait_log(sv, "worker 1 %(pid %d+, generation 1%): started", 2)
      assert.matches("worker 1 %(pid " .. victim.pid .. ", generation 1%): signal KILL after [%d.]+ s; "
        .. "restarting in 0 s", log)
      wait_log(sv, "%): ready", 3)
      local ws = workers_of(sv)
      assert.equal(3, #ws)
      assert.not_equal(victim.pid, ws[3].pid)
      assert.is_true(alive(ws[3].pid))
      -- the new worker serves: connect until it answers
      local served
      for _ = 1, 300 do
        local c, code, text = greet(sv.port)
        assert.equal("220", code)
        c.close()
        if pid_in(text) == ws[3].pid then served = true break end
      end
      assert.is_true(served, "the restarted worker never answered")
      -- SIGUSR1: the status, one line per worker
      os.execute("kill -USR1 " .. sv.pid)
      log = wait_log(sv, "worker 2 pid %d+ generation 1 ready")
      assert.matches("status: pid " .. sv.pid .. ", generation 1, 2 workers %(2 wanted%)", log)
      assert.matches("worker 1 pid " .. ws[3].pid .. " generation 1 ready up [%d.]+ s, %d+ slots held, restarts 1", log)
      assert.matches("worker 2 pid " .. ws[2].pid .. " generation 1 ready", log)
      assert.is_true(stop(sv))
    end, 90)
  end)

  it("lets each worker bind an address not given to --listen, with SO_REUSEPORT", function()
    H.run(function()
      local port = H.free_port()
      local sv = start("reuseport", "--workers 2", script(), "127.0.0.1:" .. port, 2)
      local ws = workers_of(sv)
      local seen, n = {}, 0
      for _ = 1, 300 do
        local c, code, text = greet(port)
        assert.equal("220", code)
        c.close()
        local pid = pid_in(text)
        if not seen[pid] then n = n + 1 end
        seen[pid] = true
        if n == 2 then break end
      end
      assert.equal(2, n)
      assert.is_true(seen[ws[1].pid] and seen[ws[2].pid])
      assert.is_true(stop(sv))
    end, 60)
  end)

  it("with --reuseport binds one socket per worker in the supervisor; a reload keeps them", function()
    H.run(function()
      local sv = start("reuseport-sv", "--workers 2 --reuseport --listen 127.0.0.1:0", script(), nil, 2)
      assert.matches("SO_REUSEPORT: one socket per worker", text_of(sv))
      local function both_serve()
        local seen, n = {}, 0
        for _ = 1, 300 do
          local c, code, text = greet(sv.port)
          assert.equal("220", code)
          c.close()
          local pid = pid_in(text)
          if not seen[pid] then n, seen[pid] = n + 1, true end
          if n == 2 then break end
        end
        return seen, n
      end
      local seen, n = both_serve()
      assert.equal(2, n)
      for _, w in ipairs(workers_of(sv)) do assert.is_true(seen[w.pid]) end
      os.execute("kill -HUP " .. sv.pid)
      wait_log(sv, "generation 1%): ended", 2)
      seen, n = both_serve()
      assert.equal(2, n)
      for _, w in ipairs(workers_of(sv)) do
        if w.generation == 2 then assert.is_true(seen[w.pid]) end
      end
      assert.is_true(stop(sv))
    end, 60)
  end)

  it("throttles a crash loop with backoff and gives up after 5 quick deaths in a row", function()
    H.run(function()
      local sv = start("crash", "--workers 1 --listen 127.0.0.1:0", "error('this script always fails')\n")
      assert.is_true(H.wait_pid(sv.tpid, 60), "the supervisor did not give up")
      local log = text_of(sv)
      assert.matches("this script always fails", log)
      assert.matches("exit status 70 after [%d.]+ s; restarting in 0 s", log)
      assert.matches("restarting in 0%.5 s", log)
      assert.matches("restarting in 1 s", log)
      assert.matches("restarting in 2 s", log)
      assert.matches("restarting in 4 s", log)
      assert.matches("6 quick deaths in a row: giving up", log)
      assert.matches("all workers ended; exit status 1", log)
      local _, starts = log:gsub("%): started", "")
      assert.equal(6, starts)
    end, 90)
  end)

  it("on SIGHUP starts a new generation with the script loaded afresh; an old session finishes", function()
    H.run(function()
      local prelude = [[
local f = assert(io.open(arg[2]))
local version = f:read("l")
f:close()
]]
      local src = script(nil, prelude):gsub('hostname = "w" %.%. me%.pid', 'hostname = "w" .. me.pid .. "." .. version')
      local vfile
      local sv = start("reload", "--workers 2 --drain 60 --listen 127.0.0.1:0", src, function(dir)
        vfile = dir .. "/version"
        H.writefile(vfile, "v1\n")
        return "127.0.0.1:0 " .. vfile
      end, 2)
      local old = {}
      for _, w in ipairs(workers_of(sv)) do old[w.pid] = true end
      -- a session on generation 1, busy in DATA
      local busy, code, text = greet(sv.port)
      assert.equal("220", code)
      assert.matches("%.v1 ", text)
      assert.is_true(old[pid_in(text)])
      assert.equal("250", (busy.cmd("HELO client.test")))
      assert.equal("250", (busy.cmd("MAIL FROM:<a@client.test>")))
      assert.equal("250", (busy.cmd("RCPT TO:<b@example.test>")))
      assert.equal("354", (busy.cmd("DATA")))
      busy.sock:send("Subject: across a reload\r\n\r\nbody\r\n")
      H.writefile(vfile, "v2\n")
      os.execute("kill -HUP " .. sv.pid)
      wait_log(sv, "generation 2 ready; generation 1 drains")
      -- once an old worker says it drains it has closed its listener:
      -- before, it may still take a connection (and answer it 421 4.3.2)
      -- (generous: on a loaded machine the old workers may be slow to run)
      for pid in pairs(old) do wait_log(sv, "worker %d %(pid " .. pid .. "%): SIGTERM: stopping", 1, 60) end
      -- new connections reach generation 2, which loaded the new script
      for _ = 1, 10 do
        local c, ncode, ntext = greet(sv.port)
        assert.equal("220", ncode)
        assert.matches("%.v2 ", ntext)
        assert.is_nil(old[pid_in(ntext)])
        c.close()
      end
      -- the old session finishes its message
      busy.sock:send(".\r\n")
      assert.equal("250", (busy.reply()))
      local qcode = busy.cmd("NOOP")
      assert.is_truthy(qcode == "421" or qcode == nil)
      busy.close()
      local log = wait_log(sv, "generation 1%): ended", 2)
      assert.matches("SIGHUP: starting generation 2", log)
      local gen2 = 0
      for _, w in ipairs(workers_of(sv)) do
        if w.generation == 2 then
          gen2 = gen2 + 1
          assert.is_true(alive(w.pid))
        else
          assert.is_false(alive(w.pid))
        end
      end
      assert.equal(2, gen2)
      assert.is_true(stop(sv))
    end, 120)
  end)

  -- Connect with attempt() -> code, text (it closes the connection)
  -- until refusals (421, matching pattern) came from both workers; any
  -- connection let in fails the test. So the count is exact across the
  -- workers wherever the connections land.
  local function refused_by_both(attempt, pattern)
    local by, n = {}, 0
    for _ = 1, 200 do
      local code, text = attempt()
      assert.equal("421", code, "a connection past the limit was let in: " .. tostring(text))
      assert.matches(pattern, text)
      local pid = pid_in(text)
      if not by[pid] then n, by[pid] = n + 1, true end
      if n == 2 then break end
    end
    assert.equal(2, n, "refusals came from one worker only")
  end

  local function greet_and_close(port)
    return function()
      local c, code, text = greet(port)
      c.close()
      return code, text
    end
  end

  -- Hold `limit` connections, then check the next ones are refused.
  local function exact_limit(port, limit, refusal)
    local held = {}
    for _ = 1, limit do
      local c, code, text = greet(port)
      assert.equal("220", code, text)
      held[#held + 1] = c
    end
    refused_by_both(greet_and_close(port), refusal)
    return held
  end

  it("keeps max_connections_per_ip and max_connections exact across 2 workers", function()
    H.run(function()
      -- two servers: per-address limit 4 on the first, global limit 3 on the second
      local src = [[
local server = require "luasmtp.server"
local me = require("luasmtp.workers").worker()
assert(server.new { listen = arg[1], hostname = "w" .. me.pid, log_level = "warning",
  limits = { max_connections_per_ip = 4 } })
assert(server.new { listen = arg[2], hostname = "w" .. me.pid, log_level = "warning",
  limits = { max_connections = 3, max_connections_per_ip = 100 } })
]]
      local sv = start("limits", "--workers 2 --listen 127.0.0.1:0 --listen 127.0.1.1:0", src,
        "127.0.0.1:0 127.0.1.1:0", 2)
      local port2 = tonumber(text_of(sv):match("listening on 127%.0%.1%.1:(%d+)"))
      local held = exact_limit(sv.port, 4, "Too many connections from your address")
      -- a slot given back is free for the next connection, wherever
      held[1].close()
      local deadline = luasmtp.update_now() + 10
      local code
      repeat
        local c
        c, code = greet(sv.port)
        c.close()
        if code ~= "220" then luasmtp.sleep(0.05) end
      until code == "220" or luasmtp.update_now() > deadline
      assert.equal("220", code)
      for i = 2, #held do held[i].close() end
      -- the global limit of the second server
      local c2 = {}
      local function greet2()
        local c = assert(luasmtp.connect("127.0.1.1", port2, { timeout = 5 }))
        c:settimeout(10)
        local line = c:receiveline()
        return c, line
      end
      for _ = 1, 3 do
        local c, line = greet2()
        assert.matches("^220 ", line)
        c2[#c2 + 1] = c
      end
      refused_by_both(function()
        local c, line = greet2()
        c:close()
        return line:sub(1, 3), line
      end, "^421 4%.7%.0 w%d+ Too many connections, try later")
      for _, c in ipairs(c2) do c:close() end
      assert.is_true(stop(sv))
    end, 120)
  end)

  it("releases the slots of a worker that dies", function()
    H.run(function()
      local sv = start("release", "--workers 1 --listen 127.0.0.1:0",
        script("limits = { max_connections = 2, max_connections_per_ip = 2 },"), nil, 1)
      local a = greet(sv.port)
      local b = greet(sv.port)
      local c, code, text = greet(sv.port)
      assert.equal("421", code, text)
      c.close()
      os.execute("kill -KILL " .. workers_of(sv)[1].pid)
      a.close()
      b.close()
      wait_log(sv, "%): ready", 2)
      -- both slots are free again: the supervisor gave them back
      local held = {}
      for i = 1, 2 do
        local hc, hcode, htext = greet(sv.port)
        assert.equal("220", hcode, "connection " .. i .. ": " .. tostring(htext))
        held[i] = hc
      end
      c, code = greet(sv.port)
      assert.equal("421", code)
      c.close()
      for _, hc in ipairs(held) do hc.close() end
      assert.is_true(stop(sv))
    end, 60)
  end)

  it("its workers end when the supervisor is killed", function()
    H.run(function()
      local sv = start("orphans", "--workers 2 --listen 127.0.0.1:0", script(), nil, 2)
      local ws = workers_of(sv)
      os.execute("kill -KILL " .. sv.pid)
      for _, w in ipairs(ws) do
        assert.is_true(H.wait_pid(w.pid, 30), "worker " .. w.pid .. " outlived the supervisor")
      end
      assert.is_true(H.wait_pid(sv.tpid, 10))
    end, 60)
  end)

  it("keeps connection_rate_per_ip exact across 2 workers", function()
    H.run(function()
      local sv = start("rate", "--workers 2 --listen 127.0.0.1:0",
        script("limits = { connection_rate_per_ip = 6 },"), nil, 2)
      for _ = 1, 6 do
        local c, code, text = greet(sv.port)
        assert.equal("220", code, text)
        c.close()
      end
      refused_by_both(greet_and_close(sv.port), "Too many connections, slow down")
      assert.is_true(stop(sv))
    end, 90)
  end)

  it("refuses an oversized frame on the channel, stops that worker and starts another", function()
    H.run(function()
      local prelude = [[
-- once: the first worker writes a frame length past the limit
local mark = arg[2]
if not io.open(mark) then
  io.open(mark, "w"):close()
  me.channel:send(string.pack(">I4", 1000000) .. ("x"):rep(64))
end
]]
      local sv = start("frame", "--workers 1 --listen 127.0.0.1:0", script(nil, prelude),
        function(dir) return "127.0.0.1:0 " .. dir .. "/mark" end, 0)
      local log = wait_log(sv, "frame of 1000000 bytes refused %(at most 16384%); closing its channel and stopping it")
      assert.matches("worker 1 %(pid %d+, generation 1%): started", log)
      wait_log(sv, "worker 1 %(pid %d+, generation 1%): started", 2)
      wait_log(sv, "%): ready", 1)
      local c, code = greet(sv.port)
      assert.equal("220", code)
      c.close()
      assert.is_true(stop(sv))
    end, 60)
  end)

  it("as root binds a port below 1024 and then runs as nobody/nogroup", function()
    local _, uid = require("luasmtp.core").proc_ids()
    if uid ~= 0 then
      pending("needs root")
      return
    end
    H.run(function()
      -- a free port below 1024
      local port
      for p = 1023, 600, -1 do
        local l = luasmtp.listen("127.0.0.1:" .. p)
        if l then
          l[1]:close()
          port = p
          break
        end
      end
      assert(port, "no free port below 1024")
      -- a checkout under /root is not readable by nobody: the workers run
      -- the program, its modules and the script from a copy anyone can read
      local tree = { root = io.popen("mktemp -d /tmp/luasmtp-workers-root.XXXXXX"):read("l") }
      local so = assert(package.searchpath("luasmtp.core", package.cpath))
      local sodir = so:match("^(.*)/luasmtp/core%.so$")
      assert(os.execute(("mkdir -p %s/build && cp -r %s/bin %s/lua %s/ && cp -r %s/luasmtp %s/build/ "
        .. "&& chmod -R a+rX %s"):format(tree.root, H.root, H.root, tree.root, sodir, tree.root, tree.root)))
      tree.env = ("env LUA_PATH_5_4='%s/lua/?.lua;%s/lua/?/init.lua;;' LUA_CPATH_5_4='%s/build/?.so;;'")
        :format(tree.root, tree.root, tree.root)
      finally(function() os.execute("rm -rf " .. tree.root) end)
      -- a script the dropped user cannot read: refused at once, with why
      local hidden = io.popen("mktemp -d /tmp/luasmtp-workers-hidden.XXXXXX"):read("l") -- mode 0700
      finally(function() os.execute("rm -rf " .. hidden) end)
      H.writefile(hidden .. "/script.lua", script())
      local hlog = H.tmpdir("workers-root-hidden") .. "/serve.log"
      local hpid = H.start(("exec %s timeout -k 5 60 lua5.4 %s/bin/luasmtp serve --workers 2 --user nobody "
        .. "--group nogroup --listen 127.0.0.1:%d %s/script.lua 127.0.0.1:%d"):format(tree.env, tree.root, port,
        hidden, port), hlog)
      assert.is_true(H.wait_pid(hpid, 30), "the supervisor did not give up")
      assert.matches("uid 65534 gid %d+ cannot read " .. hidden:gsub("%p", "%%%0") .. "/script%.lua",
        H.readfile(hlog))
      assert.is_nil(H.readfile(hlog):find("started", 1, true)) -- no worker was tried
      local sv = start("root", ("--workers 2 --user nobody --group nogroup --listen 127.0.0.1:%d"):format(port),
        script(), "127.0.0.1:" .. port, 2, tree)
      assert.equal(port, sv.port)
      local log = text_of(sv)
      -- bound first, dropped after
      assert.is_true(log:find("listening on 127.0.0.1:" .. port, 1, true) < log:find("running as uid 65534 gid 65534",
        1, true))
      local nobody_gid = tonumber(io.popen("getent group nogroup"):read("l"):match("^[^:]*:[^:]*:(%d+)"))
      for _, w in ipairs(workers_of(sv)) do
        local st = H.readfile("/proc/" .. w.pid .. "/status")
        assert.matches("\nUid:\t65534\t65534\t65534\t65534\n", st)
        assert.matches("\nGid:\t" .. nobody_gid .. "\t" .. nobody_gid .. "\t" .. nobody_gid .. "\t" .. nobody_gid
          .. "\n", st)
        assert.matches("\nGroups:\t" .. nobody_gid .. " ?\n", st)
      end
      local sst = H.readfile("/proc/" .. sv.pid .. "/status")
      assert.matches("\nUid:\t65534\t65534\t65534\t65534\n", sst)
      local c, code = greet(port)
      assert.equal("220", code)
      c.close()
      assert.is_true(stop(sv))
    end, 60)
  end)
end)

describe("luasmtp.kv.supervisor frames", function()
  local proto = require "luasmtp.kv.supervisor"

  it("round-trips fields and keeps value types", function()
    local frame = assert(proto.encode(7, { "acquire", "conn:192.0.2.1", proto.pack_value(50) }))
    local len = string.unpack(">I4", frame)
    assert.equal(#frame - 4, len)
    local id, fields = proto.decode(frame:sub(5))
    assert.equal(7, id)
    assert.same({ "acquire", "conn:192.0.2.1", "n50" }, fields)
    assert.equal(50, proto.unpack_value(fields[3]))
    assert.equal(math.type(50), math.type(proto.unpack_value(fields[3])))
    assert.equal(0.25, proto.unpack_value(proto.pack_value(0.25)))
    assert.equal("50", proto.unpack_value(proto.pack_value("50")))
    assert.is_nil(proto.unpack_value("x50"))
  end)

  it("refuses frames past the caps and malformed payloads", function()
    local big = assert(proto.encode(1, { ("k"):rep(proto.MAX_FRAME - 20) }))
    assert.is_truthy(big)
    local ok, err = proto.encode(1, { ("k"):rep(proto.MAX_FRAME) })
    assert.is_nil(ok)
    assert.equal("limit", err)
    assert.is_nil((proto.encode(1, { "a", "b", "c", "d", "e", "f", "g", "h", "i" })))
    assert.is_nil((proto.decode("\0\0\0")))
    assert.is_nil((proto.decode(string.pack(">I4B", 1, 9))))
    assert.is_nil((proto.decode(string.pack(">I4B", 1, 1) .. string.pack(">I2", 10) .. "short")))
    assert.is_nil((proto.decode(string.pack(">I4B", 1, 1) .. string.pack(">s2", "x") .. "extra")))
  end)

  it("reads a frame from a socket and refuses an oversized length before reading it", function()
    H.run(function()
      local a, b = luasmtp.socketpair()
      a:send(assert(proto.encode(3, { "get", "k" })))
      local payload = assert(proto.read_frame(b, 5))
      assert.same({ "get", "k" }, select(2, proto.decode(payload)))
      a:send(string.pack(">I4", proto.MAX_FRAME + 1))
      local none, err, detail = proto.read_frame(b, 5)
      assert.is_nil(none)
      assert.equal("limit", err)
      assert.matches("refused", detail)
      a:close()
      b:close()
    end)
  end)

  it("a store whose channel is closed fails every call (the limits then follow on_error)", function()
    H.run(function()
      local a, b = luasmtp.socketpair()
      local store = proto.new(a, { timeout = 1, on_error = "closed" })
      b:close()
      local lease, err = store:acquire("k", 1)
      assert.is_nil(lease)
      assert.is_truthy(err == "closed" or err == "reset" or err == "timeout")
      assert.is_nil((store:get("k")))
      assert.equal("closed", store.on_error)
      store:close()
    end)
  end)
end)
