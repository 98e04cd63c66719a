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
