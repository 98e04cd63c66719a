-- The queue's durable enqueue: fsyncs in worker threads, the shared
-- directory fsync, spooled bodies linked into the queue.
local luasmtp = require "luasmtp"
local core = require "luasmtp.core"
local client = require "luasmtp.client"
local server = require "luasmtp.server"
local queue = require "luasmtp.queue"
local H = require "spec.helper"

local names = require("spec.queue_helper").names

describe("core.fsync_paths", function()
  it("fsyncs files and directories, from tasks at once and from the main chunk", function()
    local dir = H.tmpdir("queue-commit-fsync")
    H.writefile(dir .. "/a", "a")
    H.writefile(dir .. "/b", "b")
    assert.is_true(core.fsync_paths({ dir .. "/a", dir .. "/b", dir }))
    local done = 0
    H.run(function()
      local tasks = {}
      for i = 1, 20 do
        tasks[i] = luasmtp.spawn(function()
          for _ = 1, 5 do
            assert(core.fsync_paths({ dir .. "/a", dir }))
            done = done + 1
          end
        end)
      end
      for _, t in ipairs(tasks) do assert(t:join(60)) end
    end, 90)
    assert.equal(100, done)
  end)

  it("runs its worker threads as batch threads (SCHED_BATCH), the loop's thread as it was", function()
    -- the scheduling policy of a thread: field 41 of its stat line
    local function policy(path)
      local f = io.open(path)
      if not f then return nil end -- a thread that ended meanwhile
      local line = f:read("l")
      f:close()
      local fields = {}
      for v in line:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = v end
      return tonumber(fields[39]) -- fields from 3 on follow the name
    end
    local pid = core.getpid()
    local main = "/proc/" .. pid .. "/task/" .. pid .. "/stat"
    local before = policy(main)
    local dir = H.tmpdir("queue-commit-fsync-policy")
    H.writefile(dir .. "/a", "a")
    assert.is_true(core.fsync_paths({ dir .. "/a" }))
    assert.equal(before, policy(main))
    local batch = 0
    for _, tid in ipairs(assert(core.listdir("/proc/" .. pid .. "/task"))) do
      if tonumber(tid) ~= pid and policy("/proc/" .. pid .. "/task/" .. tid .. "/stat") == 3 then
        batch = batch + 1
      end
    end
    assert.is_true(batch >= 1, "no fsync worker runs as SCHED_BATCH")
  end)

  it("names the path that failed", function()
    local dir = H.tmpdir("queue-commit-fsync-missing")
    H.writefile(dir .. "/a", "a")
    local ok, token, detail, kind = core.fsync_paths({ dir .. "/a", dir .. "/missing" })
    assert.is_nil(ok)
    assert.equal("io", token)
    assert.matches("missing: No such file", detail, 1, true)
    assert.equal("other", kind)
    assert.has_error(function() core.fsync_paths({}) end)
    assert.has_error(function() core.fsync_paths({ 1 }) end)
  end)
end)

describe("core.write_record", function()
  it("writes at an offset by path and through an open record file, which outlives a rename", function()
    local dir = H.tmpdir("queue-commit-record")
    H.writefile(dir .. "/seg", string.rep("\0", 16))
    assert.is_true(core.write_record(dir .. "/seg", 0, "ab", "cd"))
    local f = assert(core.open_record_file(dir .. "/seg"))
    assert.is_true(core.write_record(f, 4, "ef"))
    assert(os.rename(dir .. "/seg", dir .. "/seg2"))
    assert.is_true(core.write_record(f, 6, "gh", "", "ij"))
    assert.equal("abcdefghij" .. string.rep("\0", 6), H.readfile(dir .. "/seg2"))
    f:close()
    f:close() -- twice is fine
    assert.has_error(function() core.write_record(f, 0, "x") end,
      "bad argument #1 to 'write_record' (record file is closed)")
    local ok, token, detail = core.open_record_file(dir .. "/missing")
    assert.is_nil(ok)
    assert.equal("io", token)
    assert.matches("missing: No such file", detail, 1, true)
    -- the path form names the file it could not open
    ok, token, detail = core.write_record(dir .. "/missing", 0, "x")
    assert.is_nil(ok)
    assert.equal("io", token)
    assert.matches("missing", detail, 1, true)
  end)
end)

