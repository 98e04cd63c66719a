--- A private Postfix instance for the specs: its own main.cf, master.cf,
-- queue, data directory and log in a temporary directory, with master(8)
-- in the foreground under timeout(1) so it stops by itself. Nothing of
-- the system's Postfix configuration (if any) is used. master(8) needs
-- root (it hands the services to the postfix user).
--
--   local pf = postfix.start { services = { "smtpd" } }   -- inside a task
--   ... pf.port ...
--   pf:stop()                     -- P.cleanup() stops what a failed test left
--   pf:queue("hold")              -- { {id=, sender=, recipients={...}}, ... }
local luasmtp = require "luasmtp"
local H = require "spec.helper"
local daemon = require "spec.daemon"

local P = { cleanup = daemon.cleanup }

local Instance = { stop = daemon.stop, logtext = daemon.logtext }
Instance.__index = Instance

-- The services every instance runs, and the ones tests may add.
local BASE = {
  "cleanup unix n - n - 0 cleanup",
  "rewrite unix - - n - - trivial-rewrite",
  "proxymap unix - - n - - proxymap",
  "anvil unix - - n - 1 anvil",
  "postlog unix-dgram n - n - 1 postlogd",
}

local command = daemon.command

--- start(opts) -> instance (inside a task). opts: `main` (extra main.cf
-- lines), `services` (extra master.cf lines), `smtpd` (default true: an
-- smtpd on 127.0.0.1 at a free port, instance.port), `lifetime` (seconds,
-- default 60), `netns` (run in a network namespace of its own, with only
-- a loopback interface, so that fixed ports such as 25 and 587 are free;
-- instance.nsenter is the command prefix that runs a program in there,
-- and `listening` the ports to wait for). Mail taken by smtpd is put on
-- hold, so it stays in the queue for the test to read.
function P.start(opts)
  opts = opts or {}
  local self = daemon.new("postfix", Instance)
  local dir = self.dir
  self.conf, self.log = dir .. "/conf", dir .. "/postfix.log"
  H.mkdir(self.conf)
  H.mkdir(dir .. "/queue")
  H.mkdir(dir .. "/data")
  assert(os.execute("chown postfix " .. H.shquote(dir .. "/data")))
  local main = {
    "compatibility_level = 3.6",
    "queue_directory = " .. dir .. "/queue",
    "data_directory = " .. dir .. "/data",
    "mail_owner = postfix",
    "setgid_group = postdrop",
    "myhostname = postfix.test",
    "mydomain = test",
    "mydestination =",
    "alias_maps =",
    "local_recipient_maps =",
    "inet_interfaces = 127.0.0.1",
    "inet_protocols = ipv4",
    "mynetworks = 127.0.0.0/8",
    "maillog_file_prefixes = " .. dir,
    "maillog_file = " .. self.log,
    "smtpd_recipient_restrictions = permit_mynetworks, reject",
    "smtpd_end_of_data_restrictions = check_client_access static:HOLD",
    "biff = no",
  }
  for _, l in ipairs(opts.main or {}) do main[#main + 1] = l end
  local services = {}
  for _, l in ipairs(BASE) do services[#services + 1] = l end
  if opts.smtpd ~= false then
    assert(not opts.netns, "in a network namespace, give the smtpd services yourself")
    self.port = H.free_port()
    services[#services + 1] = ("127.0.0.1:%d inet n - n - - smtpd"):format(self.port)
  end
  for _, l in ipairs(opts.services or {}) do services[#services + 1] = l end
  for name, lines in pairs { ["main.cf"] = main, ["master.cf"] = services } do
    local f = assert(io.open(self.conf .. "/" .. name, "w"))
    f:write(table.concat(lines, "\n"), "\n")
    f:close()
  end
  -- creates the queue directories with their owners and modes
  local cok, cout = command("postfix -c " .. H.shquote(self.conf) .. " check")
  assert(cok, "postfix check: " .. cout)
  local master = ("/usr/lib/postfix/sbin/master -c %s -d"):format(H.shquote(self.conf))
  if opts.netns then
    master = "unshare -n sh -c " .. H.shquote("ip link set lo up && exec " .. master)
  end
  daemon.run(self, master, opts.lifetime)
  if self.port then
    H.wait_port(self.port, "127.0.0.1", 15)
  end
  if opts.netns then
    self:wait_netns(opts.listening or {})
  end
  return self
end

-- Wait for master(8) in its namespace: its pid file, then its listeners.
function Instance:wait_netns(ports)
  local deadline = luasmtp.update_now() + 15
  local function expired(what)
    if luasmtp.update_now() > deadline then
      error("Postfix did not " .. what .. ": " .. self:logtext())
    end
    luasmtp.sleep(0.05)
  end
  while not self.nsenter do
    local f = io.open(self.dir .. "/queue/pid/master.pid")
    local pid = f and math.tointeger(tonumber(f:read("a")))
    if f then f:close() end
    if pid then
      self.nsenter = ("nsenter --net=/proc/%d/ns/net"):format(pid)
    else
      expired("start")
    end
  end
  for _, port in ipairs(ports) do
    while not select(2, command(self.nsenter .. " ss -ltnH")):find("127.0.0.1:" .. port .. " ", 1, true) do
      expired("listen on port " .. port)
    end
  end
end

--- The messages in one queue ("hold", "incoming", ...), read with
-- postcat(1): { {id=, sender= ("" for <>), recipients = {...}}, ... }.
function Instance:queue(name)
  local list = {}
  local p = assert(io.popen("find " .. H.shquote(self.dir .. "/queue/" .. name) .. " -type f"))
  for file in p:lines() do
    local ok, out = command("postcat -c " .. H.shquote(self.conf) .. " -e " .. H.shquote(file))
    assert(ok, out)
    local m = { id = file:match("([^/]+)$"), recipients = {} }
    for line in out:gmatch("[^\n]+") do
      local k, v = line:match("^(%w+): ?(.*)$")
      if k == "sender" then
        m.sender = v
      elseif k == "recipient" then
        m.recipients[#m.recipients + 1] = v
      end
    end
    list[#list + 1] = m
  end
  p:close()
  return list
end

return P
