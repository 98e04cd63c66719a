local core = require "luasmtp.core"
local luasmtp = require "luasmtp"
local H = require "spec.helper"

local dir = H.tmp .. "/sink"

local function ls(d)
  local p = assert(io.popen("ls -A '" .. d .. "'"))
  local names = {}
  for name in p:lines() do names[#names + 1] = name end
  p:close()
  table.sort(names)
  return names
end

local function content(sink, size)
  local parts = {}
  for piece in sink:chunks(size) do parts[#parts + 1] = piece end
  return table.concat(parts)
end

local function links(path)
  local p = assert(io.popen("stat -c %h '" .. path .. "'"))
  local n = tonumber(p:read("l"))
  p:close()
  return n
end

describe("body sink", function()
  before_each(function()
    os.execute("rm -rf '" .. dir .. "' && mkdir -p '" .. dir .. "'")
  end)
  after_each(H.assert_no_leaks)

  it("keeps a small body in memory and commits it durably", function()
    local sink = core.sink { dir = dir, threshold = 1024 }
    assert(sink:write("Subject: hi\r\n"))
    assert(sink:write("\r\nbody\r\n"))
    assert.equal(21, sink:size())
    assert.is_false(sink:spooled())
    assert.same({}, ls(dir))
    assert.equal("Subject: hi\r\n\r\nbody\r\n", content(sink, 4))
    local read = sink:reader(15)
    assert.equal("bo", read(2))
    assert.equal("dy\r\n", read(100))
    assert.is_nil(read(1))
    assert(sink:commit(dir .. "/msg"))
    assert.equal("Subject: hi\r\n\r\nbody\r\n", H.readfile(dir .. "/msg"))
    local ok, err = sink:commit(dir .. "/msg")
    assert.is_nil(ok)
    assert.equal("io", err) -- the target must not exist
    sink:close()
  end)

  it("spools past the threshold to an unnamed file in its directory, read back and linked", function()
    local sink = core.sink { dir = dir, threshold = 100 }
    local parts = {}
    for i = 1, 300 do
      parts[i] = ("line %05d "):format(i):rep(50) .. "\r\n"
      assert(sink:write(parts[i]))
    end
    local all = table.concat(parts)
    assert.is_true(sink:spooled())
    assert.equal(#all, sink:size())
    assert.same({}, ls(dir)) -- O_TMPFILE: nothing to clean up after a crash
    assert.equal(all, content(sink))
    assert.equal(all, content(sink, 777))
    local from = {}
    for piece in sink:chunks(4096, 5000) do from[#from + 1] = piece end
    assert.equal(all:sub(5001), table.concat(from))
    assert(sink:commit(dir .. "/new1"))
    assert(sink:commit(dir .. "/new2"))
    assert.equal(all, H.readfile(dir .. "/new1"))
    assert.equal(2, links(dir .. "/new1")) -- the same file, never a copy
    sink:close()
    assert.same({ "new1", "new2" }, ls(dir))
  end)

  it("uses a named spool file where asked, removes it on discard, and cleans up after dead processes", function()
    local sink = core.sink { dir = dir, threshold = 10, tmpfile = false }
    assert(sink:write(("x"):rep(1000)))
    local names = ls(dir)
    assert.equal(1, #names)
    assert.matches("^luasmtp%-spool%.", names[1])
    -- a file a crashed process left behind (no such pid)
    local f = assert(io.open(dir .. "/luasmtp-spool.999999999.1.1", "w"))
    f:write("left over")
    f:close()
    assert.equal(1, core.sink_cleanup(dir)) -- ours is kept: this process runs
    assert.same(names, ls(dir))
    sink:discard()
    assert.same({}, ls(dir))
    assert.equal(0, sink:size())
    -- still usable, and a commit renames the named file into place
    assert(sink:write(("y"):rep(1000)))
    assert(sink:commit(dir .. "/kept"))
    assert.same({ "kept" }, ls(dir))
    assert.equal(("y"):rep(1000), H.readfile(dir .. "/kept"))
    sink:close()
  end)

  it("refuses content past max_size, and past threshold without a directory", function()
    local sink = core.sink { dir = dir, max_size = 10 }
    assert(sink:write("12345"))
    local ok, err = sink:write("678901")
    assert.is_nil(ok)
    assert.equal("limit", err)
    assert.equal(5, sink:size())
    sink:close()
    local mem = core.sink { threshold = 4 }
    ok, err = mem:write("12345")
    assert.is_nil(ok)
    assert.equal("limit", err)
    mem:close()
  end)

  it("reports the first header block and where the body starts", function()
    local sink = core.sink { dir = dir }
    assert(sink:write("From: a@x\r\nSubject: s\r"))
    local header, offset = sink:header()
    assert.equal("From: a@x\r\nSubject: s\r", header)
    assert.is_nil(offset)
    assert(sink:write("\n\r"))
    assert(sink:write("\nbody\r\n\r\nmore\r\n"))
    header, offset = sink:header()
    assert.equal("From: a@x\r\nSubject: s\r\n", header)
    assert.equal(#header + 2, offset)
    assert.equal("body\r\n\r\nmore\r\n", content(sink):sub(offset + 1))
    sink:close()

    local empty = core.sink {}
    assert(empty:write("\r\nno header\r\n"))
    assert.same({ "", 2 }, { empty:header() })
    empty:close()

    local long = core.sink { header_max = 16 }
    assert(long:write(("X-Long: " .. ("v"):rep(40) .. "\r\n\r\n")))
    assert.same({ nil, "limit", "header block too long" }, { long:header() })
    long:close()
  end)

  it("is released by the garbage collector and by to-be-closed variables", function()
    do
      local sink <close> = core.sink { dir = dir, threshold = 1, tmpfile = false }
      assert(sink:write("abc"))
      assert.equal(1, #ls(dir))
    end
    assert.same({}, ls(dir))
    local sink = core.sink { dir = dir, threshold = 1, tmpfile = false }
    assert(sink:write("abc"))
    sink = nil -- luacheck: ignore 311
    collectgarbage("collect")
    collectgarbage("collect")
    assert.same({}, ls(dir))
    local closed = core.sink {}
    closed:close()
    assert.has_error(function() closed:write("x") end)
  end)

  describe("fed from a socket", function()
    it("reads a DATA body into the sink and leaves the next command buffered", function()
      H.run(function()
        local a, b = core.socketpair()
        local body = {}
        for i = 1, 2000 do body[i] = (i % 7 == 0 and ".." or "") .. "line " .. i .. "\r\n" end
        local wire = "Subject: t\r\n\r\n" .. table.concat(body) .. ".\r\nQUIT\r\n"
        local sender = luasmtp.spawn(function() assert(a:send(wire)) assert(a:flush(5)) end)
        local sink = core.sink { dir = dir, threshold = 1000 }
        local info = assert(b:receivebody(sink, { idle_timeout = 5, total_timeout = 10 }))
        assert.is_false(info.too_big)
        assert.is_false(info.rejected)
        assert.is_nil(info.error)
        local expect = "Subject: t\r\n\r\n" .. table.concat(body):gsub("%.%.", ".")
        assert.equal(#expect, info.size)
        assert.equal(expect, content(sink))
        assert.is_true(sink:spooled())
        assert.same({ "Subject: t\r\n", 14 }, { sink:header() })
        assert.equal("QUIT", (b:receiveline(nil, 5)))
        assert(sender:join(5))
        sink:close()
        a:close()
        b:close()
      end)
    end)

    it("consumes a body the sink refuses, and says why", function()
      H.run(function()
        local a, b = core.socketpair()
        a:send(("x"):rep(5000) .. "\r\n.\r\nNEXT\r\n")
        local sink = core.sink { max_size = 100 }
        local info = assert(b:receivebody(sink, { idle_timeout = 5 }))
        assert.equal("limit", info.error)
        assert.equal("NEXT", (b:receiveline(nil, 5)))
        sink:close()
        a:close()
        b:close()
      end)
    end)

    it("reads BDAT chunks of n bytes into the sink", function()
      H.run(function()
        local a, b = core.socketpair()
        local chunk = ("0123456789"):rep(20000)
        local sender = luasmtp.spawn(function()
          assert(a:send(chunk .. "BDAT 5 LAST\r\nabcde" .. "QUIT\r\n"))
          assert(a:flush(5))
        end)
        local sink = core.sink { dir = dir, threshold = 4096 }
        assert(b:receivechunk(sink, #chunk, 5))
        assert.equal("BDAT 5 LAST", (b:receiveline(nil, 5)))
        assert(b:receivechunk(sink, 5, 5))
        assert.equal(chunk .. "abcde", content(sink))
        assert.equal("QUIT", (b:receiveline(nil, 5)))
        assert(sender:join(5))
        -- refused: consumed all the same
        a:send(("z"):rep(300) .. "RSET\r\n")
        local small = core.sink { max_size = 100 }
        assert.same({ nil, "limit", "message too big" }, { b:receivechunk(small, 300, 5) })
        assert.equal("RSET", (b:receiveline(nil, 5)))
        -- the peer goes away mid-chunk
        a:send("12345")
        a:close()
        assert.same({ nil, "closed" }, { b:receivechunk(sink, 10, 5) })
        small:close()
        sink:close()
        b:close()
      end)
    end)
  end)
end)
