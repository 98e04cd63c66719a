--- A private Dovecot for the specs: LMTP only, on a UNIX socket, with its
-- own configuration, base_dir, state_dir, log, passwd-file users and
-- Maildirs in a temporary directory. dovecot(1) runs in the foreground
-- under timeout(1), so it stops by itself. Needs root (the master hands
-- its services to the dovecot users) and the package dovecot-lmtpd.
--
--   local dc = dovecot.start { users = { "bob@example.test" } }   -- inside a task
--   ... dc.lmtp (the LMTP socket path) ...
--   dc:maildir("bob@example.test")   -- { {name=, data=}, ... } from new/
--   dc:stop()                        -- D.cleanup() stops what a failed test left
local luasmtp = require "luasmtp"
local H = require "spec.helper"
local daemon = require "spec.daemon"

local D = { cleanup = daemon.cleanup }

local Instance = { stop = daemon.stop, logtext = daemon.logtext }
Instance.__index = Instance

-- Mail is stored as nobody: Dovecot does not deliver as root.
local MAIL_UID, MAIL_GID = 65534, 65534

--- start(opts) -> instance (inside a task). opts: `users` (addresses
-- that have a mailbox), `lifetime` (seconds, default 60).
function D.start(opts)
  opts = opts or {}
  local self = daemon.new("dovecot", Instance)
  local dir = self.dir
  self.log, self.lmtp, self.homes = dir .. "/dovecot.log", dir .. "/run/lmtp", {}
  for _, d in ipairs { "run", "state", "mail" } do H.mkdir(dir .. "/" .. d) end
  assert(os.execute(("chown %d:%d %s"):format(MAIL_UID, MAIL_GID, H.shquote(dir .. "/mail"))))
  local users = {}
  for i, u in ipairs(opts.users or {}) do
    local home = ("%s/mail/user%d"):format(dir, i)
    self.homes[u] = home
    users[#users + 1] = ("%s:{PLAIN}unused:%d:%d::%s::"):format(u, MAIL_UID, MAIL_GID, home)
  end
  local f = assert(io.open(dir .. "/users", "w"))
  f:write(table.concat(users, "\n"), "\n")
  f:close()
  local conf = table.concat({
    "base_dir = " .. dir .. "/run",
    "state_dir = " .. dir .. "/state",
    "log_path = " .. self.log,
    "protocols = lmtp",
    "listen = 127.0.0.1", -- no TCP listener is configured; this only keeps "::" out
    "ssl = no",
    "passdb {", "  driver = passwd-file", "  args = " .. dir .. "/users", "}",
    "userdb {", "  driver = passwd-file", "  args = " .. dir .. "/users", "}",
    "mail_location = maildir:~/Maildir",
    "service lmtp {", "  unix_listener lmtp {", "    mode = 0666", "  }", "}",
    "",
  }, "\n")
  f = assert(io.open(dir .. "/dovecot.conf", "w"))
  f:write(conf)
  f:close()
  daemon.run(self, "dovecot -F -c " .. H.shquote(dir .. "/dovecot.conf"), opts.lifetime)
  -- ready when the LMTP socket accepts
  local deadline = luasmtp.update_now() + 15
  while true do
    local s = luasmtp.connect_unix(self.lmtp, { timeout = 1 })
    if s then
      s:close()
      break
    end
    if luasmtp.update_now() > deadline then
      error("Dovecot did not start: " .. self:logtext())
    end
    luasmtp.sleep(0.05)
  end
  return self
end

--- The messages in a user's Maildir new/: { {name=, data=}, ... }.
function Instance:maildir(user)
  local list = {}
  local new = assert(self.homes[user], "no such user") .. "/Maildir/new"
  local p = assert(io.popen("ls " .. H.shquote(new) .. " 2>/dev/null"))
  for name in p:lines() do
    list[#list + 1] = { name = name, data = H.readfile(new .. "/" .. name) }
  end
  p:close()
  return list
end

return D
