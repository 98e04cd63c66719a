--- luasmtp.relay: the relay rule that keeps a server from being an open
-- relay (RFC 5321 section 7.9).
--
-- A recipient is accepted when its domain is one of ours, or when the
-- client may relay: it is in a trusted network, or it has authenticated.
-- Everything else gets 554 5.7.1.
local reply = require "luasmtp.reply"

local M = {}

--- Parse an IPv4 or IPv6 address into a 4- or 16-byte string, or nil.
function M.parse_ip(text)
  if type(text) ~= "string" then return nil end
  local a, b, c, d = text:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if a then
    local bytes = { tonumber(a), tonumber(b), tonumber(c), tonumber(d) }
    for _, v in ipairs(bytes) do
      if v > 255 then return nil end
    end
    return string.char(table.unpack(bytes))
  end
  if not text:find(":", 1, true) or text:find("[^%x:%.]") then return nil end
  -- IPv4-mapped tail
  local head, v4 = text:match("^(.*:)(%d+%.%d+%.%d+%.%d+)$")
  local tail = ""
  if head then
    local packed = M.parse_ip(v4)
    if not packed then return nil end
    tail = packed
    text = head .. "0:0" -- placeholder groups, replaced below
  end
  local left, right = text:match("^(.-)::(.*)$")
  local groups = {}
  local function add(part, into)
    if part == "" then return true end
    for g in (part .. ":"):gmatch("([^:]*):") do
      if not g:match("^%x%x?%x?%x?$") then return false end
      into[#into + 1] = tonumber(g, 16)
    end
    return true
  end
  if left then
    local l, r = {}, {}
    if not add(left, l) or not add(right, r) then return nil end
    if #l + #r > 7 then return nil end
    for _, v in ipairs(l) do groups[#groups + 1] = v end
    for _ = 1, 8 - #l - #r do groups[#groups + 1] = 0 end
    for _, v in ipairs(r) do groups[#groups + 1] = v end
  else
    if not add(text, groups) or #groups ~= 8 then return nil end
  end
  local out = {}
  for i, g in ipairs(groups) do
    out[i] = string.char(g >> 8, g & 0xff)
  end
  local packed = table.concat(out)
  if #tail == 4 then
    packed = packed:sub(1, 12) .. tail
  end
  return packed
end

--- Parse "10.0.0.0/8", "::1/128", "192.0.2.7" into a matcher function(ip).
function M.network(cidr)
  local addr, bits = cidr:match("^([^/]+)/(%d+)$")
  addr = addr or cidr
  local packed = assert(M.parse_ip(addr), "bad network address: " .. cidr)
  bits = tonumber(bits) or #packed * 8
  assert(bits <= #packed * 8, "bad prefix length: " .. cidr)
  return function(ip)
    local p = M.parse_ip(ip)
    if not p then return false end
    -- an IPv4-mapped IPv6 client matches IPv4 networks
    if #p == 16 and #packed == 4 and p:sub(1, 12) == ("\0"):rep(10) .. "\255\255" then
      p = p:sub(13)
    end
    if #p ~= #packed then return false end
    local full = bits // 8
    if p:sub(1, full) ~= packed:sub(1, full) then return false end
    local rest = bits % 8
    if rest == 0 then return true end
    local mask = (0xff << (8 - rest)) & 0xff
    return (p:byte(full + 1) & mask) == (packed:byte(full + 1) & mask)
  end
end

local function domain_of(address)
  local domain = address:match("@([^@]+)$")
  return domain and domain:lower():gsub("%.$", "")
end

--- checker{ domains = {...}, networks = {...}, authenticated = true }
-- -> function(session, recipient) -> nil (accept) | reply
-- domains: our domains (exact, or ".example.org" for subdomains).
-- networks: CIDR strings of clients that may relay.
-- authenticated: authenticated clients may relay (default true).
function M.checker(opts)
  local domains, suffixes, nets = {}, {}, {}
  for _, d in ipairs(opts.domains or {}) do
    d = d:lower()
    if d:sub(1, 1) == "." then suffixes[#suffixes + 1] = d else domains[d] = true end
  end
  for _, n in ipairs(opts.networks or {}) do
    nets[#nets + 1] = M.network(n)
  end
  local allow_auth = opts.authenticated ~= false
  local function local_domain(domain)
    if domains[domain] then return true end
    for _, suffix in ipairs(suffixes) do
      if domain:sub(-#suffix) == suffix then return true end
    end
    return false
  end
  return function(session, recipient)
    local domain = domain_of(recipient or "")
    if recipient and recipient:lower() == "postmaster" then
      return nil
    end
    if domain and local_domain(domain) then
      return nil
    end
    if allow_auth and session.user then
      return nil
    end
    local client = session.client_address
    for _, match in ipairs(nets) do
      if match(client) then return nil end
    end
    return reply.new(554, "5.7.1", "Relay access denied")
  end
end

return M
