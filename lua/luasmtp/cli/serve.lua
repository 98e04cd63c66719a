--- luasmtp serve SCRIPT.lua [ARGS...]
--
-- Runs a server script as a task. The script sees its own arguments in
-- `arg` (arg[0] is the script) and as `...`. It may return a table with
-- `reload()` (called on SIGHUP) and `stop()` (called on SIGTERM/SIGINT
-- before the servers stop accepting).
-- SIGTERM/SIGINT: every server stops accepting; sessions waiting for a
-- command get 421 4.3.2 and close at once, busy ones finish their
-- command, or get the 421 after --drain seconds (default 30); then the
-- process exits.
--
-- With --workers N a supervisor (luasmtp.supervisor) binds the --listen
-- addresses, drops privileges to --user/--group and runs N worker
-- processes of this same command (the hidden options --worker, --channel
-- and --inherit tell a worker what it inherited).
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"

local M = {}

local USAGE = [[
usage: luasmtp serve [OPTIONS] SCRIPT.lua [ARGS...]
  --drain SECONDS        on SIGTERM, busy sessions get this long (30)
  --workers N            a supervisor and N worker processes, each running
                         the script; SIGHUP replaces them (rolling reload),
                         SIGUSR1 writes their status
  --listen ADDR          (with --workers) bind ADDR in the supervisor before
                         privileges are dropped; a server.new{listen=ADDR}
                         in the workers takes that socket (repeatable)
  --user USER            (with --workers) drop to USER after binding
  --group GROUP          (with --workers) and to GROUP (default: USER's)
  --reuseport            (with --workers) the supervisor binds each --listen
                         TCP address once per worker (SO_REUSEPORT) instead
                         of one socket that every worker accepts from
  --store-on-error open|closed
                         (with --workers) what the limits do when the
                         supervisor's counter service fails (open)
]]

local function usage_error(msg)
  io.stderr:write("luasmtp serve: ", msg, "\n", USAGE)
  return 64
end

function M.main(args)
  local drain = 30
  local opts = { listen = {}, inherit = {} }
  -- options that take a value: name -> how to store it
  local function positive_int(v) local n = math.tointeger(tonumber(v)) return n and n > 0 and n or nil end
  local with_value = {
    ["--drain"] = function(v) drain = tonumber(v) return drain end,
    ["--workers"] = function(v) opts.workers = positive_int(v) return opts.workers end,
    ["--listen"] = function(v) opts.listen[#opts.listen + 1] = v return v end,
    ["--user"] = function(v) opts.user = v return v end,
    ["--group"] = function(v) opts.group = v return v end,
    ["--store-on-error"] = function(v)
      opts.on_error = (v == "open" or v == "closed") and v or nil
      return opts.on_error
    end,
    ["--worker"] = function(v)
      local slot, gen = v:match("^(%d+):(%d+)$")
      opts.worker = slot and { slot = math.tointeger(tonumber(slot)), generation = math.tointeger(tonumber(gen)) }
      return opts.worker
    end,
    ["--channel"] = function(v) opts.channel = positive_int(v) return opts.channel end,
    ["--inherit"] = function(v)
      local fd, spec = v:match("^(%d+)=(.+)$")
      if fd then opts.inherit[#opts.inherit + 1] = { fd = math.tointeger(tonumber(fd)), spec = spec } end
      return fd
    end,
  }
  local i = 1
  while args[i] and args[i]:sub(1, 2) == "--" do
    local set = with_value[args[i]]
    if set then
      if args[i + 1] == nil or not set(args[i + 1]) then
        return usage_error(args[i] .. " needs a valid value")
      end
      i = i + 2
    elseif args[i] == "--reuseport" then
      opts.reuseport = true
      i = i + 1
    elseif args[i] == "--help" then
      io.stdout:write(USAGE)
      return 0
    else
      return usage_error("unknown option " .. args[i])
    end
  end
  local script = args[i]
  if not script then
    io.stderr:write(USAGE)
    return 64
  end
  if not opts.workers and (#opts.listen > 0 or opts.user or opts.group or opts.reuseport) then
    return usage_error("--listen, --reuseport, --user and --group go with --workers")
  end
  if opts.workers then
    return require("luasmtp.supervisor").run {
      workers = opts.workers, listen = opts.listen, user = opts.user, group = opts.group,
      drain = drain, script = script, script_args = table.move(args, i + 1, #args, 1, {}),
      program = _G.arg and _G.arg[0], on_error = opts.on_error, reuseport = opts.reuseport,
    }
  end
  -- a worker's lines say which worker wrote them; each line is one
  -- write (stderr is unbuffered: a write per piece would let the lines
  -- of workers sharing it cut into each other)
  local prefix = "luasmtp serve: "
  local function say(...)
    local parts = { prefix }
    for k = 1, select("#", ...) do parts[#parts + 1] = tostring((select(k, ...))) end
    io.stderr:write(table.concat(parts))
  end
  local workers
  if opts.worker then
    prefix = ("luasmtp serve: worker %d (pid %d): "):format(opts.worker.slot, (require("luasmtp.core").proc_ids()))
    workers = require "luasmtp.workers"
    local ok, err, detail = workers.setup {
      slot = opts.worker.slot, generation = opts.worker.generation, channel = opts.channel,
      inherit = opts.inherit, on_error = opts.on_error,
    }
    if not ok then
      say(tostring(detail or err), "\n")
      return 71
    end
  end
  local chunk, err = loadfile(script)
  if not chunk then
    say(err, "\n")
    return 66
  end
  local script_args = table.move(args, i + 1, #args, 1, {})
  _G.arg = table.move(args, i + 1, #args, 1, { [0] = script })

  local control = {}
  local main = luasmtp.spawn(function()
    local res = chunk(table.unpack(script_args))
    if type(res) == "table" then control = res end
  end)
  local ok, failure = main:join()
  if not ok then
    say(tostring(failure), "\n")
    return 70
  end
  if workers then
    local rok, rerr, rdetail = workers.ready()
    if not rok then
      say("telling the supervisor: ", tostring(rdetail or rerr), "\n")
    end
  end

  local status = 0
  luasmtp.spawn(function()
    while true do
      local sig = luasmtp.wait_signal("TERM", "INT", "HUP")
      if sig == "HUP" then
        if control.reload then
          local rok, rerr = pcall(control.reload)
          say("reload ", rok and "done" or ("failed: " .. tostring(rerr)), "\n")
        else
          say("SIGHUP ignored: the script has no reload()\n")
        end
      else
        say("SIG", sig, ": stopping\n")
        if workers then workers.draining() end
        if control.stop then pcall(control.stop) end
        server.shutdown_all(drain)
        local deadline = luasmtp.update_now() + drain + 3
        while server.sessions() > 0 and luasmtp.update_now() < deadline do
          luasmtp.sleep(0.05)
        end
        if server.sessions() > 0 then
          say(server.sessions(), " sessions still open after ", drain, " s\n")
          status = 1
        end
        os.exit(status, true)
      end
    end
  end)
  luasmtp.run()
  return status
end

return M
