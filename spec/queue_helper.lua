--- Helpers the queue specs share: a queue with short test timings, a
-- bounded wait, a directory's sorted names, how often each Message-ID
-- arrived, a receiving server and a smarthost route to it, the
-- `luasmtp queue` tool, and the queue child process (spec/queue_child.lua).
local luasmtp = require "luasmtp"
local core = require "luasmtp.core"
local queue = require "luasmtp.queue"
local H = require "spec.helper"

local Q = {}

--- open(dir [, opts]) -> a queue: retries after 0.2 s, no jitter, a
-- 0.1 s tick, quiet unless QUEUE_DEBUG is set; opts override.
function Q.open(dir, opts)
  local o = { dir = dir, retry = { 0.2 }, jitter = 0, tick = 0.1,
    log = os.getenv("QUEUE_DEBUG") and print or function() end }
  for k, v in pairs(opts or {}) do o[k] = v end
  return assert(queue.open(o))
end

--- until_true(fn, what [, timeout]): wait (20 s at most) until fn() holds.
function Q.until_true(fn, what, timeout)
  local deadline = luasmtp.update_now() + (timeout or 20)
  while not fn() do
    if luasmtp.update_now() > deadline then error("timed out waiting for " .. what, 2) end
    luasmtp.sleep(0.05)
  end
end

--- names(dir) -> the names in dir, sorted ({} when it does not exist)
function Q.names(dir)
  local list = core.listdir(dir) or {}
  table.sort(list)
  return list
end

--- ids_of(got) -> { [Message-ID] = times it arrived } of got.messages
function Q.ids_of(got)
  local seen = {}
  for _, m in ipairs(got.messages) do
    local id = assert(m.data:match("Message%-ID: <([^>]+)>"))
    seen[id] = (seen[id] or 0) + 1
  end
  return seen
end

--- receiver([hooks]) -> server, port, got: a receiving server (luasmtp's
-- own, hostname sink.test, closed by H.close_servers) that records every
-- message it accepted in got.messages as { from, rcpt, data, user };
-- got.attempts counts the DATA it saw. hooks.connect / hooks.rcpt /
-- hooks.data(s, data, attempt) may answer otherwise; hooks.auth turns
-- on AUTH (plaintext allowed); hooks.received_header = false adds none.
function Q.receiver(hooks)
  hooks = hooks or {}
  local got = { messages = {}, attempts = 0 }
  local srv, port = H.smtp_server {
    hostname = "sink.test", received_header = hooks.received_header,
    auth = hooks.auth, allow_plaintext_auth = hooks.auth and true or nil,
    hooks = {
      on_connect = hooks.connect,
      on_rcpt = hooks.rcpt,
      on_data = function(s, m)
        got.attempts = got.attempts + 1
        local data = m:read()
        local r = hooks.data and hooks.data(s, data, got.attempts)
        if r == nil then
          local rcpt = {}
          for i, a in ipairs(m.rcpt) do rcpt[i] = a end
          got.messages[#got.messages + 1] = { from = m.from, rcpt = rcpt, data = data, user = s.user }
        end
        return r
      end,
    },
  }
  return srv, port, got
end

--- smarthost(port [, extra]) -> a route function: every recipient to
-- 127.0.0.1:port without TLS (extra fields added to the route).
function Q.smarthost(port, extra)
  return function()
    local r = { kind = "smarthost", host = "127.0.0.1", port = port, tls = "none" }
    for k, v in pairs(extra or {}) do r[k] = v end
    return r
  end
end

--- tool(dir, args) -> its output, whether it succeeded: the real
-- `luasmtp queue --dir DIR ARGS` (blocks the loop while it runs: it reads
-- files, it needs nothing of this process).
function Q.tool(dir, args)
  local p = assert(io.popen("lua5.4 " .. H.shquote(H.root .. "/bin/luasmtp") .. " queue --dir "
    .. H.shquote(dir) .. " " .. args .. " 2>&1"))
  local text = p:read("a")
  local ok = p:close()
  return text, ok
end

--- run_child(dir, port, n, crash, tag [, wait]) -> its log, its pid
-- spec/queue_child.lua on dir (crash: a LUASMTP_QUEUE_CRASH point, or
-- nil), once it has exited (within wait seconds, default 40).
function Q.run_child(dir, port, n, crash, tag, wait)
  local env = crash and ("LUASMTP_QUEUE_CRASH=" .. crash .. " ") or ""
  local log = H.tmp .. "/queue-child-" .. tag .. ".log"
  local pid = H.start(env .. "lua5.4 " .. H.shquote(H.root .. "/spec/queue_child.lua") .. " " .. H.shquote(dir)
    .. " " .. port .. " " .. n, log)
  assert(H.wait_pid(pid, wait or 40), "the queue process did not exit")
  return H.readfile(log), pid
end

return Q
