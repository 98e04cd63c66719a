--- Test helper: runs each test body as a task on the loop, bounded in
-- time, re-raises the failing task's traceback, and checks that no
-- socket, watcher or task outlives the test.
local luasmtp = require "luasmtp"

local H = {}

H.root = debug.getinfo(1, "S").source:match("^@(.*)/spec/helper%.lua$") or "."
if H.root:sub(1, 1) ~= "/" then
  local pwd = assert(os.getenv("PWD"), "PWD is not set")
  H.root = H.root == "." and pwd or pwd .. "/" .. H.root:gsub("^%./", "")
end
H.tmp = H.root .. "/spec/tmp"

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

--- Write a whole file.
function H.writefile(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end

--- A string quoted for sh.
function H.shquote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
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

--- Quote a string for the shell.
function H.shquote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

--- Start a test server that prints its port as the first line of its
-- output (inside a task or the main chunk); returns pid, port, log.
function H.start_server(cmd, tag)
  os.execute("mkdir -p " .. H.shquote(H.tmp))
  local log = H.tmp .. "/" .. tag .. ".log"
  os.remove(log)
  local pid = H.start(cmd, log)
  for _ = 1, 500 do -- at most ~10 s
    local f = io.open(log)
    local line = f and f:read("l")
    if f then f:close() end
    local port = line and math.tointeger(tonumber(line))
    if port then
      return pid, port, log
    end
    luasmtp.sleep(0.02)
  end
  H.kill(pid)
  error(tag .. " did not start: " .. H.readfile(log))
end

--- Start spec/fake_dns.py on host with the records given (see its
-- header); returns its pid, UDP port and log file (one "query NAME TYPE"
-- line per query after the port).
function H.fake_dns(host, records, tag, lifetime)
  local args = {}
  for i, r in ipairs(records) do
    args[i] = H.shquote(r)
  end
  return H.start_server(string.format("python3 %s --host %s --port 0 --lifetime %d --log %s",
    H.shquote(H.root .. "/spec/fake_dns.py"), host, math.tointeger(lifetime or 60), table.concat(args, " ")),
    "fake_dns_" .. tag)
end

--- Start spec/https_server.py (inside a task or the main chunk).
-- opts: tls = false for plain HTTP, cert = name in the test PKI
-- (default "server": localhost), root = directory it serves and stores
-- POST bodies in, lifetime = seconds (60), tag = log file name part.
-- Returns { pid =, port =, log = } ; stop with H.kill(server.pid).
function H.https_server(opts)
  opts = opts or {}
  local args = { "python3", H.shquote(H.root .. "/spec/https_server.py"), "--port 0",
    "--lifetime " .. math.tointeger(opts.lifetime or 60) }
  if opts.tls ~= false then
    local d = H.certs()
    local name = opts.cert or "server"
    args[#args + 1] = "--cert " .. H.shquote(d .. "/" .. name .. ".pem") .. " --key " ..
      H.shquote(d .. "/" .. name .. ".key")
  end
  if opts.root then
    args[#args + 1] = "--root " .. H.shquote(opts.root)
  end
  local pid, port, log = H.start_server(table.concat(args, " "), opts.tag or "https")
  return { pid = pid, port = port, log = log }
end

--- A free TCP port on 127.0.0.1 (for external programs).
function H.free_port()
  local l, port = H.listen()
  l:close()
  return port
end

return H
