--- bench/dkim.lua: luasmtp's side of the DKIM benchmark (bench/dkim.sh).
--   lua5.4 bench/dkim.lua sign KEY.pem MESSAGE COUNT
--   lua5.4 bench/dkim.lua verify KEYS MESSAGE COUNT
-- The message is read once; each round signs or verifies it whole.
local dkim = require "luasmtp.dkim"

local mode, keyfile, msgfile, count = arg[1], arg[2], arg[3], tonumber(arg[4])
local f = assert(io.open(msgfile, "rb"))
local message = f:read("a")
f:close()

if mode == "sign" then
  f = assert(io.open(keyfile, "rb"))
  local pem = f:read("a")
  f:close()
  local opts = { domain = "example.org", selector = "r", key = pem }
  for _ = 1, count do dkim.sign_message(message, opts) end
else
  local keys = {}
  for line in io.lines(keyfile) do
    local name, txt = line:match("^(%S+) (.*)$")
    keys[name] = txt
  end
  local function query(name) return { answers = { keys[name] } } end
  local results
  for _ = 1, count do results = dkim.verify_message(message, { query = query }) end
  for _, r in ipairs(results) do print(r.result, r.reason) end
end
