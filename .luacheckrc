-- luacheck configuration (Lua 5.4).
std = "lua54"
max_line_length = 120

-- Check every Lua file plus the command-line script, which has no
-- .lua suffix.
include_files = { "**/*.lua", "bin/luasmtp" }
exclude_files = { "build/**", "build-asan/**", "spec/tmp/**", "lua_modules/**", ".luarocks/**" }

-- busted's globals (describe, it, assert, ...) in the specs.
files["spec/"] = { std = "+busted" }
