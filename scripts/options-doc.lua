-- Print the README option tables from the schemas, or rewrite them in
-- place: lua5.4 scripts/options-doc.lua [--write README.md]
-- Each table sits between "<!-- options: NAME -->" and "<!-- /options -->".
local schemas = {
  server = function() return require("luasmtp.server").schema end,
  client = function() return require("luasmtp.client").schema end,
  serve = function() return require("luasmtp.net").serve_schema end,
  passwd_file = function() return require("luasmtp.credentials.passwd_file").schema end,
  dkim_signer = function() return require("luasmtp.dkim").signer_schema end,
  mtasts = function() return require("luasmtp.delivery.mtasts").schema end,
  tlsrpt = function() return require("luasmtp.delivery.tlsrpt").schema end,
  mailauth = function() return require("luasmtp.mailauth.plugin").schema end,
  dkim_sign = function() return require("luasmtp.mailauth.sign").schema end,
  dmarc = function() return require("luasmtp.mailauth.dmarc").schema end,
  redis = function() return require("luasmtp.redis").schema end,
  kv_redis = function() return require("luasmtp.kv.redis").schema end,
}

local M = {}

--- tables() -> { name = markdown }
function M.tables()
  local out = {}
  for name, get in pairs(schemas) do out[name] = get():markdown() end
  return out
end

--- rewrite(text) -> text with every marked table regenerated, and the
-- names of the markers found.
function M.rewrite(text)
  local tables, found = M.tables(), {}
  local new = text:gsub("(<!%-%- options: ([%w_]+) %-%->\n)(.-)(<!%-%- /options %-%->)", function(open, name, _, close)
    found[#found + 1] = name
    assert(tables[name], "unknown schema " .. name)
    return open .. tables[name] .. "\n" .. close
  end)
  return new, found
end

if arg and arg[0] and arg[0]:match("options%-doc%.lua$") then
  if arg[1] == "--write" then
    local path = arg[2] or "README.md"
    local f = assert(io.open(path, "rb"))
    local text = f:read("a")
    f:close()
    local new = M.rewrite(text)
    f = assert(io.open(path, "wb"))
    f:write(new)
    f:close()
  else
    for name, md in pairs(M.tables()) do print("<!-- options: " .. name .. " -->\n" .. md .. "\n<!-- /options -->\n") end
  end
end

return M
