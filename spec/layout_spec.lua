-- The C layout (README "Architecture"): src/lib is Lua-free, and each
-- binding reads only its own userdata (another binding's values are
-- reached through a C function of the owning file).
local H = require("spec.helper")

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local function c_files(dir)
  local p = assert(io.popen("ls '" .. dir .. "'"))
  local files = {}
  for name in p:lines() do
    if name:match("%.[ch]$") then files[#files + 1] = dir .. "/" .. name end
  end
  p:close()
  table.sort(files)
  return files
end

describe("C layout", function()
  it("src/lib has no Lua include and no Lua API call", function()
    local files = c_files(H.root .. "/src/lib")
    assert.is_true(#files >= 10)
    local found = {}
    for _, path in ipairs(files) do
      local src = read(path)
      for inc in src:gmatch('#%s*include%s*[<"]([^>"]+)[>"]') do
        if inc:match("^lua") or inc:match("lauxlib") or inc == "luasmtp.h" then
          found[#found + 1] = path .. ": #include " .. inc
        end
      end
      for call in src:gmatch("[%w_]*lua[L_][%w_]*%s*%(") do
        if call:match("^luaL?_") then found[#found + 1] = path .. ": " .. call end
      end
    end
    assert.same({}, found)
  end)

  it("each userdata metatable is named and checked in one binding only", function()
    local owner, uses = {}, {}
    for _, path in ipairs(c_files(H.root .. "/src")) do
      local src = read(path)
      for name, value in src:gmatch('#define%s+([%w_]+_MT)%s+"([^"]+)"') do
        assert.is_nil(owner[name], name .. " defined twice")
        assert.is_truthy(path:match("%.c$"), name .. " is defined in a header: " .. path)
        owner[name] = path
        assert.is_nil(owner[value], value .. " named twice")
        owner[value] = path
      end
      for name in src:gmatch("luaL_[ct][he][es][ct]k?udata%s*%([^,]+,[^,]+,%s*([%w_]+)") do
        uses[#uses + 1] = {path, name}
      end
    end
    assert.is_true(#uses > 0)
    for _, use in ipairs(uses) do
      -- Lua's own file handles (io library) belong to no binding here
      if use[2] ~= "LUA_FILEHANDLE" then
        assert.equal(owner[use[2]], use[1], use[1] .. " reads " .. use[2])
      end
    end
  end)
end)
