--- What the private daemons of the specs (spec/postfix.lua,
-- spec/dovecot.lua) share: a temporary directory of their own, the daemon
-- in the foreground under timeout(1) so that it ends by itself, stopped
-- by pid after each test (also a failed one), and its log.
local H = require "spec.helper"

local D = {}

local running = {} -- instances not yet stopped, for D.cleanup()

--- command(cmd) -> ok, output (stdout and stderr)
function D.command(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  return ok, out
end

--- new(name, class) -> instance with instance.dir: a new directory
-- /tmp/luasmtp-NAME-XXXXXX (short, for UNIX socket paths), which the
-- daemon's own users may enter. Daemons that drop privileges need root.
function D.new(name, class)
  assert(select(2, D.command("id -u")):match("^0\n"), "a private " .. name .. " needs root")
  local ok, out = D.command("mktemp -d /tmp/luasmtp-" .. name .. "-XXXXXX")
  assert(ok, out)
  local dir = out:gsub("%s+$", "")
  assert(os.execute("chmod 755 " .. H.shquote(dir)))
  local self = setmetatable({ dir = dir }, class)
  running[self] = true
  return self
end

--- run(instance, cmd, lifetime): start cmd (the daemon, in the foreground)
-- under timeout(1); its output goes to DIR/daemon.out.
function D.run(self, cmd, lifetime)
  -- the daemon is not the code under test: no sanitizer runtime preloaded
  self.pid = H.start(("exec env -u LD_PRELOAD timeout %d %s"):format(lifetime or 60, cmd),
    self.dir .. "/daemon.out")
end

--- logtext(instance) -> the daemon's log so far (instance.log) and what
-- it wrote to its output.
function D.logtext(self)
  local parts = {}
  for _, file in ipairs { self.dir .. "/daemon.out", self.log } do
    local f = io.open(file)
    if f then
      parts[#parts + 1] = f:read("a")
      f:close()
    end
  end
  return table.concat(parts)
end

--- stop(instance): stop the daemon (timeout(1) passes the signal on), wait
-- for it and remove its directory.
function D.stop(self)
  if not running[self] then return end
  running[self] = nil
  if self.pid then
    H.kill(self.pid)
    H.wait_pid(self.pid, 10)
  end
  os.execute("rm -rf " .. H.shquote(self.dir))
end

--- Stop every instance still running.
function D.cleanup()
  for inst in pairs(running) do D.stop(inst) end
end

return D
