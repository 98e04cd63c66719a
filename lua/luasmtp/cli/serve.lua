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
local luasmtp = require "luasmtp"
local server = require "luasmtp.server"

local M = {}

local USAGE = [[
usage: luasmtp serve [--drain SECONDS] SCRIPT.lua [ARGS...]
]]

function M.main(args)
  local drain = 30
  local i = 1
  while args[i] and args[i]:sub(1, 2) == "--" do
    if args[i] == "--drain" then
      drain = tonumber(args[i + 1]) or error("--drain needs a number")
      i = i + 2
    elseif args[i] == "--help" then
      io.stdout:write(USAGE)
      return 0
    else
      io.stderr:write("luasmtp serve: unknown option ", args[i], "\n", USAGE)
      return 64
    end
  end
  local script = args[i]
  if not script then
    io.stderr:write(USAGE)
    return 64
  end
  local chunk, err = loadfile(script)
  if not chunk then
    io.stderr:write("luasmtp serve: ", err, "\n")
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
    io.stderr:write("luasmtp serve: ", tostring(failure), "\n")
    return 70
  end

  local status = 0
  luasmtp.spawn(function()
    while true do
      local sig = luasmtp.wait_signal("TERM", "INT", "HUP")
      if sig == "HUP" then
        if control.reload then
          local rok, rerr = pcall(control.reload)
          io.stderr:write("luasmtp serve: reload ", rok and "done" or ("failed: " .. tostring(rerr)), "\n")
        else
          io.stderr:write("luasmtp serve: SIGHUP ignored: the script has no reload()\n")
        end
      else
        io.stderr:write("luasmtp serve: SIG", sig, ": stopping\n")
        if control.stop then pcall(control.stop) end
        server.shutdown_all(drain)
        local deadline = luasmtp.update_now() + drain + 3
        while server.sessions() > 0 and luasmtp.update_now() < deadline do
          luasmtp.sleep(0.05)
        end
        if server.sessions() > 0 then
          io.stderr:write("luasmtp serve: ", server.sessions(), " sessions still open after ", drain, " s\n")
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
