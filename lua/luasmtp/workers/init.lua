--- luasmtp.workers: what a worker process of `luasmtp serve --workers`
-- knows about itself (see luasmtp.supervisor): its slot and generation,
-- the listening sockets the supervisor bound for it, and the channel to
-- the supervisor's counter service. Outside a worker, worker() is nil and
-- store() is nil: everything stays in the process.
--
--   local workers = require "luasmtp.workers"
--   if workers.worker() then print(workers.worker().slot) end
local core = require "luasmtp.core"
local supervisor_kv = require "luasmtp.kv.supervisor"

local M = {}

local state -- nil outside a worker

--- The key of a TCP address in the table of inherited listeners.
local function tcp_key(host, port)
  return (host:match("^%[(.*)%]$") or host) .. "|" .. tostring(port)
end

--- setup{slot=, generation=, channel=fd, inherit={ {fd=, spec=}... }}
-- (called by `luasmtp serve` in a worker, before the script runs):
-- adopts the inherited descriptors. -> true | nil, err, detail
function M.setup(info)
  local channel, err, detail = core.socket_fromfd(info.channel)
  if not channel then return nil, err, "channel: " .. tostring(detail) end
  state = {
    slot = info.slot,
    generation = info.generation,
    pid = (core.proc_ids()),
    channel = channel,
    by_spec = {}, -- spec text -> list of listeners
    by_address = {}, -- "host|port" -> listener
    taken = {}, -- listener -> true once a server took it
  }
  for _, inh in ipairs(info.inherit or {}) do
    local l, lerr, ldetail = core.listen_fromfd(inh.fd)
    if not l then return nil, lerr, ("inherited listener %s: %s"):format(inh.spec, tostring(ldetail)) end
    local list = state.by_spec[inh.spec] or {}
    state.by_spec[inh.spec] = list
    list[#list + 1] = l
    local addr, port = l:getsockname()
    if port then
      state.by_address[tcp_key(addr, port)] = l
    else
      state.by_address[addr] = l -- "unix:/path"
    end
  end
  return true
end

--- worker() -> {slot=, generation=, pid=} | nil outside a worker
function M.worker()
  return state
end

--- store() -> the counter service's kv store (luasmtp.kv.supervisor), nil
-- outside a worker. One per process: every server and limits plugin of
-- the worker shares it.
function M.store()
  if not state then return nil end
  if not state.store then
    state.store = supervisor_kv.new(state.channel, { on_error = state.on_error })
  end
  return state.store
end

--- inherited(text [, host, port]) -> list of listeners | nil
-- The listeners the supervisor bound for the listen spec `text` (as
-- given to `serve --listen`), or for its address (host, port; for a
-- UNIX socket text alone). Each is handed out once.
function M.inherited(text, host, port)
  if not state then return nil end
  local found = state.by_spec[text]
  if not found then
    local l = host and state.by_address[tcp_key(host, port)] or state.by_address[text]
    found = l and { l }
  end
  if not found then return nil end
  local out = {}
  for _, l in ipairs(found) do
    if not state.taken[l] then
      state.taken[l] = true
      out[#out + 1] = l
    end
  end
  return #out > 0 and out or nil
end

--- ready(): tell the supervisor the script has started (a rolling
-- reload waits for this before it retires the old generation).
-- -> true | nil, err, detail
function M.ready()
  local store = M.store()
  if not store then return true end
  local status, err, detail = store:request("ready")
  if not status then return nil, err, detail end
  return true
end

--- draining(): tell the supervisor this worker drains and will exit
-- (it is then not restarted). Does not wait.
function M.draining()
  local store = M.store()
  if store then store:request_no_answer("draining") end
end

return M
