--- luasmtp.server.plugins: the built-in plugins, ordinary plugins a
-- server's `plugins = {...}` can list, reorder or leave out.
local limits = require "luasmtp.server.plugins.limits"
local relay = require "luasmtp.server.plugins.relay"
local submission = require "luasmtp.server.plugins.submission"
local early_talker = require "luasmtp.server.plugins.early_talker"
local http = require "luasmtp.server.plugins.http"
local received = require "luasmtp.server.plugins.received"
local stores = require "luasmtp.server.plugins.store"
local hooks = require "luasmtp.server.plugins.hooks"

local M = {
  limits = limits,
  relay = relay,
  submission = submission,
  early_talker = early_talker,
  http = http,
  received = received,
  maildir = stores.maildir,
  mbox = stores.mbox,
  hooks = hooks.plugin,
}

--- defaults(config) -> the chain a server gets without `plugins`, from
-- its options: submission, limits, early talker, HTTP rejection, the
-- hooks, the relay guard, the Received header.
function M.defaults(config)
  local list = {}
  if config.submission then list[#list + 1] = submission() end
  list[#list + 1] = limits(config.limits)
  if config.timeouts.greeting > 0 then
    list[#list + 1] = early_talker { pause = config.timeouts.greeting }
  end
  list[#list + 1] = http()
  if config.hooks then list[#list + 1] = hooks.plugin(config.hooks) end
  if config.relay then list[#list + 1] = relay(config.relay) end
  if config.received_header then list[#list + 1] = received() end
  return list
end

return M
