--- Test helper: runs each test body as a task on the loop, bounded in
-- time, re-raises the failing task's traceback, and checks that no
-- socket, watcher or task outlives the test.
local luasmtp = require "luasmtp"
local smtp_server = require "luasmtp.server"

local H = {}

H.root = debug.getinfo(1, "S").source:match("^@(.*)/spec/helper%.lua$") or "."
if H.root:sub(1, 1) ~= "/" then
  local pwd = assert(os.getenv("PWD"), "PWD is not set")
  H.root = H.root == "." and pwd or pwd .. "/" .. H.root:gsub("^%./", "")
end
H.tmp = H.root .. "/spec/tmp"

local tmp_seq = 0
--- tmpdir(name) -> a new empty directory under spec/tmp for this test.
function H.tmpdir(name)
  tmp_seq = tmp_seq + 1
  local dir = ("%s/%s-%d-%d"):format(H.tmp, name, math.floor(luasmtp.time() * 1000) % 100000000, tmp_seq)
  assert(os.execute("rm -rf '" .. dir .. "' && mkdir -p '" .. dir .. "'"))
  return dir
end

--- Run fn() as a task; fail if it raises, if any task raises, or if it
-- has not finished after `timeout` seconds (default 10).
function H.run(fn, timeout)
  local errors = {}
  local prev = luasmtp.on_error(function(msg)
    errors[#errors + 1] = msg
  end)
  local task = luasmtp.spawn(fn)
  local deadline = luasmtp.update_now() + (timeout or 10)
  while task:status() ~= "dead" do
    if luasmtp.update_now() > deadline then
      luasmtp.on_error(prev)
      error("test did not finish within " .. (timeout or 10) .. " seconds", 2)
    end
    luasmtp.step(0.05)
  end
  -- let the other tasks of the test wind down
  local settle = luasmtp.update_now() + 2
  while luasmtp.stats().tasks > 0 and luasmtp.update_now() < settle do
    luasmtp.step(0.02)
  end
  luasmtp.on_error(prev)
  local res = table.pack(task:join())
  if not res[1] then
    error(res[2], 0)
  end
  if #errors > 0 then
    error(errors[1], 0)
  end
  return table.unpack(res, 2, res.n)
end

--- Run fn() as a task under luasmtp.run(), which blocks in the poll the
-- way a server's loop does (H.run polls in short steps, which would hide
-- a wait whose timer was lost). fn must bound every wait it makes.
function H.run_blocking(fn)
  local errors = {}
  local prev = luasmtp.on_error(function(msg)
    errors[#errors + 1] = msg
  end)
  local task = luasmtp.spawn(fn)
  local ok, err, n = luasmtp.run()
  luasmtp.on_error(prev)
  assert(ok, ("luasmtp.run: %s (%s tasks left)"):format(tostring(err), tostring(n)))
  local res = table.pack(task:join())
  if not res[1] then
    error(res[2], 0)
  end
  if #errors > 0 then
    error(errors[1], 0)
  end
  return table.unpack(res, 2, res.n)
end

--- Assert that every live object is gone (after a full collection).
function H.assert_no_leaks()
  for _ = 1, 3 do
    collectgarbage("collect")
  end
  local stats = luasmtp.stats()
  local live = {}
  for k, v in pairs(stats) do
    if k ~= "total" and k ~= "tls_contexts" and v ~= 0 then
      live[#live + 1] = k .. "=" .. v
    end
  end
  table.sort(live)
  assert(#live == 0, "objects still alive: " .. table.concat(live, ", "))
end

--- A listener on 127.0.0.1:0 (or addr) and its port.
function H.listen(addr)
  local ls = assert(luasmtp.listen(addr or "127.0.0.1:0"))
  local l = ls[1]
  local _, port = l:getsockname()
  return l, port
end

--- TLS contexts for the test PKI: server (localhost) and a client that
-- trusts the test CA. extra: fields merged into both params tables.
function H.tls_contexts(server_extra, client_extra)
  local d = H.certs()
  local sp = { mode = "server", certificate = d .. "/server.pem", key = d .. "/server.key" }
  for k, v in pairs(server_extra or {}) do sp[k] = v end
  local cp = { mode = "client", cafile = d .. "/ca.pem" }
  for k, v in pairs(client_extra or {}) do cp[k] = v end
  return luasmtp.tls.context(sp), luasmtp.tls.context(cp)
end

--- A connected client/server pair over loopback TCP.
function H.tcp_pair()
  local l, port = H.listen()
  local server
  local t = luasmtp.spawn(function()
    server = assert(l:accept(5))
  end)
  local client = assert(luasmtp.connect("127.0.0.1", port, { timeout = 5 }))
  assert(t:join(5))
  l:close()
  return client, server
end

--- Generate the test PKI once; returns the directory holding it.
function H.certs()
  local dir = H.tmp .. "/certs"
  if not H._certs then
    local ok = os.execute("sh '" .. H.root .. "/spec/certs.sh' '" .. dir .. "'")
    assert(ok, "spec/certs.sh failed")
    H._certs = dir
  end
  return dir
end

--- Read a whole file.
function H.readfile(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("a")
  f:close()
  return data
end

--- Start an external program in the background; returns its pid.
-- Output goes to logfile. The program must end by itself; H.kill stops it
-- earlier by pid.
function H.start(cmd, logfile)
  logfile = logfile or "/dev/null"
  local p = assert(io.popen(cmd .. " >'" .. logfile .. "' 2>&1 & echo $!"))
  local pid = tonumber(p:read("l"))
  p:close()
  assert(pid, "could not start: " .. cmd)
  return pid
end

function H.kill(pid)
  os.execute("kill " .. math.tointeger(pid) .. " 2>/dev/null")
end

--- Wait (inside a task) until process pid has exited; false on timeout.
function H.wait_pid(pid, timeout)
  local deadline = luasmtp.update_now() + (timeout or 10)
  while luasmtp.update_now() < deadline do
    if not os.execute("kill -0 " .. math.tointeger(pid) .. " 2>/dev/null") then
      return true
    end
    luasmtp.sleep(0.05)
  end
  H.kill(pid)
  return false
end

--- Wait (inside a task) until a TCP port accepts connections.
function H.wait_port(port, host, timeout)
  local deadline = luasmtp.update_now() + (timeout or 5)
  while luasmtp.update_now() < deadline do
    local s = luasmtp.connect(host or "127.0.0.1", port, { timeout = 1 })
    if s then
      s:close()
      return true
    end
    luasmtp.sleep(0.05)
  end
  error("port " .. port .. " did not open")
end

local started_servers = {}

--- smtp_server(opts) -> server, port: an SMTP server (luasmtp.server) on
-- 127.0.0.1:0, quiet, hostname mx.test unless opts say otherwise;
-- H.close_servers() stops every one started so far.
function H.smtp_server(opts)
  opts = opts or {}
  opts.listen = opts.listen or "127.0.0.1:0"
  opts.hostname = opts.hostname or "mx.test"
  opts.logger = opts.logger or function() end
  local srv = assert(smtp_server.new(opts))
  started_servers[#started_servers + 1] = srv
  return srv, srv:addresses()[1].port
end

--- close_servers(): close the servers of smtp_server() and let their
-- sessions wind down (for after_each: a failed test leaves none behind).
function H.close_servers()
  for _, srv in ipairs(started_servers) do srv:close() end
  started_servers = {}
  local settle = luasmtp.update_now() + 3
  while luasmtp.stats().tasks > 0 and luasmtp.update_now() < settle do
    luasmtp.step(0.02)
  end
end

--- smtp(port [, timeout]) -> a raw SMTP client for server tests:
-- c.reply() -> code, all lines joined by "\n"; c.cmd(line) sends a
-- line and reads the reply; c.sock; c.close().
function H.smtp(port, timeout)
  local c = assert(luasmtp.connect("127.0.0.1", port, { timeout = 5 }))
  c:settimeout(timeout or 5)
  local client = { sock = c }
  function client.reply()
    local lines = {}
    repeat
      local line, err = c:receiveline(2000)
      if not line then return nil, err end
      lines[#lines + 1] = line
    until line:sub(4, 4) ~= "-"
    return lines[#lines]:sub(1, 3), table.concat(lines, "\n")
  end
  function client.cmd(line)
    c:send(line .. "\r\n")
    return client.reply()
  end
  function client.close() c:close() end
  return client
end

--- A free TCP port on 127.0.0.1 (for external programs).
function H.free_port()
  local l, port = H.listen()
  l:close()
  return port
end

return H