describe("queue enqueue", function()
  it("entries enqueued at once share the directory fsync and are each whole", function()
    local dir = H.tmpdir("queue-commit-group")
    local q = assert(queue.open { dir = dir, log = function() end })
    local ids = {}
    H.run(function()
      local tasks = {}
      for i = 1, 40 do
        tasks[i] = luasmtp.spawn(function()
          ids[i] = assert(q:enqueue { from = "a@test", rcpt = { "b@test" },
            body = ("Message-ID: <g%d@test>\r\n\r\nbody %d\r\n"):format(i, i) })
        end)
      end
      for _, t in ipairs(tasks) do assert(t:join(60)) end
    end, 90)
    assert.same({}, names(dir .. "/tmp"))
    q:close()
    -- a second owner sees every entry, whole
    local again = assert(queue.open { dir = dir, log = function() end })
    assert.equal(40, again:pending())
    for i, id in ipairs(ids) do
      assert.equal(("Message-ID: <g%d@test>\r\n\r\nbody %d\r\n"):format(i, i),
        queue.store.read_body(again.entries[id]))
    end
  end)

  it("removes an envelope whose body is missing at open (never acknowledged)", function()
    local dir = H.tmpdir("queue-commit-nobody")
    local q = assert(queue.open { dir = dir, log = function() end })
    local id = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = "Subject: x\r\n\r\nx\r\n" })
    local kept = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = "Subject: y\r\n\r\ny\r\n" })
    -- both wait in files of their own, as after a deferred attempt
    assert(q:migrate(q.entries[id]))
    assert(q:migrate(q.entries[kept]))
    local both = { id .. ".body", id .. ".env", kept .. ".body", kept .. ".env" }
    table.sort(both)
    assert.same(both, names(dir .. "/queue"))
    os.remove(dir .. "/queue/" .. id .. ".body") -- the envelope's rename reached the disk, the body's not
    q:close()
    local again = assert(queue.open { dir = dir, log = function() end })
    assert.equal(1, again:pending())
    assert.same({ kept .. ".body", kept .. ".env" }, names(dir .. "/queue"))
    -- their segment holds no entry any more: gone
    assert.same({}, names(dir .. "/segments"))
  end)
end)

describe("queue with a spooled body", function()
  it("links the server's spool file into the queue; it survives kill -9 and is delivered once", function()
    H.run(function()
      local dir = H.tmpdir("queue-commit-spool")
      local port = H.free_port()
      local pid = H.start("lua5.4 " .. H.shquote(H.root .. "/spec/queue_server_child.lua") .. " "
        .. H.shquote(dir) .. " " .. port .. " 60", H.tmp .. "/queue-server-child.log")
      H.wait_port(port, "127.0.0.1", 15)
      local lines = {}
      for i = 1, 4000 do lines[i] = ("line %05d of a body that is spooled\r\n"):format(i) end
      local data = "Message-ID: <spooled@test>\r\nSubject: big\r\n\r\n" .. table.concat(lines)
      local res, token, err = client.send { host = "127.0.0.1", port = port, tls = "none", helo = "c.test",
        from = "a@test", to = { "b@test" }, body = data }
      assert(res, tostring(token) .. " " .. tostring(err))
      local id = assert(client.format_reply(res.recipients[1].reply):match("queued as (%w+)"))
      -- acknowledged: the body is in queue/, nothing is left in tmp/
      assert.equal(data, H.readfile(dir .. "/queue/" .. id .. ".body"))
      assert.same({}, names(dir .. "/tmp"))
      os.execute("kill -9 " .. math.tointeger(pid) .. " 2>/dev/null")
      assert(H.wait_pid(pid, 30))

      local got = {}
      local srv = assert(server.new { listen = { "127.0.0.1:0" }, hostname = "sink.test", log_level = "error",
        received_header = false,
        hooks = { on_data = function(_, m) got[#got + 1] = m:read() end } })
      local rport = srv:addresses()[1].port
      local log = H.tmp .. "/queue-commit-child.log"
      local cpid = H.start("lua5.4 " .. H.shquote(H.root .. "/spec/queue_child.lua") .. " " .. H.shquote(dir)
        .. " " .. rport .. " 0", log)
      assert(H.wait_pid(cpid, 30), "the queue process did not exit")
      assert.matches("empty", H.readfile(log))
      srv:close()
      assert.equal(1, #got)
      assert.equal(data, got[1])
      assert.same({}, names(dir .. "/queue"))
    end, 90)
  end)
end)
