-- The server's plugin chains: order and verdicts, deadlines and the
-- watchdog, the header view and the body pipeline, shutdown.
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local H = require "spec.helper"

local start = H.smtp_server

-- EHLO, MAIL and RCPT on a fresh connection; returns the client and the
-- RCPT reply.
local function envelope(port, rcpt)
  local c = H.smtp(port, 10)
  assert.equal("220", (c.reply()))
  assert.equal("250", (c.cmd("EHLO client.test")))
  assert.equal("250", (c.cmd("MAIL FROM:<a@client.test>")))
  return c, c.cmd("RCPT TO:<" .. (rcpt or "b@mx.test") .. ">")
end

local function send_message(c, data)
  assert.equal("354", (c.cmd("DATA")))
  return c.cmd(data .. "\r\n.")
end

describe("plugin chains", function()
  after_each(function()
    H.close_servers() -- a failed assertion leaves no server behind
    H.assert_no_leaks()
  end)

  it("runs the plugins of a phase in order; ACCEPT skips the rest, a reply stops the chain", function()
    H.run(function()
      local calls = {}
      local function plugin(name, verdict)
        return { name = name, rcpt = function(_, to)
          calls[#calls + 1] = name .. ":" .. to
          return verdict(to)
        end }
      end
      local _, port = start { plugins = {
        plugin("first", function(to) if to:match("^vip") then return server.ACCEPT end end),
        plugin("second", function(to)
          if to:match("^no") then return server.reply(550, "5.1.1", "No such user") end
        end),
        plugin("third", function(to) if to:match("^later") then return "450 4.2.1 Try later" end end),
        server.plugins.relay { domains = { "mx.test" } },
      } }
      local c, code = envelope(port, "vip@elsewhere.test")
      assert.equal("250", code) -- accepted before the relay guard
      local ncode, ntext = c.cmd("RCPT TO:<nobody@mx.test>")
      assert.equal("550", ncode)
      assert.matches("5.1.1 No such user", ntext, 1, true)
      assert.equal("450", (c.cmd("RCPT TO:<later@mx.test>")))
      assert.equal("554", (c.cmd("RCPT TO:<x@elsewhere.test>"))) -- the relay guard
      assert.equal("250", (c.cmd("RCPT TO:<x@mx.test>")))
      c.close()
      assert.same({ "first:vip@elsewhere.test", "first:nobody@mx.test", "second:nobody@mx.test",
        "first:later@mx.test", "second:later@mx.test", "third:later@mx.test",
        "first:x@elsewhere.test", "second:x@elsewhere.test", "third:x@elsewhere.test",
        "first:x@mx.test", "second:x@mx.test", "third:x@mx.test" }, calls)
    end)
  end)

  it("refuses unknown options, unknown hooks and malformed plugins", function()
    assert.has_error(function() server.new { listen = "127.0.0.1:0", hostnme = "x" } end,
      "server: unknown option 'hostnme'")
    assert.has_error(function() server.new { listen = "127.0.0.1:0", limits = { max_rcpt = 1 } } end,
      "server.limits: unknown option 'max_rcpt'")
    assert.has_error(function() server.new { listen = "127.0.0.1:0", hooks = { on_rcpts = print } } end,
      "server: unknown hook 'on_rcpts'")
    assert.has_error(function() server.new { listen = "127.0.0.1:0", plugins = { { rcpt = print } } } end)
    assert.has_error(function() server.new { listen = "127.0.0.1:0", phase_timeouts = { rctp = 1 } } end)
  end)

  it("answers 451 when a plugin waits past its deadline, closes what it opened and goes on", function()
    H.run(function()
      -- a peer that accepts and never answers
      local l, peer_port = H.listen()
      local peer_closed = luasmtp.cond()
      local peer = luasmtp.spawn(function()
        local s = assert(l:accept(5))
        local data, err = s:receiveany(100, 8)
        peer_closed:signal()
        s:close()
        return data, err
      end)
      local logged = {}
      local srv, port = start {
        logger = function(level, msg) logged[#logged + 1] = level .. " " .. msg end,
        timeouts = { plugin = 0.5 },
        hooks = { on_rcpt = function(_, to)
          if to:match("^slow") then
            local sock = assert(luasmtp.connect("127.0.0.1", peer_port, { timeout = 2 }))
            sock:receiveline(100, 3600) -- never answered
            return server.reply(250, "2.1.5", "not reached")
          end
        end },
      }
      local c, code, text = envelope(port, "slow@mx.test")
      assert.equal("451", code)
      assert.matches("4.3.0", text, 1, true)
      -- the plugin's socket was closed: the peer sees the end of stream
      assert.is_true(peer_closed:wait(5))
      local _, perr = select(2, peer:join(5))
      assert.equal("closed", perr)
      -- the session goes on
      assert.equal("250", (c.cmd("RCPT TO:<fast@mx.test>")))
      assert.equal("250", (send_message(c, "Subject: x\r\n\r\nbody")))
      assert.equal("221", (c.cmd("QUIT")))
      c.close()
      l:close()
      local deadline = luasmtp.update_now() + 5
      while srv:connections() > 0 and luasmtp.update_now() < deadline do luasmtp.sleep(0.02) end
      assert.equal(0, srv:connections())
      assert.matches("plugin hooks: rcpt phase ran past its 0.5 s deadline", table.concat(logged, "\n"), 1, true)
    end)
  end)

  it("interrupts a busy loop in a plugin; other sessions are served and slots released", function()
    H.run(function()
      local limits = server.plugins.limits { max_connections_per_ip = 2 }
      local srv, port = start {
        timeouts = { plugin = 0.3 },
        plugins = { limits, {
          name = "spin",
          mail = function(_, from)
            if from:match("^spin") then
              local n = 0
              while true do
                -- a pcall inside the plugin cannot keep it alive
                pcall(function() n = n + 1 end)
              end
            end
          end,
        } },
      }
      local results = {}
      local spinner = luasmtp.spawn(function()
        local c = H.smtp(port, 10)
        c.reply()
        c.cmd("EHLO spin.test")
        results.spin = { c.cmd("MAIL FROM:<spin@client.test>") }
        results.after = c.cmd("MAIL FROM:<ok@client.test>")
        c.cmd("QUIT")
        c.close()
      end)
      local other = luasmtp.spawn(function()
        local c, code = envelope(port)
        results.other_rcpt = code
        results.other_data = send_message(c, "Subject: y\r\n\r\nbody")
        c.cmd("QUIT")
        c.close()
      end)
      assert.is_true(spinner:join(10))
      assert.is_true(other:join(10))
      assert.equal("451", results.spin[1])
      assert.matches("4.3.0", results.spin[2], 1, true)
      assert.equal("250", results.after)
      assert.equal("250", results.other_rcpt)
      assert.equal("250", results.other_data)
      local deadline = luasmtp.update_now() + 5
      while srv:connections() > 0 and luasmtp.update_now() < deadline do luasmtp.sleep(0.02) end
      assert.equal(0, srv:connections())
      assert.is_nil(next(limits.store.slots)) -- every per-address slot released
      assert.is_nil(debug.gethook()) -- the watchdog is gone too
    end)
  end)

  it("answers 421 when the connect phase runs past its deadline, and releases the slot", function()
    H.run(function()
      local limits = server.plugins.limits { max_connections_per_ip = 1 }
      local stall = true
      local _, port = start {
        phase_timeouts = { connect = 0.3 },
        plugins = { limits, { name = "dnsbl", connect = function()
          if stall then luasmtp.sleep(3600) end
        end } },
      }
      local c = H.smtp(port)
      local code, text = c.reply()
      assert.equal("421", code)
      assert.matches("4.3.0", text, 1, true)
      assert.is_nil(c.reply()) -- closed
      c.close()
      stall = false
      local deadline = luasmtp.update_now() + 5
      while next(limits.store.slots) and luasmtp.update_now() < deadline do luasmtp.sleep(0.02) end
      local c2 = H.smtp(port)
      assert.equal("220", (c2.reply())) -- the one slot is free again
      c2.close()
    end)
  end)

  it("lets a per-plugin and per-phase deadline override the default", function()
    H.run(function()
      local _, port = start {
        timeouts = { plugin = 0.2 },
        plugins = {
          { name = "patient", timeouts = { rcpt = 5 }, rcpt = function() luasmtp.sleep(0.5) end },
          { name = "quick", timeout = 0.1, mail = function() luasmtp.sleep(0.5) end },
        },
      }
      local c = H.smtp(port, 10)
      c.reply()
      c.cmd("EHLO client.test")
      assert.equal("451", (c.cmd("MAIL FROM:<a@client.test>")))
      assert.equal("451", (c.cmd("MAIL FROM:<a@client.test>")))
      c.close()
      local _, port2 = start {
        timeouts = { plugin = 0.2 },
        plugins = { { name = "patient", timeouts = { rcpt = 5 }, rcpt = function() luasmtp.sleep(0.5) end } },
      }
      local c2, code = envelope(port2)
      assert.equal("250", code)
      c2.close()
    end)
  end)

  it("reports an error in a plugin with its traceback and answers 451", function()
    H.run(function()
      local logged = {}
      local _, port = start {
        logger = function(level, msg) logged[#logged + 1] = level .. " " .. msg end,
        plugins = { { name = "broken", rcpt = function() error("database down") end } },
      }
      local c, code = envelope(port)
      assert.equal("451", code)
      c.close()
      local log = table.concat(logged, "\n")
      assert.matches("plugin broken: rcpt phase failed: .*database down", log)
      assert.matches("stack traceback", log)
    end)
  end)

  it("edits the header view in the headers phase and streams each body chunk", function()
    H.run(function()
      local dir = H.tmpdir("pipeline-md")
      local seen = { chunks = 0, body_bytes = 0 }
      local _, port = start {
        spool_threshold = 4096,
        plugins = {
          server.plugins.received(),
          {
            name = "edit",
            headers = function(_, msg)
              seen.subject = msg.header:get("subject")
              seen.folded = msg.header:get("X-Folded")
              msg.header:remove("X-Secret")
              msg.header:set("Subject", "[tagged] " .. seen.subject)
              msg.header:add("X-Scanned", "yes")
              seen.count = msg.header:count()
            end,
            body = function(_, _, piece)
              seen.chunks = seen.chunks + 1
              seen.body_bytes = seen.body_bytes + #piece
            end,
            message = function(_, msg)
              seen.spooled = msg:spooled()
              seen.size = msg:size()
            end,
          },
          server.plugins.maildir(dir),
        },
      }
      local c = envelope(port)
      local body = string.rep("line of the body\r\n", 20000)
      local code = send_message(c, "Subject: hello\r\nX-Secret: s\r\nX-Folded: a\r\n b\r\n\r\n" .. body)
      assert.equal("250", code)
      c.cmd("QUIT")
      c.close()
      assert.equal("hello", seen.subject)
      assert.equal("a b", seen.folded)
      assert.equal(4, seen.count) -- Received, Subject, X-Folded, X-Scanned
      assert.is_true(seen.chunks > 1)
      assert.equal(#body + 2, seen.body_bytes) -- the CRLF before the dot is the message's
      assert.is_true(seen.spooled)
      local p = assert(io.popen("cat '" .. dir .. "'/new/*"))
      local stored = p:read("a")
      p:close()
      assert.equal(seen.size, #stored)
      assert.matches("^Received: from client%.test", stored)
      assert.matches("\r\nSubject: %[tagged%] hello\r\nX%-Folded: a\r\n b\r\nX%-Scanned: yes\r\n\r\nline of", stored)
      assert.not_matches("X-Secret", stored)
      assert.equal(body .. "\r\n", stored:sub(-(#body + 2)))
    end)
  end)

  it("streams a BDAT body into the spool instead of keeping its chunks", function()
    H.run(function()
      local dir = H.tmpdir("pipeline-bdat")
      local seen
      local _, port = start {
        spool_threshold = 1000,
        received_header = false,
        plugins = {
          { name = "look", message = function(_, msg)
            seen = { spooled = msg:spooled(), size = msg:size(), subject = msg.header:get("Subject") }
          end },
          server.plugins.maildir(dir),
        },
      }
      local c = envelope(port)
      local parts = { "Subject: chunks\r\n\r\n", string.rep("x", 50000), string.rep("y", 50000) }
      for i, p in ipairs(parts) do
        c.sock:send(("BDAT %d%s\r\n"):format(#p, i == #parts and " LAST" or "") .. p)
        assert.equal("250", (c.reply()))
      end
      c.close()
      local total = #table.concat(parts)
      assert.same({ spooled = true, size = total, subject = "chunks" }, seen)
      local p = assert(io.popen("cat '" .. dir .. "'/new/*"))
      local stored = p:read("a")
      p:close()
      assert.equal(table.concat(parts), stored)
    end)
  end)

  it("on shutdown answers idle sessions 421 4.3.2 at once, busy ones at the drain deadline", function()
    H.run(function()
      local srv, port = start {
        hooks = { on_rcpt = function(_, to) if to:match("^busy") then luasmtp.sleep(60) end end },
      }
      local idle = H.smtp(port, 10)
      idle.reply()
      idle.cmd("EHLO idle.test")
      local busy = envelope(port, "first@mx.test")
      busy.sock:send("RCPT TO:<busy@mx.test>\r\n")
      luasmtp.sleep(0.2) -- the busy session is now in its plugin
      srv:shutdown(3)
      local code, text = idle.reply()
      assert.equal("421", code)
      assert.matches("4.3.2", text, 1, true)
      assert.is_nil(idle.reply())
      -- the busy session has heard nothing yet: it is still in its plugin
      assert.same({ nil, "timeout" }, { busy.sock:receiveany(100, 0.05) })
      idle.close()
      code, text = busy.reply()
      assert.equal("421", code)
      assert.matches("4.3.2", text, 1, true)
      busy.close()
      local deadline = luasmtp.update_now() + 5
      while srv:connections() > 0 and luasmtp.update_now() < deadline do luasmtp.sleep(0.02) end
      assert.equal(0, srv:connections())
    end)
  end)
end)
