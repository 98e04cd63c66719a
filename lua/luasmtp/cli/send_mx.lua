--- luasmtp send --mx: the message straight to each recipient domain's MX
-- hosts (luasmtp.delivery) instead of a smarthost.
--
--   --tls-policy LEVEL      none | may | encrypt | verify | dane (default) | dane-only
--   --dns-server ADDR[:PORT] use this resolver and trust its DNSSEC (AD) answers
--   --port PORT             delivery port (default 25; for tests)
--   --cafile FILE           PKIX trust for verify and MTA-STS
--   --mta-sts-cache DIR     MTA-STS policies (RFC 8461), cached in DIR
--
-- Exit status as for luasmtp send: 0 every recipient delivered, 69 when
-- one was refused permanently, else 75. Each undelivered recipient is
-- reported on standard error; -v also prints each decision trail.
local getopt = require "luasmtp.getopt"
local delivery = require "luasmtp.delivery"

local M = {}

local EX_OK, EX_UNAVAILABLE, EX_TEMPFAIL = 0, 69, 75

M.USAGE = [[
  --mx                  deliver to the recipients' MX hosts instead of --server
  --tls-policy LEVEL    with --mx: none | may | encrypt | verify | dane (default) | dane-only
  --dns-server ADDR[:PORT]  with --mx: use this resolver and trust its DNSSEC answers
  --port PORT           with --mx: the delivery port (default 25)
  --mta-sts-cache DIR   with --mx: apply MTA-STS policies, cached in DIR
]]

M.LONG = { mx = "flag", ["tls-policy"] = "string", ["dns-server"] = "string", port = "number",
  ["mta-sts-cache"] = "string" }

local function report(msg)
  io.stderr:write("luasmtp send: ", msg, "\n")
end

-- The resolver, pointed at --dns-server when given.
local function resolver(opts)
  local ok, dns = pcall(require, "luasmtp.dns")
  if not ok then
    report("--mx needs the luasmtp.dns module: " .. tostring(dns))
    return nil
  end
  if opts["dns-server"] then
    local server = opts["dns-server"]
    local host, port = require("luasmtp.net").parse_address(server, 53)
    if not host then getopt.usage_error("bad --dns-server: " .. server) end
    dns.configure { servers = { (host:find(":", 1, true) and ("[" .. host .. "]") or host) .. ":" .. port },
      trust_ad = true }
  end
  return dns
end

--- deliver(opts, message) -> exit status
-- opts: the parsed command line; message: { from, to, body, dsn,
-- timeouts, transcript, helo }.
function M.deliver(opts, message)
  local level = opts["tls-policy"] or delivery.DEFAULT_LEVEL
  if not delivery.LEVELS[level] then
    getopt.usage_error("--tls-policy must be none, may, encrypt, verify, dane or dane-only")
  end
  local port = opts.port or 25
  if port ~= math.floor(port) or port < 1 or port > 65535 then getopt.usage_error("bad --port") end
  local dns = resolver(opts)
  if not dns then return EX_TEMPFAIL end
  local mtasts
  if opts["mta-sts-cache"] then
    local ok, mod = pcall(require, "luasmtp.delivery.mtasts")
    if not ok then
      report("--mta-sts-cache needs luasmtp.delivery.mtasts: " .. tostring(mod))
      return EX_TEMPFAIL
    end
    mtasts = mod.new { cache_dir = opts["mta-sts-cache"], dns_query = dns.query, cafile = opts.cafile }
  end
  local res = delivery.deliver {
    from = message.from, to = message.to, body = message.body, dsn = message.dsn,
    helo = message.helo, timeouts = message.timeouts, transcript = message.transcript,
    port = math.tointeger(port), tls_policy = level, dns = dns, mtasts = mtasts,
    cafile = opts.cafile,
  }
  local permanent, trails = false, {}
  for _, r in ipairs(res.recipients) do
    if opts.v and not trails[r.trail] then
      trails[r.trail] = true
      for _, e in ipairs(r.trail) do io.stderr:write("--- ", r.domain, ": ", e.text, "\n") end
    end
    if not r.ok then
      report(("<%s>: %s"):format(r.address, tostring(r.text)))
      if r.permanent then permanent = true end
    end
  end
  if res.ok then return EX_OK end
  return permanent and EX_UNAVAILABLE or EX_TEMPFAIL
end

return M
