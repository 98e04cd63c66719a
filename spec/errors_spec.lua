local core = require "luasmtp.core"
local H = require "spec.helper"

-- The README's table of error tokens, as { [token] = meaning }.
local function readme_tokens()
  local tokens, inside = {}, false
  for line in io.lines(H.root .. "/README.md") do
    if line:match("^%s*| token | meaning |") then
      inside = true
    elseif inside then
      local token, meaning = line:match("^%s*| `([%w_]+)` | (.-) |%s*$")
      if token then
        assert(tokens[token] == nil, "token listed twice in the README: " .. token)
        tokens[token] = meaning
      elseif not line:match("^%s*|%-") then
        break
      end
    end
  end
  return tokens
end

describe("error tokens", function()
  it("are listed in the README exactly as the registry holds them", function()
    local listed = readme_tokens()
    assert.is_not_nil(next(listed), "no token table found in the README")
    assert.same(core.errors, listed)
  end)

  it("are the only tokens the C core returns", function()
    -- every LS_E* token defined for the C code is in the registry
    local defined = {}
    for line in io.lines(H.root .. "/src/lib/errors.h") do
      local token = line:match('^#define LS_E%u+ "([%w_]+)"')
      if token then defined[token] = true end
    end
    for token in pairs(defined) do
      assert.is_string(core.errors[token], "not in the registry: " .. token)
    end
    for token in pairs(core.errors) do
      assert.is_true(defined[token], "no LS_E* definition: " .. token)
    end
  end)
end)
