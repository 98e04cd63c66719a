local H = require "spec.helper"

-- Run bin/luasmtp with a clean environment (no LUA_PATH): it must find
-- the checkout's modules by itself.
local function luasmtp_cmd(args)
  local cmd = ("cd /tmp && env -u LUA_PATH -u LUA_CPATH -u LUA_PATH_5_4 -u LUA_CPATH_5_4 "
    .. "lua5.4 '%s/bin/luasmtp' %s 2>&1; echo \"exit=$?\""):format(H.root, args)
  local p = assert(io.popen(cmd))
  local out = p:read("a")
  p:close()
  local code = tonumber(out:match("exit=(%d+)%s*$"))
  return out:gsub("exit=%d+%s*$", ""), code
end

describe("bin/luasmtp", function()
  it("prints its version from any directory", function()
    local out, code = luasmtp_cmd("--version")
    assert.equal(0, code)
    assert.matches("^luasmtp %d+%.%d+%.%d+", out)
    assert.equal(out, (luasmtp_cmd("version")))
  end)

  it("prints help", function()
    local out, code = luasmtp_cmd("help")
    assert.equal(0, code)
    assert.matches("[Uu]sage", out)
  end)

  it("rejects an unknown command with exit status 64", function()
    local out, code = luasmtp_cmd("no-such-command")
    assert.equal(64, code)
    assert.matches("[Uu]sage", out)
  end)
end)
