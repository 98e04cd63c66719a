--- luasmtp.delivery.mtasts: SMTP MTA Strict Transport Security (RFC 8461).
--
--   local mtasts = require "luasmtp.delivery.mtasts"
--   local sts = mtasts.new { cache_dir = "/var/lib/luasmtp/mta-sts" }
--   local policy, token, detail = sts:policy("example.com")
--   if policy and policy.mode == "enforce" and not mtasts.mx_matches(policy, mx) then ... end
--
-- policy(domain) looks up the TXT record _mta-sts.<domain> (exactly one
-- valid "v=STSv1" record), fetches the policy from
-- https://mta-sts.<domain>/.well-known/mta-sts.txt (PKIX verified, no
-- redirects, 64 KiB cap, a timeout), parses it strictly and caches it in
-- memory and in cache_dir for max_age seconds. The cached policy is
-- used while the TXT id is unchanged, and kept when a refresh fails or
-- the TXT record disappears, until it expires (RFC 8461 section 3.3).
--
-- Failures, as nil, token, detail:
--   "none"                    no MTA-STS: no or no valid TXT record
--   "dns"                     the TXT lookup failed (SERVFAIL, timeout)
--   "sts-webpki-invalid"      the HTTPS server's certificate did not verify
--   "sts-policy-fetch-error"  no HTTP 200 answer (connection, timeout,
--                             redirect, status, size)
--   "sts-policy-invalid"      the policy text is not a valid policy
-- The last three are TLS-RPT result types (RFC 8460 section 4.3). With
-- none of them is there a policy to apply: RFC 8461 section 5 has the
-- sender deliver as if the domain had no MTA-STS and report the failure.
local core = require "luasmtp.core"
local http = require "luasmtp.http"
local store = require "luasmtp.store"
local options = require "luasmtp.options"
local txt = require "luasmtp.delivery.txt"

local M = {}

M.MAX_POLICY_SIZE = 64 * 1024
M.MAX_AGE_LIMIT = 31557600
M.DEFAULT_TIMEOUT = 30

local CACHE_MAGIC = "luasmtp mta-sts cache 1"

-- ---------------------------------------------------------------------
-- Parsing

--- parse_txt(record) -> id | nil, why
-- One TXT record (RFC 8461 section 3.1):
--   v=STSv1; id=<1..32 alphanumerics>[; ext=value ...][;]
function M.parse_txt(record)
  local fields, why = txt.fields(record, "v=STSv1")
  if not fields then
    return nil, why
  end
  local id
  for _, f in ipairs(fields) do
    local name, value = f[1], f[2]
    -- sts-ext-value = 1*(%x21-3A / %x3C / %x3E-7E)
    if not value:match("^[!-:<>-~]+$") then
      return nil, "invalid value of " .. name
    end
    if name == "id" then
      if id then
        return nil, "more than one id"
      end
      if not value:match("^%w+$") or #value > 32 then
        return nil, "id must be 1 to 32 letters or digits"
      end
      id = value
    end
  end
  if not id then
    return nil, "no id"
  end
  return id
end

--- select_txt(records) -> id | nil, why
-- Of all TXT records, those starting with "v=STSv1" count; exactly one
-- must remain and be valid.
function M.select_txt(records)
  return txt.select(records, "v=STSv1", M.parse_txt)
end

local function valid_mx_pattern(p)
  local name = p:match("^%*%.(.+)$") or p
  return txt.domain(name) == name:lower() and not name:find("*", 1, true)
end

