-- Connect to an SMTP server, print its greeting and EHLO reply, upgrade
-- with STARTTLS when offered, and print the TLS session details.
--
--   lua5.4 examples/banner.lua HOST[:PORT] [CAFILE]
-- A plain script: every call waits in place, no tasks needed.
local luasmtp = require "luasmtp"

local host, port = assert(luasmtp.parse_address(arg[1] or "127.0.0.1:25", 25))
local tls = luasmtp.tls.context { mode = "client", cafile = arg[2] }

local sock = assert(luasmtp.connect(host, port, { timeout = 10 }))
sock:settimeout(10)

-- Read one (possibly multi-line) SMTP reply.
local function reply()
  local lines = {}
  repeat
    local line, err = sock:receiveline(1000)
    if not line then error("reading reply: " .. err) end
    lines[#lines + 1] = line
  until line:sub(4, 4) ~= "-"
  return lines
end

local function show(lines)
  for _, l in ipairs(lines) do print("S: " .. l) end
end

show(reply())
sock:send("EHLO banner.invalid\r\n")
local ehlo = reply()
show(ehlo)
for _, l in ipairs(ehlo) do
  if l:sub(5):upper() == "STARTTLS" then
    sock:send("STARTTLS\r\n")
    show(reply())
    assert(sock:starttls(tls, { servername = host }))
    local info = sock:tlsinfo()
    print(("TLS: %s %s, verified: %s"):format(info.version, info.cipher, tostring(info.verified)))
    if info.peer then print("peer: " .. info.peer.subject) end
    break
  end
end
sock:send("QUIT\r\n")
show(reply())
sock:close()
