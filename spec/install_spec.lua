local H = require "spec.helper"

describe("luarocks make", function()
  it("installs the module and the command offline into a tree", function()
    H.need("luarocks")
    local tree = H.tmp .. "/rocks"
    local cmd = ("cd '%s' && rm -rf '%s' && luarocks --lua-version=5.4 --tree='%s' make luasmtp-scm-1.rockspec "
      .. ">'%s/luarocks.log' 2>&1"):format(H.root, tree, tree, H.tmp)
    assert.is_true(os.execute(cmd), "luarocks make failed, see spec/tmp/luarocks.log")
    local check = ("cd /tmp && env -u LUA_PATH_5_4 -u LUA_CPATH_5_4 "
      .. "LUA_PATH='%s/share/lua/5.4/?.lua;%s/share/lua/5.4/?/init.lua;;' LUA_CPATH='%s/lib/lua/5.4/?.so;;' "
      .. "lua5.4 -e 'for _, m in ipairs { \"luasmtp.server\", \"luasmtp.client\", \"luasmtp.credentials\", "
      .. "\"luasmtp.sasl\" } do require(m) end print(require(\"luasmtp\").version)' "
      .. "&& '%s/bin/luasmtp' --version"):format(tree, tree, tree, tree)
    local p = assert(io.popen("(" .. check .. ") 2>&1"))
    local out = p:read("a")
    p:close()
    assert.matches("^%d+%.%d+%.%d+\nluasmtp %d+%.%d+%.%d+\n$", out)
  end)
end)
