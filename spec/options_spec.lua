-- One option schema per constructor: unknown options are refused, and
-- the README's option tables are the schemas' own.
local options = require "luasmtp.options"
local H = require "spec.helper"

local doc = dofile(H.root .. "/scripts/options-doc.lua")

describe("option schemas", function()
  local schema = options.schema("thing", {
    { "name", "string", "x", "a name" },
    { "count", "integer", 3, "how many" },
    { "flag", "boolean", false, "a flag" },
    { "either", "string|table", nil, "one or the other" },
    { name = "limits", fields = { { "max", "number", 1.5, "the most" } } },
  })

  it("merges defaults, nested groups included, into a fresh table", function()
    local a = schema:apply { count = 7, limits = { max = 2 } }
    assert.same({ name = "x", count = 7, flag = false, limits = { max = 2 } }, a)
    local b = schema:apply(nil)
    assert.same({ name = "x", count = 3, flag = false, limits = { max = 1.5 } }, b)
    b.limits.max = 9
    assert.equal(1.5, schema:apply({}).limits.max)
  end)

  it("refuses unknown names and wrong types, nested or not", function()
    assert.has_error(function() schema:apply { nmae = "y" } end, "thing: unknown option 'nmae'")
    assert.has_error(function() schema:apply { limits = { mx = 1 } } end, "thing.limits: unknown option 'mx'")
    assert.has_error(function() schema:apply { count = 1.5 } end, "thing: option 'count' must be integer, got number")
    assert.has_error(function() schema:apply { either = 1 } end)
    assert.has_error(function() schema:apply { limits = 1 } end)
  end)

  it("are what the README's option tables say", function()
    local f = assert(io.open(H.root .. "/README.md", "rb"))
    local readme = f:read("a")
    f:close()
    local regenerated, found = doc.rewrite(readme)
    table.sort(found)
    assert.same({ "client", "dkim_sign", "dkim_signer", "dmarc", "kv_redis", "mailauth", "mtasts", "passwd_file",
      "redis", "serve", "server", "tlsrpt" }, found)
    -- on failure: lua5.4 scripts/options-doc.lua --write README.md
    assert.equal(regenerated, readme)
  end)
end)
