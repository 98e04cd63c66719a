local luasmtp = require "luasmtp"
local H = require "spec.helper"

-- Write to c, whose peer reads nothing, until send() waits for it: the
-- writer must stall, not buffer 64 MiB. -> bytes sent
local function write_to_stall(c)
  c:setoption("sendbuffer", 64 * 1024)
  local chunk = string.rep("x", 16 * 1024)
  local sent = 0
  local writer = luasmtp.spawn(function()
    while sent < 64 * 1024 * 1024 do
      local ok, err = c:send(chunk, 0.2)
      if not ok then return err end
      sent = sent + #chunk
    end
    return "finished"
  end)
  assert.same({ true, "timeout" }, { writer:join(5) })
  assert.is_true(sent < 16 * 1024 * 1024, "sent " .. sent)
  return sent
end

describe("sockets", function()
  after_each(H.assert_no_leaks)

  it("connects, echoes lines and reports addresses (IPv4)", function()
    H.run(function()
      local c, s = H.tcp_pair()
      local _ <close> = s
      local _ <close> = c
      assert.equal("127.0.0.1", (c:getpeername()))
      assert.equal(select(2, s:getsockname()), select(2, c:getpeername()))
      assert(c:send("HELO x\r\n"))
      assert.same({ "HELO x" }, { s:receiveline() })
      assert(s:send("250 ok\r\n"))
      assert.equal("250 ok", c:receiveline())
    end)
  end)

  it("listens on IPv6 literals and several addresses at once", function()
    H.run(function()
      local server = assert(luasmtp.serve {
        listen = { "127.0.0.1:0", "[::1]:0" },
        handler = function(sock)
          local line = sock:receiveline(100, 2)
          sock:send("you said " .. line .. "\r\n")
        end,
      })
      assert.equal(2, #server.addresses)
      assert.equal("::1", server.addresses[2].address)
      for _, a in ipairs(server.addresses) do
        local host = a.address:find(":") and "[" .. a.address .. "]" or a.address
        local c <close> = assert(luasmtp.connect(host, a.port, { timeout = 2 }))
        c:send("hi " .. a.address .. "\r\n")
        assert.equal("you said hi " .. a.address, c:receiveline())
      end
      server:close()
    end)
  end)

  it("connects by name through the resolver (localhost)", function()
    H.run(function()
      local l, port = H.listen()
      local t = luasmtp.spawn(function() local s = assert(l:accept(2)); s:close() end)
      local c = assert(luasmtp.connect("localhost", port, { timeout = 2, family = "inet" }))
      c:close()
      assert(t:join())
      l:close()
    end)
  end)

  it("handles many concurrent connections", function()
    H.run(function()
      local n = 200
      local server = assert(luasmtp.serve {
        listen = "127.0.0.1:0",
        handler = function(sock)
          while true do
            local line = sock:receiveline(100, 5)
            if not line or line == "QUIT" then break end
            sock:send(line:upper() .. "\r\n")
          end
        end,
      })
      local port = server.addresses[1].port
      local tasks, ok = {}, 0
      for i = 1, n do
        tasks[i] = luasmtp.spawn(function()
          local c <close> = assert(luasmtp.connect("127.0.0.1", port, { timeout = 5 }))
          for j = 1, 5 do
            c:send("msg " .. i .. " " .. j .. "\r\n")
            assert.equal("MSG " .. i .. " " .. j, c:receiveline(100, 5))
          end
          c:send("QUIT\r\n")
          ok = ok + 1
        end)
      end
      for _, t in ipairs(tasks) do assert(t:join()) end
      assert.equal(n, ok)
      server:close()
    end, 30)
  end)

  it("reassembles partial reads: lines, exact sizes, delimiters, any", function()
    H.run(function()
      local a, b = luasmtp.socketpair()
      local _ <close> = a
      local _ <close> = b
      luasmtp.spawn(function()
        local data = "ab\r\nc" .. "d\r\n" .. "0123456789" .. "headerEND" .. "rest"
        for i = 1, #data do
          a:send(data:sub(i, i))
          luasmtp.sleep(0.001)
        end
      end)
      assert.same({ "ab" }, { b:receiveline() })
      assert.same({ "cd" }, { b:receiveline() })
      assert.equal("01234", b:receive(5))
      assert.equal("56789", b:receive(5))
      assert.equal("header", b:receiveuntil("END"))
      local any = b:receiveany(100)
      assert.is_true(#any >= 1 and ("rest"):sub(1, #any) == any)
    end)
  end)

  it("treats only CRLF as a line ending and reports bare LF and CR", function()
    H.run(function()
      local a, b = luasmtp.socketpair()
      local _ <close> = a
      local _ <close> = b
      a:send("one\ntwo\r\nthree\rfour\r\n\r\n")
      assert.same({ "one\ntwo", "barelf" }, { b:receiveline() })
      assert.same({ "three\rfour", "barecr" }, { b:receiveline() })
      assert.same({ "" }, { b:receiveline() })
      -- a lone LF never ends a line: the read waits and times out
      a:send("no end\n")
      local line, err, partial = b:receiveline(nil, 0.05)
      assert.is_nil(line)
      assert.equal("timeout", err)
      assert.equal("no end\n", partial)
    end)
  end)

  it("caps line length and skips the rest of an over-long line", function()
    H.run(function()
      local a, b = luasmtp.socketpair()
      local _ <close> = a
      local _ <close> = b
      a:send(string.rep("x", 100) .. "\r\nnext\r\n")
      assert.same({ nil, "limit", "line too long" }, { b:receiveline(10) })
      assert.equal("next", b:receiveline(10))
      -- exactly at the cap is fine
      a:send("0123456789\r\n")
      assert.equal("0123456789", b:receiveline(10))
      -- an endless line without CRLF is refused without buffering it all
      b:setoption("maxline", 64)
      luasmtp.spawn(function() for _ = 1, 100 do a:send(string.rep("y", 1000)) end a:send("\r\nok\r\n") end)
      assert.same({ nil, "limit", "line too long" }, { b:receiveline() })
      assert.is_true(b:buffered() < 64 * 1024)
      assert.equal("ok", b:receiveline())
    end)
  end)

  it("caps receiveuntil", function()
    H.run(function()
      local a, b = luasmtp.socketpair()
      local _ <close> = a
      local _ <close> = b
      a:send(string.rep("z", 50) .. "END")
      assert.same({ nil, "limit", "delimiter not found within the limit" }, { b:receiveuntil("END", 20) })
    end)
  end)

  it("times out and stays usable", function()
    H.run(function()
      local a, b = luasmtp.socketpair()
      local _ <close> = a
      local _ <close> = b
      b:settimeouts(nil, 0.05, nil)
      local t0 = luasmtp.update_now()
      a:send("par")
      assert.same({ nil, "timeout", "par" }, { b:receiveline() })
      assert.is_true(luasmtp.update_now() - t0 >= 0.04)
      a:send("tial\r\n")
      assert.equal("partial", b:receiveline())
      assert.same({ nil, "timeout" }, { b:receive(3, 0.01) })
    end)
  end)

  it("returns closed on orderly shutdown, with the partial data", function()
    H.run(function()
      local a, b = luasmtp.socketpair()
      local _ <close> = b
      a:send("incomplete")
      a:close()
      assert.same({ nil, "closed", "incomplete" }, { b:receiveline() })
    end)
  end)

  it("reports a reset by the peer", function()
    H.run(function()
      local c, s = H.tcp_pair()
      local _ <close> = c
      c:send("unread data\r\n")
      luasmtp.sleep(0.02)
      s:close() -- closing with unread input sends RST
      luasmtp.sleep(0.02)
      local _, err = c:receiveline(nil, 1)
      assert.equal("reset", err)
    end)
  end)

  it("reports refused connections", function()
    H.run(function()
      local port = H.free_port()
      local s, err = luasmtp.connect("127.0.0.1", port)
      assert.is_nil(s)
      assert.equal("refused", err)
    end)
  end)

  it("batches small writes made in one pass into one segment", function()
    H.run(function()
      local c, s = H.tcp_pair()
      local _ <close> = c
      local _ <close> = s
      -- three replies queued together leave together
      c:send("250-first\r\n")
      c:send("250-second\r\n")
      c:send("250 third\r\n")
      luasmtp.sleep(0.02)
      assert.equal("250-first\r\n250-second\r\n250 third\r\n", s:receiveany(1000))
    end)
  end)

  it("applies backpressure: a slow reader does not make memory grow", function()
    H.run(function()
      local c, s = H.tcp_pair()
      local _ <close> = c
      local _ <close> = s
      local sent = write_to_stall(c)
      -- once the reader drains, writing resumes and everything arrives in order
      local total = 0
      local reader = luasmtp.spawn(function()
        while total < sent do
          local d = assert(s:receiveany(65536, 2))
          total = total + #d
        end
      end)
      assert(c:flush(5))
      assert(reader:join(5))
      assert.equal(sent, total)
    end)
  end)

  it("close is idempotent, wakes waiters, and every method then returns closed", function()
    H.run(function()
      local a, b = luasmtp.socketpair()
      local _ <close> = b
      local reader = luasmtp.spawn(function() return a:receiveline() end)
      luasmtp.sleep(0.01)
      assert.is_true(a:close())
      assert.is_true(a:close())
      assert.same({ true, nil, "closed" }, { reader:join(1) })
      for _, call in ipairs {
        function() return a:receiveline() end,
        function() return a:receive(1) end,
        function() return a:receiveany() end,
        function() return a:receiveuntil("x") end,
        function() return a:send("x") end,
        function() return a:flush() end,
        function() return a:getpeername() end,
        function() return a:getsockname() end,
        function() return a:shutdown() end,
        function() return a:channel_binding() end,
      } do
        local r, err = call()
        assert.is_nil(r)
        assert.equal("closed", err)
      end
      assert.matches("closed", tostring(a))
    end)
  end)

  it("refuses a second concurrent reader with an error", function()
    H.run(function()
      local a, b = luasmtp.socketpair()
      local _ <close> = a
      local _ <close> = b
      luasmtp.spawn(function() b:receiveline(nil, 0.05) end)
      luasmtp.sleep(0)
      local ok, err = pcall(b.receiveline, b)
      assert.is_false(ok)
      assert.matches("busy", err)
      luasmtp.sleep(0.06)
    end)
  end)

  it("lets a reader and a writer use one socket at once", function()
    H.run(function()
      local a, b = luasmtp.socketpair()
      local _ <close> = a
      local _ <close> = b
      local got = luasmtp.spawn(function() return b:receive(6) end)
      luasmtp.sleep(0)
      b:send("out\r\n")
      a:send("in\r\n12")
      assert.same({ true, "in\r\n12" }, { got:join(1) })
      assert.equal("out", a:receiveline())
    end)
  end)

  it("collects sockets that were never closed", function()
    H.run(function()
      for _ = 1, 50 do
        local a, b = luasmtp.socketpair()
        a:send("data")
        local _ = b
      end
      local l = H.listen()
      local _ = l
    end)
    -- H.assert_no_leaks in after_each runs a full collection
  end)

  it("works from the main chunk without any task", function()
    local l, port = H.listen()
    local t = luasmtp.spawn(function()
      local s <close> = assert(l:accept(2))
      s:send("220 hello\r\n")
      assert.equal("QUIT", s:receiveline(nil, 2))
    end)
    local c <close> = assert(luasmtp.connect("127.0.0.1", port, { timeout = 2 }))
    assert.equal("220 hello", c:receiveline(nil, 2))
    c:send("QUIT\r\n")
    assert(t:join(2))
    l:close()
  end)

  it("accept times out and listener close wakes the acceptor", function()
    H.run(function()
      local l = H.listen()
      assert.same({ nil, "timeout" }, { l:accept(0.01) })
      local t = luasmtp.spawn(function() return l:accept() end)
      luasmtp.sleep(0)
      l:close()
      assert.same({ true, nil, "closed" }, { t:join(1) })
    end)
  end)

  describe("UNIX-domain", function()
    local path = H.sockpath
    local function file_mode(p)
      local f = assert(io.popen("stat -c %a " .. H.shquote(p)))
      local m = f:read("l")
      f:close()
      return m
    end

    it("connects, echoes, reports both ends and the peer's credentials, removes its file", function()
      H.run(function()
        local p = path("echo.sock")
        local seen
        local server = assert(luasmtp.serve {
          listen = "unix:" .. p,
          handler = function(sock, conn)
            seen = conn
            sock:send("you said " .. sock:receiveline(100, 2) .. "\r\n")
          end,
        })
        assert.same({ { address = "unix:" .. p } }, server.addresses)
        assert.equal("600", file_mode(p)) -- the default: only our own user
        local c <close> = assert(luasmtp.connect_unix(p, { timeout = 2 }))
        assert.same({ "unix:" .. p }, { c:getpeername() })
        assert.same({ "unix:" }, { c:getsockname() }) -- unnamed
        c:send("hello\r\n")
        assert.equal("you said hello", c:receiveline(nil, 2))
        assert.equal("unix:", seen.peer_address)
        assert.is_nil(seen.peer_port)
        assert.equal("unix:" .. p, seen.local_address)
        local pidf = assert(io.open("/proc/self/stat"))
        local pid = math.tointeger(tonumber(pidf:read("a"):match("^(%d+)")))
        pidf:close()
        assert.same({ pid = pid, uid = seen.peer_credentials.uid, gid = seen.peer_credentials.gid },
          seen.peer_credentials)
        assert.equal("io", select(2, c:setoption("nodelay", true))) -- not TCP
        server:close()
        assert.is_nil(io.open(p)) -- removed at close
        local s, err = luasmtp.connect_unix(p, { timeout = 2 })
        assert.is_nil(s)
        assert.equal("refused", err) -- no file: nobody listens
      end)
    end)

    it("applies mode and owner, replaces a stale socket, refuses a live one or a plain file", function()
      H.run(function()
        local p = path("modes.sock")
        local ls = assert(luasmtp.listen { address = "unix:" .. p, mode = "0660", owner = 0, group = "root" })
        assert.equal("660", file_mode(p))
        -- a second listener on the same path: refused, and the first keeps its file
        local none, err, detail = luasmtp.listen("unix:" .. p)
        assert.same({ nil, "io" }, { none, err })
        assert.matches("another listener accepts on it", detail)
        assert.same({ "io", "unknown owner" },
          { select(2, luasmtp.listen { address = "unix:" .. p, owner = "no-such-user-here" }) })
        ls[1]:close()
        assert.is_nil(io.open(p))
        -- a socket file left by a process that is gone
        local bind = ("import socket; socket.socket(socket.AF_UNIX).bind(%q)"):format(p)
        assert(os.execute("python3 -c " .. H.shquote(bind)))
        assert.equal("refused", select(2, luasmtp.connect_unix(p)))
        ls = assert(luasmtp.listen { address = "unix:" .. p, mode = 432 }) -- 0660 as an integer
        assert.equal("660", file_mode(p))
        local c <close> = assert(luasmtp.connect_unix(p, { timeout = 2 }))
        local s <close> = assert(ls[1]:accept(2))
        c:send("ping\r\n")
        assert.equal("ping", s:receiveline(nil, 2))
        ls[1]:close()
        -- a file that is not a socket is never removed
        local f = assert(io.open(p, "w"))
        f:write("precious")
        f:close()
        none, err, detail = luasmtp.listen("unix:" .. p)
        assert.same({ nil, "io" }, { none, err })
        assert.matches("not a socket", detail)
        assert.equal("precious", H.readfile(p))
        os.remove(p)
        assert.equal("io", select(2, luasmtp.listen("unix:" .. H.sockdir() .. "/" .. ("x"):rep(120))))
        assert.equal("io", select(2, luasmtp.connect_unix(H.sockdir() .. "/" .. ("x"):rep(120))))
      end)
    end)

    it("has the limits of TCP: line cap, timeouts, backpressure, close wakes the acceptor", function()
      H.run(function()
        local p = path("limits.sock")
        local l = assert(luasmtp.listen("unix:" .. p))[1]
        local t = luasmtp.spawn(function() return assert(l:accept(2)) end)
        local c <close> = assert(luasmtp.connect_unix(p, { timeout = 2 }))
        local _, s = t:join(2)
        local _ <close> = s
        c:send(string.rep("x", 100) .. "\r\nnext\r\n")
        assert.same({ nil, "limit", "line too long" }, { s:receiveline(10) })
        assert.equal("next", s:receiveline(10))
        c:send("par")
        assert.same({ nil, "timeout", "par" }, { s:receiveline(nil, 0.05) })
        write_to_stall(c)
        assert.same({ nil, "timeout" }, { l:accept(0.01) })
        local acceptor = luasmtp.spawn(function() return l:accept() end)
        luasmtp.sleep(0)
        l:close()
        assert.same({ true, nil, "closed" }, { acceptor:join(1) })
        assert.is_nil(io.open(p))
      end)
    end)

    it("removes the socket file of a listener that was collected", function()
      local p = path("gc.sock")
      H.run(function()
        local l = assert(luasmtp.listen("unix:" .. p))
        assert.is_table(l)
      end)
      collectgarbage("collect")
      collectgarbage("collect")
      assert.is_nil(io.open(p))
    end)
  end)

  it("parses addresses", function()
    assert.same({ "127.0.0.1", 25 }, { luasmtp.parse_address("127.0.0.1:25") })
    assert.same({ "::1", 2525 }, { luasmtp.parse_address("[::1]:2525") })
    assert.same({ "mx.example", 587 }, { luasmtp.parse_address("mx.example", 587) })
    assert.same({ "::", 25 }, { luasmtp.parse_address("::", 25) })
    assert.is_nil((luasmtp.parse_address("[::1:25")))
    assert.is_nil((luasmtp.parse_address("host:99999")))
    assert.is_nil((luasmtp.parse_address("host")))
  end)
end)
