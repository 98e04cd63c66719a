--- luasmtp.http: an asynchronous HTTP(S) client (libcurl's multi
-- interface on the loop, src/http.c).
--
--   local status, headers, body = luasmtp.http.request{
--     url = "https://api.example.org/check", method = "POST",
--     headers = { ["Content-Type"] = "application/json" }, body = json,
--     timeout = 10, max_size = 64 * 1024 }
--
-- request waits like every other call (the task yields; the main chunk
-- runs the loop) and returns status, headers, body, or nil, token,
-- detail with token "timeout", "dns", "refused", "unreachable", "tls",
-- "limit", "closed", "reset", "protocol" or "io". A 4xx or 5xx reply
-- is a status, not a failure. See README "HTTP client".
local core = require "luasmtp.core"

return {
  request = core.http_request,
}