--- parse_policy(text) -> policy | nil, why
-- The policy file (RFC 8461 section 3.2): "key: value" lines ended by
-- CRLF or LF, "version: STSv1" first, then mode, max_age (at most
-- 31557600) and mx lines (required unless mode is "none"); other keys
-- are extensions and ignored. Returns
--   { version = "STSv1", mode =, max_age =, mx = { patterns... } }
function M.parse_policy(text)
  if type(text) ~= "string" then
    return nil, "not a string"
  end
  if #text > M.MAX_POLICY_SIZE then
    return nil, "policy larger than 64 KiB"
  end
  local policy = { mx = {} }
  local seen = {}
  local n = 0
  local pos = 1
  while pos <= #text do
    local line, next_pos = text:match("^([^\n]*)\n()", pos)
    if not line then
      line, next_pos = text:sub(pos), #text + 1
    end
    pos = next_pos
    line = line:gsub("\r$", "")
    n = n + 1
    if line:find("[%z\1-\8\10-\31\127]") then
      return nil, ("line %d: control character"):format(n)
    end
    local key, value = line:match("^([%w][%w_.-]*):[ \t]*(.-)[ \t]*$")
    if not key or #key > 32 then
      return nil, ("line %d: not a \"key: value\" field"):format(n)
    end
    if n == 1 and key ~= "version" then
      return nil, "the first field must be version"
    end
    if key == "version" or key == "mode" or key == "max_age" then
      if seen[key] then
        return nil, ("line %d: %s given twice"):format(n, key)
      end
      seen[key] = true
    end
    if key == "version" then
      if value ~= "STSv1" then
        return nil, "version must be STSv1"
      end
      policy.version = value
    elseif key == "mode" then
      if value ~= "enforce" and value ~= "testing" and value ~= "none" then
        return nil, "mode must be enforce, testing or none"
      end
      policy.mode = value
    elseif key == "max_age" then
      local age = value:match("^%d+$") and #value <= 10 and math.tointeger(tonumber(value))
      if not age or age > M.MAX_AGE_LIMIT then
        return nil, "max_age must be an integer from 0 to " .. M.MAX_AGE_LIMIT
      end
      policy.max_age = age
    elseif key == "mx" then
      if not valid_mx_pattern(value) then
        return nil, ("line %d: invalid mx pattern"):format(n)
      end
      policy.mx[#policy.mx + 1] = value:lower()
    elseif value ~= "" and not value:match("^[%g][%g \t]*$") then
      return nil, ("line %d: invalid extension value"):format(n)
    end
  end
  if not policy.version then
    return nil, "empty policy"
  end
  if not policy.mode then
    return nil, "no mode"
  end
  if not policy.max_age then
    return nil, "no max_age"
  end
  if #policy.mx == 0 and policy.mode ~= "none" then
    return nil, "no mx"
  end
  return policy
end

--- mx_matches(policy, host) -> bool
-- Does the MX host name match one of the policy's mx patterns? A
-- pattern "*.example.com" stands for exactly one more label
-- ("mx1.example.com", not "a.b.example.com" nor "example.com").
function M.mx_matches(policy, host)
  if type(host) ~= "string" then
    return false
  end
  host = host:lower():gsub("%.$", "")
  for _, pattern in ipairs(policy.mx or {}) do
    pattern = pattern:lower()
    local suffix = pattern:match("^%*(%..+)$")
    if suffix then
      local first = host:find(".", 1, true)
      if first and first > 1 and host:sub(first) == suffix then
        return true
      end
    elseif host == pattern then
      return true
    end
  end
  return false
end

-- ---------------------------------------------------------------------
-- The cache: in memory, and one file per domain in cache_dir.
--
-- File format: the magic line, "key: value" lines (domain, id, fetched,
-- expires), an empty line, then the policy text as fetched, parsed again
-- on load by parse_policy.

local function encode_cache(entry)
  return table.concat({
    CACHE_MAGIC,
    "domain: " .. entry.domain,
    "id: " .. entry.id,
    "fetched: " .. math.tointeger(entry.fetched),
    "expires: " .. math.tointeger(entry.expires),
    "",
    entry.text,
  }, "\n")
end

local function decode_cache(data, domain)
  local head, text = data:match("^(.-)\n\n(.*)$")
  if not head then
    return nil
  end
  local lines = {}
  for line in (head .. "\n"):gmatch("([^\n]*)\n") do
    lines[#lines + 1] = line
  end
  if lines[1] ~= CACHE_MAGIC then
    return nil
  end
  local fields = {}
  for i = 2, #lines do
    local k, v = lines[i]:match("^(%w+): (.*)$")
    if k then
      fields[k] = v
    end
  end
  local entry = {
    domain = fields.domain,
    id = fields.id,
    fetched = math.tointeger(tonumber(fields.fetched)),
    expires = math.tointeger(tonumber(fields.expires)),
    text = text,
  }
  if entry.domain ~= domain or not entry.id or not entry.fetched or not entry.expires then
    return nil
  end
  entry.policy = M.parse_policy(text)
  if not entry.policy then
    return nil
  end
  return entry
end

local STS = {}
STS.__index = STS

--- new{ ... } -> MTA-STS resolver
--   cache_dir     directory for the persistent cache (created; nil: memory only)
--   dns_query     DNS function (see luasmtp.delivery.txt; default luasmtp.dns.query
--                 or the resolve_txt fallback)
--   http_request  HTTP function (default luasmtp.http.request)
--   cafile, capath  trust anchors for the policy host (default: the system's)
--   timeout       seconds for the policy fetch (30)
--   port          policy host port (tests; default 443)
--   resolve       {"mta-sts.example.test:PORT:127.0.0.1"} (tests)
--   now           function returning the time in seconds (default luasmtp.time)
M.schema = options.schema("mtasts", {
  { "cache_dir", "string", nil, "directory of the persistent cache (created; without it the cache is in memory only)" },
  { "dns_query", "function", nil,
    "DNS function with the signature of `luasmtp.dns.query` (default: that module, or a fallback over `resolve_txt`)" },
  { "http_request", "function", nil, "HTTP function (default `luasmtp.http.request`)" },
  { "cafile", "string|boolean", nil, "trust anchors for the policy host (nil or false: the system's)" },
  { "capath", "string", nil, "a directory of trust anchors" },
  { "timeout", "number", M.DEFAULT_TIMEOUT, "policy fetch timeout, seconds" },
  { "port", "integer", nil, "port of `mta-sts.<domain>` (tests reach it on loopback)" },
  { "resolve", "table", nil,
    "libcurl resolve entries for the policy host, `{\"mta-sts.example.test:PORT:127.0.0.1\"}` (tests)" },
  { "now", "function", nil, "returns the time in seconds (default `luasmtp.time`)" },
})

function M.new(opts)
  opts = M.schema:apply(opts, 2)
  local self = setmetatable({
    cache_dir = opts.cache_dir,
    dns_query = opts.dns_query or txt.default_query(),
    http_request = opts.http_request or http.request,
    cafile = opts.cafile or nil,
    capath = opts.capath or nil,
    timeout = opts.timeout or M.DEFAULT_TIMEOUT,
    port = opts.port,
    resolve = opts.resolve,
    now = opts.now or core.time,
    memory = {},   -- domain -> cache entry
    inflight = {}, -- domain -> condition of a policy() under way
  }, STS)
  if self.port ~= nil then
    assert(math.tointeger(self.port) and self.port > 0 and self.port < 65536, "mtasts.new: invalid port")
  end
  if self.cache_dir then
    assert(type(self.cache_dir) == "string", "mtasts.new: cache_dir must be a string")
    assert(core.mkdir(self.cache_dir))
  end
  return self
end

function STS:cache_path(domain)
  return self.cache_dir and (self.cache_dir .. "/" .. domain)
end

--- The cached entry for domain (memory, else disk), expired or not.
function STS:cached(domain)
  local entry = self.memory[domain]
  if entry == nil and self.cache_dir then
    local f = io.open(self:cache_path(domain), "rb")
    if f then
      local data = f:read(M.MAX_POLICY_SIZE + 4096)
      f:close()
      entry = data and decode_cache(data, domain)
    end
    self.memory[domain] = entry or false
  end
  return entry or nil
end

function STS:store(entry)
  self.memory[entry.domain] = entry
  if self.cache_dir then
    local ok, _, detail = store.replace_file(self:cache_path(entry.domain), encode_cache(entry))
    if not ok then
      -- the policy still applies from memory; the next restart refetches it
      self.cache_error = detail
    end
  end
end

--- forget(domain): drop the cached policy (memory and disk).
function STS:forget(domain)
  domain = txt.domain(domain)
  if domain then
    self.memory[domain] = false
    if self.cache_dir then
      os.remove(self:cache_path(domain))
    end
  end
end

--- fetch(domain) -> text, policy | nil, token, detail
function STS:fetch(domain)
  local host = "mta-sts." .. domain
  local url = "https://" .. host .. (self.port and ":" .. math.tointeger(self.port) or "") ..
    "/.well-known/mta-sts.txt"
  local status, headers, body = self.http_request {
    url = url,
    timeout = self.timeout,
    max_size = M.MAX_POLICY_SIZE,
    follow_redirects = false,
    cafile = self.cafile,
    capath = self.capath,
    resolve = self.resolve,
  }
  if not status then
    local token, detail = headers, body
    if token == "tls" then
      return nil, "sts-webpki-invalid", url .. ": " .. tostring(detail)
    end
    return nil, "sts-policy-fetch-error", url .. ": " .. tostring(token) .. ": " .. tostring(detail)
  end
  if status >= 300 and status < 400 then
    return nil, "sts-policy-fetch-error", url .. ": redirect (HTTP " .. status .. ") not followed"
  end
  if status ~= 200 then
    return nil, "sts-policy-fetch-error", url .. ": HTTP " .. status
  end
  local ctype = (headers["content-type"] or ""):lower():match("^%s*([^;%s]+)")
  if ctype ~= "text/plain" then
    return nil, "sts-policy-invalid", url .. ": media type " .. tostring(ctype) .. ", not text/plain"
  end
  local policy, why = M.parse_policy(body)
  if not policy then
    return nil, "sts-policy-invalid", url .. ": " .. why
  end
  return body, policy
end

local function result(entry, source)
  local p = entry.policy
  return {
    mode = p.mode,
    mx = { table.unpack(p.mx) },
    max_age = p.max_age,
    id = entry.id,
    source = source,
    fetched = entry.fetched,
    expires = entry.expires,
    text = entry.text,
  }
end

function STS:resolve_policy(domain)
  local now = self.now()
  local entry = self:cached(domain)
  local fresh = entry and entry.expires > now and entry or nil
  local records, _, detail = txt.lookup(self.dns_query, "_mta-sts." .. domain)
  if not records then
    if fresh then
      return result(fresh, "cache")
    end
    return nil, "dns", detail
  end
  local id, why = M.select_txt(records)
  if not id then
    if fresh then -- a policy once seen outlives its TXT record until max_age
      return result(fresh, "cache")
    end
    return nil, "none", "_mta-sts." .. domain .. ": " .. why
  end
  if fresh and fresh.id == id then
    return result(fresh, "cache")
  end
  local text, policy_or_token, fetch_detail = self:fetch(domain)
  if not text then
    if fresh then
      local r = result(fresh, "cache")
      r.refresh_error = policy_or_token .. ": " .. fetch_detail
      return r
    end
    return nil, policy_or_token, fetch_detail
  end
  local fetched = math.floor(self.now())
  entry = {
    domain = domain,
    id = id,
    fetched = fetched,
    expires = fetched + policy_or_token.max_age,
    text = text,
    policy = policy_or_token,
  }
  self:store(entry)
  return result(entry, "fetched")
end

--- sts:policy(domain) -> policy | nil, token, detail
-- policy = { mode = "enforce"|"testing"|"none", mx = { patterns }, max_age =,
--            id =, source = "fetched"|"cache", fetched =, expires =, text =,
--            refresh_error = (a failed refresh; the cached policy applies) }
-- Waits (DNS and HTTPS). Concurrent calls for one domain share one
-- lookup.
function STS:policy(domain)
  local name = txt.domain(domain)
  if not name then
    return nil, "none", "invalid domain name"
  end
  local waiting = self.inflight[name]
  if waiting then
    waiting:wait(self.timeout + 30)
  end
  local cond = core.cond()
  self.inflight[name] = cond
  local ok, policy, token, detail = pcall(self.resolve_policy, self, name)
  if self.inflight[name] == cond then
    self.inflight[name] = nil
  end
  cond:broadcast()
  cond:close()
  if not ok then
    error(policy, 0)
  end
  return policy, token, detail
end

return M
