local H = require "spec.helper"
local luasmtp = require "luasmtp"

-- Run `luasmtp serve` as a separate process, as a user would.
local function serve(script, args, log)
  return H.start(("exec timeout 60 lua5.4 '%s/bin/luasmtp' serve %s %s"):format(H.root, script, args), log)
end

local function swaks(args, log)
  H.need("swaks")
  local pid = H.start("(timeout 20 swaks " .. args .. "; echo \"exit=$?\")", log)
  assert.is_true(H.wait_pid(pid, 25))
  return H.readfile(log)
end

describe("luasmtp serve", function()
  it("runs the MX example: delivers local mail, refuses relaying, stops on SIGTERM", function()
    H.run(function()
      local dir = H.tmp .. "/serve-mx"
      os.execute("rm -rf '" .. dir .. "' && mkdir -p '" .. dir .. "'")
      local port = H.free_port()
      local pid = serve(H.root .. "/examples/mx.lua",
        ("--listen 127.0.0.1:%d --domains a.example,b.example --maildir %s/md"):format(port, dir), dir .. "/serve.log")
      H.wait_port(port)
      local out = swaks(("--server 127.0.0.1 --port %d --from x@remote.test --to user@a.example "
        .. "--helo remote.test --body hello-mx"):format(port), dir .. "/swaks1.log")
      assert.matches("exit=0", out)
      local p = assert(io.popen("cat '" .. dir .. "'/md/new/*"))
      local stored = p:read("a")
      p:close()
      assert.matches("^Received: from remote%.test", stored)
      assert.matches("hello%-mx", stored)
      out = swaks(("--server 127.0.0.1 --port %d --from x@remote.test --to victim@elsewhere.test "
        .. "--helo remote.test"):format(port), dir .. "/swaks2.log")
      assert.not_matches("exit=0", out)
      os.execute("kill -TERM " .. pid)
      assert.is_true(H.wait_pid(pid, 10), "serve did not stop on SIGTERM")
      assert.matches("SIGTERM: stopping", H.readfile(dir .. "/serve.log"))
    end, 40)
  end)

  it("runs the make-run demo: swaks submits with STARTTLS and AUTH PLAIN into the Maildir", function()
    H.need("swaks TLS", "swaks AUTH", "openssl")
    H.run(function()
      local var = H.tmp .. "/dev-var"
      os.execute("rm -rf '" .. var .. "'")
      -- free ports instead of the fixed 5870 and 2525 of `make run`
      local sub, mx = H.free_port(), H.free_port()
      while mx == sub do mx = H.free_port() end
      local pid = serve(H.root .. "/examples/dev-server.lua", ("%s 127.0.0.1:%d 127.0.0.1:%d"):format(var, sub, mx),
        H.tmp .. "/dev-server.log")
      H.wait_port(sub)
      local out = swaks(("--server 127.0.0.1:%d --tls --tls-verify --tls-ca-path %s/dev-cert.pem "
        .. "--auth PLAIN --auth-user demo --auth-password demo --from demo@example.test "
        .. "--to someone@example.test --body demo-message"):format(sub, var), H.tmp .. "/swaks-dev.log")
      assert.matches("exit=0", out)
      local p = assert(io.popen("cat '" .. var .. "'/mail/new/*"))
      local stored = p:read("a")
      p:close()
      assert.matches("^Received: from ", stored)
      assert.matches("with ESMTPSA", stored)
      assert.matches("demo%-message", stored)
      -- the MX side refuses to relay
      out = swaks(("--server 127.0.0.1:%d --from a@b.test --to victim@elsewhere.test"):format(mx),
        H.tmp .. "/swaks-dev2.log")
      assert.matches("554 5%.7%.1", out)
      os.execute("kill -TERM " .. pid)
      assert.is_true(H.wait_pid(pid, 10))
    end, 40)
  end)

  it("on SIGTERM answers idle sessions 421 4.3.2 at once and busy ones at the drain deadline", function()
    H.run(function()
      local script = H.tmp .. "/drain_script.lua"
      local f = assert(io.open(script, "w"))
      f:write([[
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"
local srv = assert(server.new {
  listen = "127.0.0.1:" .. arg[1], hostname = "drain.test", log_level = "error",
  timeouts = { plugin = 120 },
  hooks = { on_mail = function(_, from)
    if from:match("^busy") then luasmtp.sleep(100) end
    if from:match("^spin") then while true do end end
  end },
})
local _ = srv
]])
      f:close()
      local log = H.tmp .. "/drain.log"
      local port = H.free_port()
      local pid = serve("--drain 3 " .. script, port, log)
      H.wait_port(port)
      local idle = H.smtp(port, 20)
      assert.equal("220", (idle.reply()))
      assert.equal("250", (idle.cmd("EHLO idle.test")))
      local busy = H.smtp(port, 20)
      busy.reply()
      busy.cmd("EHLO busy.test")
      busy.sock:send("MAIL FROM:<busy@x.test>\r\n")
      luasmtp.sleep(0.3)
      os.execute("kill -TERM " .. pid)
      local code, text = idle.reply()
      assert.equal("421", code)
      assert.matches("4.3.2", text, 1, true)
      assert.is_nil(idle.reply()) -- and closed
      idle.close()
      assert.same({ nil, "timeout" }, { busy.sock:receiveany(100, 0.05) }) -- still busy
      code, text = busy.reply()
      assert.equal("421", code)
      assert.matches("4.3.2", text, 1, true)
      busy.close()
      assert.is_true(H.wait_pid(pid, 15), "serve did not stop after the drain")
    end, 40)
  end)

  it("stops on SIGTERM while a hook spins in a busy loop", function()
    H.run(function()
      local log = H.tmp .. "/spin.log"
      local port = H.free_port()
      local pid = serve("--drain 2 " .. H.tmp .. "/drain_script.lua", port, log)
      H.wait_port(port)
      local c = H.smtp(port, 20)
      c.reply()
      c.cmd("EHLO spin.test")
      c.sock:send("MAIL FROM:<spin@x.test>\r\n")
      luasmtp.sleep(0.3) -- the hook is spinning now (its deadline is 120 s): the
      -- process still takes the signal, the session gets its 421 at the drain deadline
      os.execute("kill -TERM " .. pid)
      local code, text = c.reply()
      assert.equal("421", code)
      assert.matches("4.3.2", text, 1, true)
      c.close()
      assert.is_true(H.wait_pid(pid, 15), "serve did not stop")
    end, 40)
  end)

  it("passes arguments to the script and calls its reload() on SIGHUP", function()
    H.run(function()
      local script = H.tmp .. "/reload_script.lua"
      local f = assert(io.open(script, "w"))
      f:write([[
local luasmtp = require "luasmtp"
local first = ...
io.stderr:write("started with ", first, " and ", arg[2], "\n")
local t = luasmtp.spawn(function() luasmtp.sleep(30) end)
local _ = t
return { reload = function() io.stderr:write("reloaded\n") end }
]])
      f:close()
      local log = H.tmp .. "/reload.log"
      local pid = serve(script, "one two", log)
      luasmtp.sleep(0.5)
      os.execute("kill -HUP " .. pid)
      luasmtp.sleep(0.3)
      os.execute("kill -TERM " .. pid)
      assert.is_true(H.wait_pid(pid, 10))
      local out = H.readfile(log)
      assert.matches("started with one and two", out)
      assert.matches("reloaded", out)
    end, 20)
  end)
end)
