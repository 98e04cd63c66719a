-- The queue's segment store against its own files: torn tails and
-- records that do not check, bodies that look like records, end records
-- and the removal of full segments, entries that move into files (after
-- a 4xx, when held, a crash between the files and the end record), the
-- tool beside a running queue, and a kill -9 in the middle of an
-- enqueue. Deliveries go to the project's own server on loopback.
local luasmtp = require "luasmtp"
local core = require "luasmtp.core"
local server = require "luasmtp.server"
local store = require "luasmtp.queue.store"
local dkjson = require "dkjson"
local H = require "spec.helper"
local QH = require "spec.queue_helper"

local names = QH.names

-- The segment files of a queue directory (full paths, sorted; not a
-- spare, which holds no record yet).
local function segments(dir)
  local out = {}
  for _, name in ipairs(names(dir .. "/segments")) do
    if name:match("%.seg$") then out[#out + 1] = dir .. "/segments/" .. name end
  end
  return out
end

local function size_of(path)
  local f = assert(io.open(path, "rb"))
  local n = f:seek("end")
  f:close()
  return n
end

local function append(path, bytes)
  local f = assert(io.open(path, "ab"))
  assert(f:write(bytes))
  assert(f:close())
end

-- Flip one bit of the byte at offset (0-based).
local function flip(path, offset)
  local f = assert(io.open(path, "r+b"))
  f:seek("set", offset)
  local b = assert(f:read(1)):byte()
  f:seek("set", offset)
  assert(f:write(string.char(b ~ 0x01)))
  assert(f:close())
end

local open = QH.open

local function msg(tag, extra)
  return ("Message-ID: <%s@test>\r\nSubject: %s\r\n\r\nbody of %s\r\n%s"):format(tag, tag, tag, extra or "")
end

local until_true = QH.until_true

-- A receiving server that adds no Received header, so a message
-- arrives as queued (QH.receiver): -> port, got
local function receiver(hooks)
  local o = { received_header = false }
  for k, v in pairs(hooks or {}) do o[k] = v end
  local _, port, got = QH.receiver(o)
  return port, got
end

local smarthost = QH.smarthost

-- A receiver whose DATA waits (20 s at most) until gate.go is set:
-- -> port, got, gate (gate.entered counts the DATA commands that came)
local function gated_receiver()
  local gate = { go = false, entered = 0 }
  local port, got = receiver { data = function()
    gate.entered = gate.entered + 1
    local deadline = luasmtp.update_now() + 20
    while not gate.go and luasmtp.update_now() < deadline do luasmtp.sleep(0.05) end
  end }
  return port, got, gate
end

-- How many times each Message-ID arrived.
local ids_of = QH.ids_of

local tool = QH.tool

after_each(function() H.close_servers() end)

describe("queue segments on disk", function()
  -- A crash can tear the tail of a segment in many ways; each is cut off.
  local tails = {
    { "a header that promises more bytes than follow", "R 0000ABCDEF0123456789ABCDEF 180 4096 0badf00d\n"
      .. ("luasmtp-queue 1\n"):rep(3) },
    { "garbage bytes", "\0\255\254garbage\r\n\0\0\0" .. ("\xAA"):rep(100) },
    { "a header line cut in the middle", "R 0000ABCDEF0123 12" },
  }
  for _, tail in ipairs(tails) do
    it("cuts a torn tail (" .. tail[1] .. ") at open; new records go to a new segment", function()
      H.run(function()
        local dir = H.tmpdir("seg-torn")
        local q = open(dir)
        local bodies = {}
        for k = 1, 3 do
          local body = msg("torn" .. k, core.random(64)) -- bytes of every kind
          local id = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = body })
          bodies[id] = body
        end
        local segs = segments(dir)
        assert.equal(1, #segs)
        local path = segs[1]
        local good = size_of(path)
        q:close()
        append(path, tail[2])
        assert.equal(good + #tail[2], size_of(path))

        q = open(dir)
        assert.equal(3, q:pending())
        for id, body in pairs(bodies) do assert.equal(body, store.read_body(q.entries[id])) end
        local rd = store.read_segment(path)
        assert.equal(good, rd.size) -- the owner cut the tail
        assert.equal(rd.size, rd.valid)
        assert.equal(3, #rd.records)
        -- a record after reopen never follows a crash's tail: a new segment
        local body4 = msg("torn4")
        local id4 = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = body4 })
        bodies[id4] = body4
        assert.is_string(q.entries[id4].seg_path)
        assert.not_equal(path, q.entries[id4].seg_path)
        assert.equal(2, #segments(dir))
        assert.equal(good, size_of(path))
        q:close()

        q = open(dir)
        assert.equal(4, q:pending())
        for id, body in pairs(bodies) do assert.equal(body, store.read_body(q.entries[id])) end
        q:close()
      end, 60)
    end)
  end

  it("a record that does not check ends the segment: the entries from it on were never acknowledged", function()
    H.run(function()
      local dir = H.tmpdir("seg-crc")
      local q = open(dir)
      local ids, bodies = {}, {}
      for k = 1, 3 do
        bodies[k] = msg("crc" .. k, ("line %d\r\n"):format(k):rep(20))
        ids[k] = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = bodies[k] })
      end
      local path = q.entries[ids[1]].seg_path
      q:close()
      local rd = assert(store.read_segment(path))
      assert.equal(3, #rd.records)
      local r1, r2 = rd.records[1], rd.records[2]
      assert.equal(ids[2], r2.id)
      flip(path, r2.body_off + r2.body_len // 2)

      -- Why entry 1 only: enqueue acknowledges an entry after an fsync
      -- that began after its append, and an fsync makes everything
      -- written before it durable. Entry 3 was appended after entry 2,
      -- so an fsync that covered 3 covered 2 as well: if 2 does not
      -- check, no fsync covered it, so neither 2 nor 3 was acknowledged
      -- (their enqueue had not returned), and what follows a record
      -- that does not check cannot be trusted to be a record at all.
      q = open(dir)
      assert.equal(1, q:pending())
      assert.equal(bodies[1], store.read_body(q.entries[ids[1]]))
      assert.is_nil(q.entries[ids[2]])
      assert.is_nil(q.entries[ids[3]])
      local after = assert(store.read_segment(path))
      assert.equal(r1.body_off + r1.body_len, after.size) -- cut right after record 1
      assert.equal(after.size, after.valid)
      assert.equal(1, #after.records)
      q:close()
    end, 60)
  end)

  it("a body holding well-formed records is one entry, with or without a torn tail after it", function()
    H.run(function()
      local dir = H.tmpdir("seg-hostile")
      local q = open(dir)
      local victim = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg("victim") })
      -- a record as the store writes it, with a valid CRC and other
      -- recipients, and an end record for the entry before it
      local fid = store.new_id()
      local fbody = msg("forged")
      local fenv = store.encode_envelope { id = fid, from = "evil@test", received_at = core.time(),
        rcpt = { { address = "victim@elsewhere.test" } }, size = #fbody }
      local forged = store.end_record(victim) .. store.record(fid, fenv, fbody) .. fenv .. fbody
      local hostile = forged .. "Subject: records\r\n\r\n" .. forged
      local hid = assert(q:enqueue { from = "c@test", rcpt = { "d@test" }, body = hostile })
      assert.equal(hostile, store.read_body(q.entries[hid]))
      local path = q.entries[hid].seg_path
      assert.equal(q.entries[victim].seg_path, path)
      q:close()

      local function check()
        local q2 = open(dir)
        assert.equal(2, q2:pending())
        assert.is_nil(q2.entries[fid])
        assert.equal(msg("victim"), store.read_body(q2.entries[victim]))
        assert.equal(hostile, store.read_body(q2.entries[hid]))
        assert.same({ "d@test" }, { q2.entries[hid].rcpt[1].address })
        assert.equal(1, #q2.entries[hid].rcpt)
        local rd = store.read_segment(path)
        assert.equal(2, #rd.records)
        assert.same({}, rd.ended)
        q2:close()
      end
      check()
      -- a torn tail right after the record with the forged ones in it
      append(path, "R " .. fid .. " 10 99999 00000000\nluasm")
      check()
      assert.equal(size_of(path), store.read_segment(path).valid)

      -- The hostile record itself torn by a crash before its fsync
      -- (never acknowledged): reading stops at it and never takes what
      -- is inside it for records (the forged end record would drop the
      -- first entry). First with the file's length on disk but its last
      -- bytes not (they read back as zeros), then cut right after the
      -- first forged copy.
      local rd = store.read_segment(path)
      local last = rd.records[2].body_off + rd.records[2].body_len
      local f = assert(io.open(path, "r+b"))
      f:seek("set", last - 32)
      assert(f:write(("\0"):rep(32)))
      assert(f:close())
      q = open(dir)
      assert.is_table(q.entries[victim], "the forged end record was read")
      assert.equal(1, q:pending())
      assert.equal(msg("victim"), store.read_body(q.entries[victim]))
      assert.is_nil(q.entries[fid])
      assert.is_nil(q.entries[hid])
      assert.equal(rd.records[2].body_off - #store.record(hid, rd.records[2].env, hostile) - #rd.records[2].env,
        size_of(path)) -- cut where the hostile record began
      q:close()
      -- the cut one again, for the truncated variant
      append(path, store.record(hid, rd.records[2].env, hostile) .. rd.records[2].env .. hostile)
      assert.equal(2, #store.read_segment(path).records)
      core.truncate(path, rd.records[2].body_off + #forged)
      q = open(dir)
      assert.equal(1, q:pending())
      assert.is_table(q.entries[victim])
      assert.is_nil(q.entries[fid])
      assert.is_nil(q.entries[hid])
      q:close()
    end, 60)
  end)
end)

describe("queue segment reclaim", function()
  it("ends each delivered entry's record and removes the full segments; a reopen delivers nothing again", function()
    local old = store.SEGMENT_MAX
    finally(function() store.SEGMENT_MAX = old end)
    store.SEGMENT_MAX = 1500
    H.run(function()
      local dir = H.tmpdir("seg-reclaim")
      local port, got = receiver()
      local q = open(dir, { route = smarthost(port) })
      local order, seen = {}, {}
      for k = 1, 12 do
        local id = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg("r" .. k, ("x"):rep(400)) })
        local seg = q.entries[id].segment
        if not seen[seg] then
          seen[seg] = true
          order[#order + 1] = seg
        end
      end
      assert.is_true(#order >= 3, "only " .. #order .. " segments")
      assert.equal(#order, #segments(dir))
      q:start()
      until_true(function() return q:pending() == 0 end, "the deliveries", 40)
      q:stop()
      -- only the segment that still takes records is left, every record in it ended
      local current = q.paths.current
      for _, name in ipairs(order) do
        if not (current and current.name == name) then
          assert.is_nil(io.open(dir .. "/segments/" .. name .. ".seg"), name .. " is still there")
        end
      end
      local left = segments(dir)
      assert.is_true(#left <= 1)
      if left[1] then
        assert.equal(dir .. "/segments/" .. current.name .. ".seg", left[1])
        local rd = store.read_segment(left[1])
        assert.is_true(#rd.records > 0)
        for _, rec in ipairs(rd.records) do assert.is_true(rd.ended[rec.id], rec.id .. " not ended") end
      end
      q:close()

      local q2 = open(dir, { route = smarthost(port) })
      assert.equal(0, q2:pending())
      assert.same({}, segments(dir)) -- no live entry in it: removed at open
      q2:close()
      local counts = ids_of(got)
      for k = 1, 12 do assert.equal(1, counts["r" .. k .. "@test"], "r" .. k) end
      assert.equal(12, #got.messages)
    end, 90)
  end)
end)

describe("queue segment files", function()
  -- the descriptors of this process open on a queue's segments
  local function open_segment_files(dir)
    local n = 0
    local pipe = assert(io.popen("ls -l /proc/" .. core.getpid() .. "/fd 2>/dev/null"))
    for line in pipe:lines() do
      if line:find(dir .. "/segments/", 1, true) then n = n + 1 end
    end
    pipe:close()
    return n
  end

  it("keeps at most FILES_MAX open; the others open again for their end records", function()
    local old_max, old_files = store.SEGMENT_MAX, store.FILES_MAX
    finally(function() store.SEGMENT_MAX, store.FILES_MAX = old_max, old_files end)
    store.SEGMENT_MAX, store.FILES_MAX = 1500, 2
    H.run(function()
      local dir = H.tmpdir("seg-files")
      local port, got = receiver()
      local q = open(dir, { route = smarthost(port) })
      local segs, most = {}, 0
      for k = 1, 12 do
        local id = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg("f" .. k, ("x"):rep(400)) })
        segs[q.entries[id].segment] = true
        most = math.max(most, open_segment_files(dir))
      end
      local nsegs = 0
      for _ in pairs(segs) do nsegs = nsegs + 1 end
      assert.is_true(nsegs >= 3, "only " .. nsegs .. " segments")
      assert.is_true(most >= 1 and most <= 2, most .. " segment files open")
      q:start()
      until_true(function()
        most = math.max(most, open_segment_files(dir))
        return q:pending() == 0
      end, "the deliveries", 40)
      q:stop()
      assert.is_true(most <= 2, most .. " segment files open")
      -- every record got its end although its file had been closed
      for _, path in ipairs(segments(dir)) do
        local rd = store.read_segment(path)
        for _, rec in ipairs(rd.records) do assert.is_true(rd.ended[rec.id], rec.id .. " not ended") end
      end
      q:close()
      assert.equal(0, open_segment_files(dir))
      local q2 = open(dir, { route = smarthost(port) })
      assert.equal(0, q2:pending())
      q2:close()
      local counts = ids_of(got)
      for k = 1, 12 do assert.equal(1, counts["f" .. k .. "@test"], "f" .. k) end
    end, 90)
  end)
end)

describe("queue migration into files", function()
  it("an entry deferred by a 4xx moves into files, its record ended; the retry delivers it once", function()
    H.run(function()
      local dir = H.tmpdir("seg-migrate")
      local port, got = receiver { data = function(_, _, attempt)
        if attempt == 1 then return server.reply(451, "4.3.0", "try again") end
      end }
      local q = open(dir, { route = smarthost(port), retry = { 3600 } })
      local body = msg("mig", ("retry %d\r\n"):rep(5))
      local id = assert(q:enqueue { from = "a@test", rcpt = { "b@test", "c@test" }, body = body })
      local e = q.entries[id]
      local seg_path = assert(e.seg_path)
      q:start()
      until_true(function() return e.rcpt[1].attempts == 1 and not e.segment and not e.migrating end, "the migration")
      -- the old format: envelope, body and the log of the attempt
      local env = assert(store.decode_envelope(H.readfile(dir .. "/queue/" .. id .. ".env")))
      assert.equal(id, env.id)
      assert.same({ "b@test", "c@test" }, { env.rcpt[1].address, env.rcpt[2].address })
      assert.equal(body, H.readfile(dir .. "/queue/" .. id .. ".body"))
      local events = store.parse_log(H.readfile(dir .. "/queue/" .. id .. ".log"))
      assert.equal(2, #events)
      assert.same({ "attempt", "1", "temp" }, { events[1].kind, events[1][1], events[1][2] })
      assert.same({ "attempt", "2", "temp" }, { events[2].kind, events[2][1], events[2][2] })
      local rd = assert(store.read_segment(seg_path))
      assert.equal(id, rd.records[1].id)
      assert.is_true(rd.ended[id])
      assert.equal(0, #got.messages)

      q:flush()
      until_true(function() return q:pending() == 0 end, "the retry")
      q:stop()
      assert.equal(2, got.attempts)
      assert.equal(1, #got.messages)
      assert.equal(body, got.messages[1].data)
      assert.same({ "b@test", "c@test" }, got.messages[1].rcpt)
      assert.same({}, names(dir .. "/queue"))
      q:close()
    end, 60)
  end)

  it("entries older than SEGMENT_WAIT move into files before their attempt, each delivered once", function()
    local old = store.SEGMENT_WAIT
    finally(function() store.SEGMENT_WAIT = old end)
    H.run(function()
      local dir = H.tmpdir("seg-wait")
      local q
      local ids, from_files = {}, {}
      local port, got = receiver { data = function(_, data)
        local tag = data:match("Message%-ID: <([^@>]+)@")
        local e = q.entries[ids[tag]]
        local env = io.open(dir .. "/queue/" .. ids[tag] .. ".env")
        if env then env:close() end
        from_files[tag] = e ~= nil and e.segment == nil and env ~= nil
      end }
      q = open(dir, { route = smarthost(port) })
      for k = 1, 3 do
        ids["w" .. k] = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg("w" .. k) })
      end
      local seg_path = q.entries[ids.w1].seg_path
      store.SEGMENT_WAIT = 0 -- they have all been waiting longer than that
      q:start()
      until_true(function() return q:pending() == 0 end, "the deliveries")
      q:stop()
      assert.same({ ["w1@test"] = 1, ["w2@test"] = 1, ["w3@test"] = 1 }, ids_of(got))
      assert.same({ w1 = true, w2 = true, w3 = true }, from_files)
      local rd = assert(store.read_segment(seg_path)) -- still the segment records go to
      assert.equal(3, #rd.records)
      for _, id in pairs(ids) do assert.is_true(rd.ended[id]) end
      assert.same({}, names(dir .. "/queue"))
      q:close()
    end, 60)
  end)

  it("two moves of one entry at once (its age and a hold) leave it whole, in files, once", function()
    H.run(function()
      local dir = H.tmpdir("seg-migrate-twice")
      local port, got = receiver()
      local q = open(dir, { route = smarthost(port) })
      local body = msg("twice")
      local id = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = body })
      local e = q.entries[id]
      local seg_path = e.seg_path
      -- The scheduler moves an old entry in a task of its own while a
      -- later pass applies a hold to it (read_control moves it too): two
      -- migrations of the same entry, the second starting while the
      -- first waits for its fsyncs.
      local results = {}
      local tasks = {}
      for k = 1, 2 do
        tasks[k] = luasmtp.spawn(function() results[k] = q:migrate(e) end)
      end
      for _, t in ipairs(tasks) do assert(t:join(30)) end
      assert.same({ true, true }, results)
      assert.is_nil(e.segment)
      assert.falsy(e.migrating)
      assert.equal(body, H.readfile(dir .. "/queue/" .. id .. ".body"))
      assert.equal(id, assert(store.decode_envelope(H.readfile(dir .. "/queue/" .. id .. ".env"))).id)
      assert.same({}, names(dir .. "/tmp"))
      local rd = assert(store.read_segment(seg_path))
      assert.is_true(rd.ended[id])
      q:close()
      q = open(dir, { route = smarthost(port) })
      assert.equal(1, q:pending())
      assert.equal(body, store.read_body(q.entries[id]))
      q:start()
      until_true(function() return q:pending() == 0 end, "the delivery")
      q:stop()
      assert.same({ ["twice@test"] = 1 }, ids_of(got))
      q:close()
    end, 60)
  end)

  it("a crash between the files and the end record leaves both; the files win, delivered once", function()
    H.run(function()
      local dir = H.tmpdir("seg-migrate-crash")
      local q = open(dir)
      local a = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg("files") })
      local b = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg("stays") })
      local seg_path = q.entries[a].seg_path
      -- The store's own migration writes the files (fsynced, renamed,
      -- queue/ fsynced); the end record after them does not reach the
      -- file, as when the process dies right before that write.
      local write_record = core.write_record
      local ok, err = pcall(function()
        core.write_record = function(path, offset, text, ...)
          if select("#", ...) == 0 and text:match("^D ") then return nil, "io", "the process died", "other" end
          return write_record(path, offset, text, ...)
        end
        assert(q:migrate(q.entries[a]))
      end)
      core.write_record = write_record
      assert(ok, err)
      q:close()
      assert.same({ a .. ".body", a .. ".env" }, names(dir .. "/queue"))
      local rd = assert(store.read_segment(seg_path))
      assert.equal(2, #rd.records)
      assert.same({}, rd.ended)

      local port, got = receiver()
      q = open(dir, { route = smarthost(port) })
      assert.equal(2, q:pending())
      local ea = q.entries[a]
      assert.is_nil(ea.segment) -- the files won
      assert.equal(dir .. "/queue/" .. a .. ".body", ea.body_path)
      assert.equal(msg("files"), store.read_body(ea))
      assert.is_string(q.entries[b].segment)
      rd = assert(store.read_segment(seg_path))
      assert.is_true(rd.ended[a]) -- superseded: ended at open
      assert.is_nil(rd.ended[b])
      q:start()
      until_true(function() return q:pending() == 0 end, "the deliveries")
      q:stop()
      assert.same({ ["files@test"] = 1, ["stays@test"] = 1 }, ids_of(got))
      assert.same({}, names(dir .. "/queue"))
      assert.same({}, segments(dir)) -- no entry left in it, and it takes no records
      q:close()
    end, 60)
  end)

  it("an entry left in its segment by a move the crash cut short keeps its state log", function()
    H.run(function()
      local dir = H.tmpdir("seg-migrate-half")
      -- c@test is refused once: b@test is done after the first attempt, c@test waits
      local refused = false
      local port, got = receiver { rcpt = function(_, rcpt)
        if rcpt == "c@test" and not refused then
          refused = true
          return server.reply(451, "4.2.0", "later")
        end
      end }
      local q = open(dir, { route = smarthost(port), retry = { 3600 } })
      local id = assert(q:enqueue { from = "a@test", rcpt = { "b@test", "c@test" }, body = msg("half") })
      local e = q.entries[id]
      local seg_path = e.seg_path
      -- the move after the attempt writes its files; the end record
      -- after them does not reach the file (the process dies first)
      local write_record = core.write_record
      local ok, err = pcall(function()
        core.write_record = function(path, offset, text, ...)
          if select("#", ...) == 0 and text:match("^D ") then return nil, "io", "the process died", "other" end
          return write_record(path, offset, text, ...)
        end
        q:start()
        until_true(function() return e.rcpt[2].attempts == 1 and not e.segment and not e.migrating end, "the move")
        q:stop()
      end)
      core.write_record = write_record
      assert(ok, err)
      q:close()
      assert.same({ { "b@test" } }, { got.messages[1].rcpt })
      assert.is_nil(store.read_segment(seg_path).ended[id])
      -- of the move's renames only the envelope's reached the disk
      os.remove(dir .. "/queue/" .. id .. ".body")

      q = open(dir, { route = smarthost(port), retry = { 3600 } })
      assert.equal(1, q:pending())
      e = q.entries[id]
      assert.equal(seg_path, e.seg_path) -- the segment holds it still
      assert.equal(msg("half"), store.read_body(e))
      assert.equal("done", e.rcpt[1].state) -- its log says so
      assert.equal("pending", e.rcpt[2].state)
      assert.equal(1, e.rcpt[2].attempts)
      q:flush()
      q:start()
      until_true(function() return q:pending() == 0 end, "the retry")
      q:stop()
      assert.equal(2, #got.messages)
      assert.same({ "c@test" }, got.messages[2].rcpt) -- b@test got it once
      q:close()
    end, 60)
  end)
end)

describe("luasmtp queue on entries in segments", function()
  it("hold moves an entry waiting in a segment into files while the scheduler runs; release delivers it once",
    function()
    H.run(function()
      local dir = H.tmpdir("seg-hold")
      local refuse = true
      local port, got = receiver { connect = function()
        if refuse then return server.disconnect("busy") end
      end }
      local q = open(dir, { route = smarthost(port), retry = { 3600 } })
      local key = "smtp:127.0.0.1:" .. port
      q:start()
      -- the destination refuses a first message and backs off for an hour
      local x = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg("first") })
      until_true(function()
        return q.entries[x].rcpt[1].attempts == 1 and q.dests[key] and q.dests[key].backoff_until > core.time() + 60
      end, "the backoff")
      -- the next one waits in its segment for the destination
      local body = msg("held", ("held %d\r\n"):rep(5))
      local y = assert(q:enqueue { from = "a@test", rcpt = { "c@test" }, body = body })
      local ey = q.entries[y]
      local seg_path = ey.seg_path
      until_true(function() return ey.rcpt[1].next_attempt >= q.dests[key].backoff_until end, "the wait")
      assert.is_string(ey.segment)

      local text, ok = tool(dir, "hold " .. y)
      assert(ok, text)
      assert.matches(y .. ": hold", text, 1, true)
      until_true(function() return ey.held and not ey.segment and not ey.migrating end, "the hold")
      assert.equal(body, H.readfile(dir .. "/queue/" .. y .. ".body"))
      assert.equal(y, store.decode_envelope(H.readfile(dir .. "/queue/" .. y .. ".env")).id)
      assert.is_true(store.read_segment(seg_path).ended[y])
      text, ok = tool(dir, "--json list")
      assert(ok, text)
      local held = {}
      for _, v in ipairs(assert(dkjson.decode(text))) do held[v.id] = v.held end
      assert.same({ [x] = false, [y] = true }, held)

      refuse = false
      text, ok = tool(dir, "release " .. y)
      assert(ok, text)
      until_true(function() return q.entries[y] == nil end, "the delivery after release")
      assert.same({ ["held@test"] = 1 }, ids_of(got)) -- the first one still waits for its retry
      assert.equal(body, got.messages[1].data)
      q:flush()
      until_true(function() return q:pending() == 0 end, "the flush")
      q:stop()
      assert.same({ ["held@test"] = 1, ["first@test"] = 1 }, ids_of(got))
      q:close()
    end, 60)
  end)

  it("a hold or a delete keeps an entry waiting behind another delivery from going out", function()
    H.run(function()
      local dir = H.tmpdir("seg-hold-ready")
      local port, got, gate = gated_receiver()
      local q = open(dir, { route = smarthost(port), max_connections_per_destination = 1 })
      local key = "smtp:127.0.0.1:" .. port
      q:start()
      local a = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg("ahead") })
      until_true(function() return gate.entered == 1 end, "the first delivery")
      -- the next ones' jobs wait for the destination's only connection
      local b = assert(q:enqueue { from = "a@test", rcpt = { "c@test" }, body = msg("behind") })
      local c = assert(q:enqueue { from = "a@test", rcpt = { "d@test" }, body = msg("deleted") })
      until_true(function() return #q.dests[key].ready == 2 end, "the waiting jobs")
      local text, ok = tool(dir, "hold " .. b)
      assert(ok, text)
      text, ok = tool(dir, "delete " .. c)
      assert(ok, text)
      until_true(function() return q.entries[b].held and q.entries[c].deleted end, "the hold and the delete")
      gate.go = true
      until_true(function() return q.entries[a] == nil and q.dests[key].active == 0 end, "the first delivery to end")
      assert.same({ ["ahead@test"] = 1 }, ids_of(got))
      local eb = q.entries[b]
      assert.is_table(eb)
      assert.equal(0, eb.rcpt[1].attempts)
      until_true(function() return q.entries[c] == nil end, "the deleted entry's removal")
      until_true(function() return not eb.segment and not eb.migrating end, "the held entry's files")
      assert.equal(msg("behind"), H.readfile(dir .. "/queue/" .. b .. ".body"))
      text, ok = tool(dir, "release " .. b)
      assert(ok, text)
      until_true(function() return q:pending() == 0 end, "the delivery after release")
      q:stop()
      assert.same({ ["ahead@test"] = 1, ["behind@test"] = 1 }, ids_of(got))
      q:close()
    end, 60)
  end)

  it("the tool's read of the queue sees an entry that moves into files while it reads", function()
    H.run(function()
      local dir = H.tmpdir("seg-scan-move")
      local q = open(dir)
      local id = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg("moving") })
      local other = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg("staying") })
      local tool_paths = store.paths(dir) -- what `luasmtp queue` reads with
      -- The owner moves the entry into files between the tool's reading
      -- of the one directory and of the other (whichever it reads first).
      local listdir, reads = core.listdir, 0
      local function scan_while_moving(fn)
        reads = 0
        core.listdir = function(path)
          if path == tool_paths.queue or path == tool_paths.segments then
            reads = reads + 1
            if reads == 2 then assert(q:migrate(q.entries[id])) end
          end
          return listdir(path)
        end
        local ok, res = pcall(fn)
        core.listdir = listdir
        assert(ok, res)
        return res
      end
      local list = scan_while_moving(function() return store.scan(tool_paths, false) end)
      assert.equal(2, reads)
      assert.is_nil(q.entries[id].segment) -- it did move
      local seen = {}
      for _, e in ipairs(list) do seen[e.id] = (seen[e.id] or 0) + 1 end
      assert.same({ [id] = 1, [other] = 1 }, seen)
      -- and the other one, through store.load as `hold ID` finds it
      local e = scan_while_moving(function()
        id = other
        return store.load(tool_paths, other)
      end)
      assert.is_table(e, "store.load missed the entry")
      assert.equal(other, e.id)
      assert.equal(msg("staying"), store.read_body(e))
      q:close()
    end, 60)
  end)

  it("list and show read entries in segments beside the running queue", function()
    H.run(function()
      local dir = H.tmpdir("seg-list")
      local port, got, gate = gated_receiver()
      local q = open(dir, { route = smarthost(port) })
      local b1 = msg("one", "Subject-Like: no\r\n")
      local b2 = msg("two", (("y"):rep(70) .. "\r\n"):rep(40))
      local one = assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = b1 })
      local two = assert(q:enqueue { from = "s@test", rcpt = { "c@test", "d@test" }, body = b2 })
      q:start()
      -- both in flight, both still only in their segment
      until_true(function() return gate.entered == 2 end, "the deliveries to start")
      assert.is_string(q.entries[one].segment)
      assert.is_string(q.entries[two].segment)
      assert.same({}, names(dir .. "/queue"))

      local text, ok = tool(dir, "--json list")
      assert(ok, text)
      local byid = {}
      for _, v in ipairs(assert(dkjson.decode(text))) do byid[v.id] = v end
      assert.equal(#b1, byid[one].size)
      assert.equal(#b2, byid[two].size)
      assert.equal("a@test", byid[one].from)
      assert.equal("s@test", byid[two].from)
      assert.same({ "c@test", "d@test" }, { byid[two].recipients[1].address, byid[two].recipients[2].address })
      assert.equal(2, #byid[two].recipients)
      assert.equal("pending", byid[two].recipients[1].state)

      text, ok = tool(dir, "list")
      assert(ok, text)
      assert.matches(("%s   %8d"):format(two, #b2), text, 1, true)
      assert.matches("    d@test", text, 1, true)

      text, ok = tool(dir, "show " .. two)
      assert(ok, text)
      assert.matches("from: <s@test>", text, 1, true)
      assert.matches("size: " .. #b2, text, 1, true)
      assert.matches("rcpt: <c@test> pending attempts 0", text, 1, true)
      assert.matches("rcpt: <d@test> pending attempts 0", text, 1, true)
      assert.matches("Message-ID: <two@test>\r\nSubject: two", text, 1, true)
      assert.is_nil(text:find("yyy", 1, true)) -- the headers, not the body

      text, ok = tool(dir, "--json show " .. one)
      assert(ok, text)
      local v = assert(dkjson.decode(text))
      assert.equal("Message-ID: <one@test>\r\nSubject: one", v.headers)
      assert.equal(#b1, v.size)

      gate.go = true
      until_true(function() return q:pending() == 0 end, "the deliveries")
      q:stop()
      assert.same({ ["one@test"] = 1, ["two@test"] = 1 }, ids_of(got))
      q:close()
    end, 60)
  end)
end)

describe("queue kill -9 during an enqueue", function()
  local function run_child(dir, port, n, crash, tag)
    return (QH.run_child(dir, port, n, crash, "segment-" .. tag))
  end

  -- power_cut: what the disk holds when the page cache is lost too (the
  -- record that was never fsynced torn); else what kill -9 leaves (the
  -- appended bytes, in the page cache, are in the file).
  for _, power_cut in ipairs { false, true } do
    it("loses no acknowledged entry and delivers each at most once" .. (power_cut and " (power cut)" or ""),
      function()
      H.run(function()
        local dir = H.tmpdir("seg-kill")
        local port, got = receiver()
        -- acknowledged before the crash
        local q = open(dir)
        for k = 1, 2 do assert(q:enqueue { from = "a@test", rcpt = { "b@test" }, body = msg("pre" .. k) }) end
        q:close()
        local out = run_child(dir, port, 1, "enqueue_before_sync", "a" .. tostring(power_cut))
        assert.matches("crash point enqueue_before_sync", out, 1, true)
        assert.is_nil(out:find("queued ", 1, true)) -- its enqueue never returned
        assert.equal(0, #got.messages)
        -- the child's record went to a segment of its own (not after the first one's records)
        local segs = segments(dir)
        assert.equal(2, #segs)
        local torn
        for _, path in ipairs(segs) do
          local rd = store.read_segment(path)
          for _, rec in ipairs(rd.records) do
            local f = assert(io.open(path, "rb"))
            f:seek("set", rec.body_off)
            local head = f:read(30)
            f:close()
            if head:find("child-1@test", 1, true) then torn = { path = path, rec = rec, rd = rd } end
          end
        end
        assert.is_table(torn, "the appended record is not in the file")
        assert.equal(1, #torn.rd.records)
        if power_cut then core.truncate(torn.path, torn.rec.body_off + 10) end

        out = run_child(dir, port, 0, nil, "b" .. tostring(power_cut))
        assert.matches("empty", out, 1, true)
        local seen = ids_of(got)
        assert.equal(1, seen["pre1@test"])
        assert.equal(1, seen["pre2@test"])
        if power_cut then
          assert.is_nil(seen["child-1@test"])
        else
          assert.is_true((seen["child-1@test"] or 0) <= 1)
        end
        local count = 0
        for _ in pairs(seen) do count = count + 1 end
        assert.equal(power_cut and 2 or 2 + (seen["child-1@test"] or 0), count)
        assert.same({}, names(dir .. "/queue"))
        assert.same({}, segments(dir))
      end, 90)
    end)
  end
end)
