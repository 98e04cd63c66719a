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

-- Start fn as a task with the task errors collected; returns the task,
-- finish() (restores the error handler, re-raises the task's error or
-- the first error of another task, else returns the task's results) and
-- restore() (only restores the handler).
local function start_test(fn)
  local errors = {}
  local prev = luasmtp.on_error(function(msg)
    errors[#errors + 1] = msg
  end)
  local task = luasmtp.spawn(fn)
  local function restore() luasmtp.on_error(prev) end
  local function finish()
    restore()
    local res = table.pack(task:join())
    if not res[1] then
      error(res[2], 0)
    end
    if #errors > 0 then
      error(errors[1], 0)
    end
    return table.unpack(res, 2, res.n)
  end
  return task, finish, restore
end

--- Run fn() as a task; fail if it raises, if any task raises, or if it
-- has not finished after `timeout` seconds (default 10).
function H.run(fn, timeout)
  local task, finish, restore = start_test(fn)
  local deadline = luasmtp.update_now() + (timeout or 10)
  while task:status() ~= "dead" do
    if luasmtp.update_now() > deadline then
      restore()
      error("test did not finish within " .. (timeout or 10) .. " seconds", 2)
    end
    luasmtp.step(0.05)
  end
  -- let the other tasks of the test wind down
  local settle = luasmtp.update_now() + 2
  while luasmtp.stats().tasks > 0 and luasmtp.update_now() < settle do
    luasmtp.step(0.02)
  end
  return finish()
end

--- Run fn() as a task under luasmtp.run(), which blocks in the poll the
-- way a server's loop does (H.run polls in short steps, which would hide
-- a wait whose timer was lost). fn must bound every wait it makes.
function H.run_blocking(fn)
  local _, finish, restore = start_test(fn)
  local ok, err, n = luasmtp.run()
  if not ok then
    restore()
    error(("luasmtp.run: %s (%s tasks left)"):format(tostring(err), tostring(n)), 2)
  end
  return finish()
end

--- Assert that every live object is gone (after a full collection).
function H.assert_no_leaks()
  for _ = 1, 3 do
    collectgarbage("collect")
  end
  local stats = luasmtp.stats()
  local live = {}
  for k, v in pairs(stats) do
    if k ~= "total" and k ~= "tls_contexts" and k ~= "lua_heap" and v ~= 0 then
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
    H.need("openssl")
    local ok = os.execute("sh '" .. H.root .. "/spec/certs.sh' '" .. dir .. "'")
    assert(ok, "spec/certs.sh failed")
    H._certs = dir
  end
  return dir
end

--- A string quoted for sh.
function H.shquote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

--- Create a directory (and its parents); returns its path.
function H.mkdir(path)
  assert(os.execute("mkdir -p " .. H.shquote(path)), "mkdir " .. path)
  return path
end

--- A short directory for UNIX sockets (their paths are limited to 107
-- bytes; H.tmp may be deep), made once and removed when the interpreter
-- exits. Others may enter it (Postfix's lmtp runs as postfix); what is in
-- it keeps its own modes.
function H.sockdir()
  if not H._sockdir then
    local p = assert(io.popen("mktemp -d /tmp/luasmtp-spec-XXXXXX"))
    local dir = assert(p:read("l"))
    p:close()
    assert(os.execute("chmod 711 " .. H.shquote(dir)))
    H._sockdir = dir
    H._sockdir_guard = setmetatable({}, { __gc = function()
      os.execute("rm -rf " .. H.shquote(dir))
    end })
  end
  return H._sockdir
end

--- A path for a UNIX socket in H.sockdir(), nothing there yet.
function H.sockpath(name)
  local p = H.sockdir() .. "/" .. name
  os.remove(p)
  return p
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
-- line and reads the reply; c.sock; c.close(). port: a TCP port on
-- 127.0.0.1, or the path of a UNIX socket.
function H.smtp(port, timeout)
  local c = assert(type(port) == "string" and luasmtp.connect_unix(port, { timeout = 5 })
    or luasmtp.connect("127.0.0.1", port, { timeout = 5 }))
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
  H.need("python3")
  local args = {}
  for i, r in ipairs(records) do
    args[i] = H.shquote(r)
  end
  return H.start_server(string.format("%s %s --host %s --port 0 --lifetime %d --log %s", H.python3,
    H.shquote(H.root .. "/spec/fake_dns.py"), host, math.tointeger(lifetime or 60), table.concat(args, " ")),
    "fake_dns_" .. tag)
end

--- Start spec/https_server.py (inside a task or the main chunk).
-- opts: tls = false for plain HTTP, cert = name in the test PKI
-- (default "server": localhost), root = directory it serves and stores
-- POST bodies in, lifetime = seconds (60), tag = log file name part.
-- Returns { pid =, port =, log = } ; stop with H.kill(server.pid).
function H.https_server(opts)
  H.need("python3 https server")
  opts = opts or {}
  local args = { H.python3, H.shquote(H.root .. "/spec/https_server.py"), "--port 0",
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

--- The Python of the Debian packages (python3, python3-aiosmtpd): the
-- one the tests run, whatever else PATH offers.
H.python3 = "/usr/bin/python3"

--- Peer programs: what the tests need each to be able to do, how to find
-- out, and the Debian packages that make it able (all of them are in
-- scripts/deps.sh). `command` runs under sh; the peer can when it exits
-- 0 and, if `expect` is given, its output contains that text. `needs`
-- names a capability to check first; `why` picks the output lines that
-- explain a failure (default: the last line).
H.peers = {
  swaks = { command = "swaks --version", packages = "swaks" },
  ["swaks TLS"] = { needs = "swaks", command = "swaks --support", expect = "=== TLS supported",
                    why = "TLS", packages = "libnet-ssleay-perl libio-socket-ssl-perl" },
  ["swaks AUTH"] = { needs = "swaks", command = "swaks --support", expect = "=== Basic AUTH supported",
                     why = "AUTH", packages = "perl" },
  python3 = { command = H.python3 .. " --version", packages = "python3" },
  ["python3 smtplib TLS"] = { needs = "python3", command = H.python3 .. " -c 'import smtplib, ssl'",
                              packages = "python3" },
  ["python3 aiosmtpd"] = { needs = "python3", command = H.python3 .. " -c 'import aiosmtpd.smtp'",
                           packages = "python3-aiosmtpd" },
  ["python3 https server"] = { needs = "python3", packages = "python3",
    command = H.python3 .. " -c 'import http.server, ssl, gzip, email, json'" },
  -- the SPF reference the differential test compares with (spec/pyspf_check.py)
  pyspf = { needs = "python3", command = H.python3 .. " -c 'import spf, dns.resolver'",
            packages = "python3-spf python3-dnspython" },
  openssl = { command = "openssl version", packages = "openssl" },
  doveadm = { command = "doveadm pw -s SHA512-CRYPT -p x", expect = "{SHA512-CRYPT}$6$",
              packages = "dovecot-core" },
  ["smtp-sink"] = { command = "test -x /usr/sbin/smtp-sink || echo /usr/sbin/smtp-sink: not found; "
                      .. "test -x /usr/sbin/smtp-sink", packages = "postfix" },
  luarocks = { command = "luarocks --version", packages = "luarocks" },
  -- the Redis store (spec/redis_spec.lua)
  ["redis-server"] = { command = "redis-server --version", expect = "Redis server", packages = "redis-server" },
  mount = { command = "command -v mount && command -v umount || echo mount: not found", expect = "umount",
            packages = "mount" },
  -- DKIM peers (spec/dkim_spec.lua)
  ["python3 dkim"] = { needs = "python3", command = H.python3 .. " -c 'import dkim, nacl.signing'",
                       packages = "python3-dkim python3-nacl" },
  libopendkim = { command = "test -f /usr/include/opendkim/dkim.h || echo opendkim/dkim.h: not found; "
                    .. "test -f /usr/include/opendkim/dkim.h", packages = "libopendkim-dev" },
  -- the DNSSEC rig (spec/dnssec_rig.lua) and the DANE verifier
  nsd = { command = "nsd -v", expect = "NSD version", packages = "nsd" },
  unbound = { command = "unbound -V", expect = "Version", packages = "unbound" },
  ldnsutils = { command = "ldns-signzone -v && ldns-keygen -v && drill -v && ldns-dane -v",
                expect = "ldns-dane version", packages = "ldnsutils" },
}

local peer_errors = {} -- name -> false (able) or the message saying why not

local function peer_error(name)
  local peer = H.peers[name]
  if not peer then error("spec/helper.lua: no peer capability named " .. tostring(name), 3) end
  if peer_errors[name] == nil then
    local err = peer.needs and peer_error(peer.needs)
    if not err then
      local p = assert(io.popen("(" .. peer.command .. ") 2>&1"))
      local out = p:read("a")
      local ok = p:close()
      if not ok or (peer.expect and not out:find(peer.expect, 1, true)) then
        local why = {}
        for line in out:gmatch("[^\n]+") do
          if peer.why and line:find(peer.why, 1, true) then why[#why + 1] = line end
        end
        if #why == 0 then why[1] = out:match("([^\n]*)\n*$") end
        err = ("this test needs %s, which this machine lacks (`%s`: %s); install the Debian "
          .. "package(s) %s (scripts/deps.sh installs them)")
          :format(name, peer.command, table.concat(why, " / "):sub(1, 300), peer.packages)
      end
    end
    peer_errors[name] = err or false
  end
  return peer_errors[name] or nil
end

--- Fail the test with a message naming the missing package unless every
-- named peer capability (keys of H.peers) is there. Checked once per run.
function H.need(...)
  for i = 1, select("#", ...) do
    local err = peer_error((select(i, ...)))
    if err then error(err, 2) end
  end
end

--- Mount a tmpfs of `size` on dir (the full-disk test); returns a function
-- that unmounts it, or nil and why when this machine does not allow
-- mounts (not root, or a container without the right): the one optional
-- capability the README names. A missing mount program fails instead.
function H.mount_tmpfs(dir, size)
  H.need("mount")
  os.execute("mkdir -p '" .. dir .. "'")
  local p = assert(io.popen("mount -t tmpfs -o size=" .. size .. " tmpfs '" .. dir .. "' 2>&1"))
  local out = p:read("a")
  if p:close() then
    return function() os.execute("umount '" .. dir .. "'") end
  end
  return nil, "cannot mount a tmpfs here: " .. out:gsub("%s+$", "")
end

return H
