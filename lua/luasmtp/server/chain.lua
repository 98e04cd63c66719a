--- luasmtp.server.chain: policy as ordered plugin chains, one per phase.
--
-- A plugin is a table with a `name` and a function for each phase it
-- cares about: plugin.rcpt(session, address, params). The chain of a
-- phase calls them in order; each answers
--   nil, true or chain.CONTINUE   the next plugin runs
--   chain.ACCEPT                  the rest of the chain is skipped
--   a reply (or "450 4.7.1 text") the chain stops with that reply
--   false                         550 5.7.1
-- Every call has a deadline (plugin.timeouts[phase], plugin.timeout, the
-- server's phase_timeouts[phase], timeouts.plugin). Past it, or when it
-- raises, the call is abandoned (its waits are interrupted and a busy
-- loop is stopped by core.guarded, sockets it opened with luasmtp.connect
-- are closed) and the chain answers the phase's temporary failure.
local core = require "luasmtp.core"
local reply = require "luasmtp.reply"

local M = {}

--- The phases, in the order a session meets them. The first thirteen
-- are the milter stages; vrfy, expn and unknown are for those commands.
M.PHASES = { "connect", "helo", "starttls", "auth", "mail", "rcpt", "data", "headers", "body",
  "message", "deliver", "rset", "disconnect", "vrfy", "expn", "unknown" }
local IS_PHASE = {}
for _, p in ipairs(M.PHASES) do IS_PHASE[p] = true end
M.is_phase = IS_PHASE

M.CONTINUE = setmetatable({}, { __name = "luasmtp.CONTINUE", __tostring = function() return "CONTINUE" end })
M.ACCEPT = setmetatable({}, { __name = "luasmtp.ACCEPT", __tostring = function() return "ACCEPT" end })
local CONTINUE, ACCEPT = M.CONTINUE, M.ACCEPT
local guarded = core.guarded

--- The reply a phase gets when a plugin fails or runs out of time.
function M.failure_reply(phase)
  if phase == "connect" then
    return reply.new(421, "4.3.0", "Temporary failure, closing connection", { disconnect = true })
  end
  return reply.new(451, "4.3.0", "Temporary failure, try again later")
end

--- Check a plugin list. Each plugin is a table with a name; fields named
-- like phases must be functions.
function M.check(plugins)
  assert(type(plugins) == "table", "plugins must be a list")
  for i, p in ipairs(plugins) do
    assert(type(p) == "table", ("plugin %d is not a table"):format(i))
    assert(type(p.name) == "string", ("plugin %d has no name"):format(i))
    for k, v in pairs(p) do
      if IS_PHASE[k] then
        assert(type(v) == "function", ("plugin %s: %s must be a function"):format(p.name, k))
      end
    end
    assert(p.timeout == nil or type(p.timeout) == "number", "plugin " .. p.name .. ": timeout must be seconds")
    if p.timeouts then
      for phase, t in pairs(p.timeouts) do
        assert(IS_PHASE[phase], ("plugin %s: timeouts.%s is not a phase"):format(p.name, tostring(phase)))
        assert(type(t) == "number", ("plugin %s: timeouts.%s must be seconds"):format(p.name, phase))
      end
    end
  end
end

--- build(plugins, default_timeout, phase_timeouts) -> chains
-- chains[phase] = { {plugin, fn, timeout}, ... } for the phases some
-- plugin handles (a phase without plugins has no entry: a cheap check).
function M.build(plugins, default_timeout, phase_timeouts)
  M.check(plugins)
  phase_timeouts = phase_timeouts or {}
  local chains = {}
  for _, phase in ipairs(M.PHASES) do
    local list = {}
    for _, p in ipairs(plugins) do
      local fn = p[phase]
      if fn then
        local t = (p.timeouts and p.timeouts[phase]) or p.timeout or phase_timeouts[phase] or default_timeout
        list[#list + 1] = { plugin = p, fn = fn, timeout = t }
      end
    end
    if #list > 0 then chains[phase] = list end
  end
  return chains
end

local function to_reply(res, name)
  if type(res) == "string" then
    local r = reply.parse(res)
    if not r then
      error(("plugin %s returned a string that is not a reply: %q"):format(name, res), 0)
    end
    return r
  end
  if res == false then
    return reply.new(550, "5.7.1", "Rejected by policy")
  end
  if reply.is(res) then return res end
  error(("plugin %s must return nil, true, false, ACCEPT, a reply or a reply string, not %s")
    :format(name, tostring(res)), 0)
end

-- Sockets opened through luasmtp.connect during a plugin call belong to
-- it: when the call is abandoned they are closed. session.opened is the
-- list net.connect appends to in the session's task (net.track).
local function close_opened(opened, mark)
  for i = #opened, mark + 1, -1 do
    opened[i]:close()
    opened[i] = nil
  end
end

local function failed(session, entry, phase, err)
  if err == "timeout" then
    session:log("warning", "plugin %s: %s phase ran past its %g s deadline", entry.plugin.name, phase,
      entry.timeout)
  else
    session:log("error", "plugin %s: %s phase failed: %s", entry.plugin.name, phase, tostring(err))
  end
  return M.failure_reply(phase)
end

--- run(chains, phase, session, ...) -> nil | reply
-- nil: every plugin continued or one accepted (the caller's default
-- reply applies); a reply: a plugin decided, or failed.
function M.run(chains, phase, session, ...)
  local list = chains[phase]
  if not list then return nil end
  return M.run_list(list, phase, session, ...)
end

--- run_list(list, phase, session, ...): run(), given the phase's chain.
function M.run_list(list, phase, session, ...)
  local opened = session.opened
  for i = 1, #list do
    local entry = list[i]
    local mark = opened and #opened
    local ok, res = guarded(entry.timeout, entry.fn, session, ...)
    if opened and #opened > mark then
      if ok then
        -- what a call opened and kept is its own business now
        for j = #opened, mark + 1, -1 do opened[j] = nil end
      else
        close_opened(opened, mark)
      end
    end
    if not ok then
      return failed(session, entry, phase, res)
    end
    if res == ACCEPT then return nil end
    if res ~= nil and res ~= true and res ~= CONTINUE then
      local rok, r = pcall(to_reply, res, entry.plugin.name)
      if not rok then
        session:log("error", "%s", r)
        return M.failure_reply(phase)
      end
      return r
    end
  end
  return nil
end

return M
