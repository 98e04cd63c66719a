--- Built-in plugins: deliver accepted messages to a Maildir or an mbox
-- (luasmtp.store), in the deliver phase. Their directory is where large
-- bodies are spooled while they arrive, so the spool and the mail share
-- one file system.
--
--   plugins.maildir("var/mail"), plugins.mbox("var/mbox")
local store = require "luasmtp.store"

local M = {}

local function plugin(name, target, spool_dir)
  return {
    name = name,
    store = target,
    spool_dir = spool_dir,
    deliver = function(_, message)
      local ok, failure = target:deliver(message)
      if not ok then return failure end
    end,
  }
end

function M.maildir(dir)
  local md = store.maildir(dir)
  return plugin("maildir", md, dir .. "/tmp")
end

function M.mbox(path)
  return plugin("mbox", store.mbox(path), path:match("^(.*)/[^/]*$") or ".")
end

return M
