--- luasmtp.mailauth.spf: Sender Policy Framework (RFC 7208), evaluated
-- on the asynchronous DNS.
--
--   local spf = require "luasmtp.mailauth.spf"
--   local result, detail = spf.check { ip = "192.0.2.7", sender = "alice@example.org",
--                                      helo = "mx.example.org" }
--   -- result: "none" | "neutral" | "pass" | "fail" | "softfail" | "temperror" | "permerror"
--
-- check_host() of section 4: the record of the domain is fetched, every
-- term parsed before any is evaluated (a syntax error anywhere is a
-- permerror), then the mechanisms are tried in order. The limits of
-- section 4.6.4 hold over the whole evaluation, includes and redirects
-- included: at most 10 terms that query DNS (include, a, mx, ptr,
-- exists, redirect), at most 10 MX names per mx, at most 10 PTR names
-- looked at per ptr or %{p}, and at most 2 void lookups (a query with
-- no answer: NXDOMAIN or NODATA; each such query counts, exp= excepted).
-- A DNS failure (SERVFAIL, timeout) is a temperror, except inside ptr
-- and %{p}, where section 5.5 says to skip the name.
local relay = require "luasmtp.relay"

local M = {}

M.MAX_DNS_TERMS = 10
M.MAX_VOID_LOOKUPS = 2
M.MAX_MX_NAMES = 10
M.MAX_PTR_NAMES = 10

local QUALIFIERS = { ["+"] = "pass", ["-"] = "fail", ["~"] = "softfail", ["?"] = "neutral" }

-- An evaluation stops with a permerror or temperror by raising one of
-- these; check() catches only them.
local Stop = {}
Stop.__index = Stop

local function stop(result, detail)
  error(setmetatable({ result = result, detail = detail }, Stop), 0)
end

-- ---------------------------------------------------------------------
-- Addresses

-- The 4- or 16-byte form of an address; an IPv4-mapped IPv6 address is
-- its IPv4 address (section 5: "ip4" and "a" match it).
local function packed_ip(text)
  local p = relay.parse_ip(text)
  if p and #p == 16 and p:sub(1, 12) == ("\0"):rep(10) .. "\255\255" then
    p = p:sub(13)
  end
  return p
end

local function in_prefix(a, b, bits)
  if not a or not b or #a ~= #b then
    return false
  end
  local full = bits // 8
  if a:sub(1, full) ~= b:sub(1, full) then
    return false
  end
  local rest = bits % 8
  if rest == 0 then
    return true
  end
  local mask = (0xff << (8 - rest)) & 0xff
  return (a:byte(full + 1) & mask) == (b:byte(full + 1) & mask)
end

-- ip4-network: four decimal octets without leading zeros.
local function parse_ip4(text)
  local parts = { text:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$") }
  if #parts ~= 4 then
    return nil
  end
  for _, p in ipairs(parts) do
    if (#p > 1 and p:sub(1, 1) == "0") or tonumber(p) > 255 then
      return nil
    end
  end
  return relay.parse_ip(text)
end

-- The dotted forms of %{i}: "192.0.2.1", or 32 nibbles for IPv6.
local function dotted_ip(packed)
  if #packed == 4 then
    return ("%d.%d.%d.%d"):format(packed:byte(1, 4))
  end
  local nibbles = {}
  for i = 1, 16 do
    local b = packed:byte(i)
    nibbles[#nibbles + 1] = ("%x"):format(b >> 4)
    nibbles[#nibbles + 1] = ("%x"):format(b & 15)
  end
  return table.concat(nibbles, ".")
end

-- The name a PTR query for the address asks (in-addr.arpa / ip6.arpa).
local function reverse_name(packed)
  local parts = {}
  for part in dotted_ip(packed):gmatch("[^.]+") do
    table.insert(parts, 1, part)
  end
  return table.concat(parts, ".") .. (#packed == 4 and ".in-addr.arpa" or ".ip6.arpa")
end

-- ---------------------------------------------------------------------
-- Macros (section 7)

local MACRO_LETTERS = "slodipvh"
local EXP_LETTERS = "slodipvhcrt"

-- parse_macro(text, exp) -> tokens | nil, why. Tokens are literal
-- strings and { letter =, upper =, digits =, reverse =, delimiters = }.
local function parse_macro(text, exp)
  local tokens, pos = {}, 1
  local letters = exp and EXP_LETTERS or MACRO_LETTERS
  while pos <= #text do
    local pct = text:find("%", pos, true)
    if not pct then
      tokens[#tokens + 1] = text:sub(pos)
      break
    end
    if pct > pos then
      tokens[#tokens + 1] = text:sub(pos, pct - 1)
    end
    local c = text:sub(pct + 1, pct + 1)
    if c == "%" then
      tokens[#tokens + 1] = "%"
      pos = pct + 2
    elseif c == "_" then
      tokens[#tokens + 1] = " "
      pos = pct + 2
    elseif c == "-" then
      tokens[#tokens + 1] = "%20"
      pos = pct + 2
    elseif c == "{" then
      local letter, digits, rev, delims, close = text:match("^(%a)(%d*)([rR]?)([%.%-%+,/_=]*)()}", pct + 2)
      if not letter then
        return nil, "invalid macro at " .. text:sub(pct, pct + 15)
      end
      if not letters:find(letter:lower(), 1, true) then
        return nil, "macro letter " .. letter .. " not allowed here"
      end
      local n = digits ~= "" and tonumber(digits) or nil
      if n == 0 or (n and n > 128) then
        return nil, "invalid macro digits in " .. text:sub(pct, close)
      end
      tokens[#tokens + 1] = {
        letter = letter:lower(), upper = letter ~= letter:lower(), digits = n,
        reverse = rev ~= "", delimiters = delims ~= "" and delims or ".",
      }
      pos = close + 1
    else
      return nil, "invalid '%' in " .. text
    end
  end
  return tokens
end

local function url_escape(s)
  return (s:gsub("[^%w%-%._~]", function(c)
    return ("%%%02X"):format(c:byte())
  end))
end

local function transform(value, t)
  local delimiter = {}
  for c in t.delimiters:gmatch(".") do
    delimiter[c] = true
  end
  local parts, start = {}, 1
  for i = 1, #value do
    if delimiter[value:sub(i, i)] then
      parts[#parts + 1] = value:sub(start, i - 1)
      start = i + 1
    end
  end
  parts[#parts + 1] = value:sub(start)
  if t.reverse then
    local r = {}
    for i = #parts, 1, -1 do
      r[#r + 1] = parts[i]
    end
    parts = r
  end
  if t.digits and t.digits < #parts then
    parts = { table.unpack(parts, #parts - t.digits + 1) }
  end
  local out = table.concat(parts, ".")
  if t.upper then
    out = url_escape(out)
  end
  return out
end

-- ---------------------------------------------------------------------
-- One evaluation

local Eval = {}
Eval.__index = Eval

function Eval:count_term(what)
  self.terms = self.terms + 1
  if self.terms > M.MAX_DNS_TERMS then
    stop("permerror", ("more than %d DNS-querying terms (at %s)"):format(M.MAX_DNS_TERMS, what))
  end
end

-- dns(name, qtype [, opts]) -> answers. opts.void = false: a lookup that
-- does not count as void (exp=); opts.soft = true: a DNS failure gives
-- nil instead of a temperror (ptr).
function Eval:dns(name, qtype, opts)
  opts = opts or {}
  name = name:gsub("%.$", "")
  for label in (name .. "."):gmatch("([^.]*)%.") do
    if #label == 0 or #label > 63 then
      return {} -- not a name DNS could answer for
    end
  end
  local r, err, detail = self.query(name, qtype)
  if not r or (r.rcode ~= "NOERROR" and r.rcode ~= "NXDOMAIN") then
    if opts.soft then
      return nil
    end
    stop("temperror", detail or (name .. " " .. qtype .. ": " .. tostring(r and r.rcode or err)))
  end
  local answers = r.answers or {}
  if #answers == 0 and opts.void ~= false then
    self.voids = self.voids + 1
    if self.voids > M.MAX_VOID_LOOKUPS then
      stop("permerror", ("more than %d void lookups (at %s %s)"):format(M.MAX_VOID_LOOKUPS, name, qtype))
    end
  end
  return answers
end

-- The SPF record of domain, or nil when it has none.
function Eval:record(domain)
  local found
  for _, txt in ipairs(self:dns(domain, "TXT")) do
    local head = txt:sub(1, 7):lower()
    if head == "v=spf1" or head == "v=spf1 " then
      if found then
        stop("permerror", domain .. " has more than one SPF record")
      end
      found = txt
    end
  end
  return found
end

-- The validated names of the client address (section 5.5), at most
-- MAX_PTR_NAMES looked at; DNS failures skip a name.
function Eval:validated_names()
  if not self.validated then
    local names = self:dns(reverse_name(self.ip), "PTR", { soft = true }) or {}
    local qtype = #self.ip == 4 and "A" or "AAAA"
    local ok = {}
    for i = 1, math.min(#names, M.MAX_PTR_NAMES) do
      local name = names[i]:lower():gsub("%.$", "")
      for _, addr in ipairs(self:dns(name, qtype, { soft = true }) or {}) do
        if packed_ip(addr) == self.ip then
          ok[#ok + 1] = name
          break
        end
      end
    end
    self.validated = ok
  end
  return self.validated
end

local function domain_match(name, target)
  target = target:lower()
  return name == target or (#name > #target and name:sub(-#target - 1) == "." .. target)
end

-- expand(tokens, domain, exp) -> string (section 7.3 and 7.4).
function Eval:expand(tokens, domain, exp)
  local out = {}
  for i, t in ipairs(tokens) do
    if type(t) == "string" then
      out[i] = t
    else
      local v
      local l = t.letter
      if l == "s" then
        v = self.sender
      elseif l == "l" then
        v = self.local_part
      elseif l == "o" then
        v = self.sender_domain
      elseif l == "d" then
        v = domain
      elseif l == "i" then
        v = dotted_ip(self.ip)
      elseif l == "v" then
        v = #self.ip == 4 and "in-addr" or "ip6"
      elseif l == "h" then
        v = self.helo
      elseif l == "p" then
        v = "unknown"
        local names = self:validated_names()
        for _, name in ipairs(names) do
          if domain_match(name, domain) then
            v = name
            break
          end
        end
        if v == "unknown" and names[1] then
          v = names[1]
        end
      elseif l == "c" then
        v = self.ip_text
      elseif l == "r" then
        v = self.receiver
      elseif l == "t" then
        v = tostring(os.time())
      end
      out[i] = transform(v, t)
    end
  end
  local s = table.concat(out)
  if exp then
    return s
  end
  s = s:gsub("%.$", "")
  while #s > 253 and s:find(".", 1, true) do -- drop labels from the left
    s = s:sub(s:find(".", 1, true) + 1)
  end
  return s
end

-- A domain-spec: a macro-string that ends in a macro or in "." toplabel.
local function parse_domain_spec(text, term)
  if text == "" then
    stop("permerror", "empty domain-spec in " .. term)
  end
  local tokens, why = parse_macro(text, false)
  if not tokens then
    stop("permerror", why)
  end
  local last = tokens[#tokens]
  if type(last) == "string" then
    local top = last:gsub("%.$", ""):match("%.([^.]*)$")
    if not top or not (top:match("^%w*%a%w*$") or top:match("^%w+%-[%w%-]*%w$")) then
      stop("permerror", "domain-spec does not end in a top label: " .. term)
    end
  end
  return tokens
end

local function cidr(text, max, term)
  if text == nil then
    return max
  end
  local n = tonumber(text)
  if #text > 1 and text:sub(1, 1) == "0" or n > max then
    stop("permerror", "invalid prefix length in " .. term)
  end
  return n
end

-- [":" domain-spec] of a, mx and ptr: the tokens, or nil when absent.
local function optional_domain(spec, term)
  if spec == "" then
    return nil
  end
  if spec:sub(1, 1) ~= ":" then
    stop("permerror", "invalid term " .. term)
  end
  return parse_domain_spec(spec:sub(2), term)
end

-- parse(record) -> { directives = {...}, redirect =, exp = }
local function parse(record)
  local parsed = { directives = {} }
  local terms = {}
  for term in record:gmatch("[^ ]+") do
    terms[#terms + 1] = term
  end
  for i = 2, #terms do -- terms[1] is v=spf1
    local term = terms[i]
    local name, value = term:match("^([%a][%w%-_%.]*)=(.*)$")
    if name then
      name = name:lower()
      if name == "redirect" or name == "exp" then
        if parsed[name] then
          stop("permerror", name .. "= more than once")
        end
        parsed[name] = parse_domain_spec(value, term)
      else -- unknown modifiers are ignored, but must be macro-strings
        local ok, why = parse_macro(value, false)
        if not ok then
          stop("permerror", why)
        end
      end
    else
      local q, mech, rest = term:match("^([%+%-~%?]?)(%a[%w%-_%.]*)(.*)$")
      if not mech then
        stop("permerror", "invalid term " .. term)
      end
      mech = mech:lower()
      local d = { qualifier = QUALIFIERS[q] or "pass", mechanism = mech, term = term }
      if mech == "all" then
        if rest ~= "" then
          stop("permerror", "invalid term " .. term)
        end
      elseif mech == "include" or mech == "exists" then
        if rest:sub(1, 1) ~= ":" then
          stop("permerror", mech .. " needs a domain: " .. term)
        end
        d.domain = parse_domain_spec(rest:sub(2), term)
      elseif mech == "a" or mech == "mx" then
        local spec, c4, c6 = rest:match("^(.-)/(%d+)//(%d+)$")
        if not spec then
          spec, c6 = rest:match("^(.-)//(%d+)$")
        end
        if not spec then
          spec, c4 = rest:match("^(.-)/(%d+)$")
        end
        spec = spec or rest
        d.cidr4, d.cidr6 = cidr(c4, 32, term), cidr(c6, 128, term)
        d.domain = optional_domain(spec, term)
      elseif mech == "ptr" then
        d.domain = optional_domain(rest, term)
      elseif mech == "ip4" or mech == "ip6" then
        local addr, bits = rest:match("^:([^/]+)/(%d+)$")
        addr = addr or rest:match("^:([^/]+)$")
        local packed = addr and (mech == "ip4" and parse_ip4(addr) or relay.parse_ip(addr))
        if not packed or #packed ~= (mech == "ip4" and 4 or 16) then
          stop("permerror", "invalid address in " .. term)
        end
        d.network, d.bits = packed, cidr(bits, #packed * 8, term)
      else
        stop("permerror", "unknown mechanism " .. term)
      end
      parsed.directives[#parsed.directives + 1] = d
    end
  end
  return parsed
end

-- Does one directive match? (section 5)
function Eval:matches(d, domain)
  local mech = d.mechanism
  local target = d.domain and self:expand(d.domain, domain) or domain
  if mech == "all" then
    return true
  elseif mech == "ip4" or mech == "ip6" then
    return in_prefix(self.ip, d.network, d.bits)
  elseif mech == "include" then
    self:count_term(d.term)
    local record = self:record(target)
    if not record then
      stop("permerror", "include:" .. target .. " has no SPF record")
    end
    return self:check_host(target, record, false) == "pass"
  elseif mech == "a" or mech == "mx" then
    self:count_term(d.term)
    local qtype = #self.ip == 4 and "A" or "AAAA"
    local bits = #self.ip == 4 and d.cidr4 or d.cidr6
    local hosts = { target }
    if mech == "mx" then
      local mx = self:dns(target, "MX")
      if #mx > M.MAX_MX_NAMES then
        stop("permerror", ("%s has more than %d MX records"):format(target, M.MAX_MX_NAMES))
      end
      hosts = {}
      for _, r in ipairs(mx) do
        if r.exchange ~= "" then
          hosts[#hosts + 1] = r.exchange
        end
      end
    end
    for _, host in ipairs(hosts) do
      for _, addr in ipairs(self:dns(host, qtype)) do
        if in_prefix(self.ip, packed_ip(addr), bits) then
          return true
        end
      end
    end
    return false
  elseif mech == "ptr" then
    self:count_term(d.term)
    for _, name in ipairs(self:validated_names()) do
      if domain_match(name, target) then
        return true
      end
    end
    return false
  elseif mech == "exists" then
    self:count_term(d.term)
    return #self:dns(target, "A") > 0
  end
  error("unparsed mechanism " .. tostring(mech))
end

-- The explanation of a fail (section 6.2): nil when there is none.
function Eval:explain(parsed, domain)
  if not parsed.exp then
    return nil
  end
  local ok, text = pcall(function()
    local name = self:expand(parsed.exp, domain)
    local txt = self:dns(name, "TXT", { void = false, soft = true })
    if not txt or #txt ~= 1 or txt[1]:find("[^\t\32-\126]") then
      return nil
    end
    local tokens = parse_macro(txt[1], true)
    return tokens and self:expand(tokens, domain, true)
  end)
  if ok then
    return text
  end
  if getmetatable(text) ~= Stop then
    error(text, 0)
  end
  return nil
end

-- check_host(domain, record, top) -> result. top: an explanation
-- may be taken from this record (not within an include).
function Eval:check_host(domain, record, top)
  local parsed = parse(record)
  for _, d in ipairs(parsed.directives) do
    if self:matches(d, domain) then
      if d.qualifier == "fail" and top then
        self.detail = self:explain(parsed, domain)
      end
      return d.qualifier
    end
  end
  if parsed.redirect then
    self:count_term("redirect")
    local target = self:expand(parsed.redirect, domain)
    local target_record = self:record(target)
    if not target_record then
      stop("permerror", "redirect=" .. target .. " has no SPF record")
    end
    return self:check_host(target, target_record, top)
  end
  return "neutral"
end

local function valid_domain(name)
  if type(name) ~= "string" or #name == 0 or #name > 253 or not name:find(".", 1, true) then
    return false
  end
  for label in (name .. "."):gmatch("([^.]*)%.") do
    if #label == 0 or #label > 63 then
      return false
    end
  end
  return true
end

--- check{ ip =, sender =, helo =, query =, receiver = } -> result, detail
-- ip: the client address. sender: the MAIL FROM address; when it is
-- empty (a bounce) the HELO identity postmaster@helo is checked, which
-- is also how to check HELO alone (sender = nil). query: a function
-- with the signature of luasmtp.dns.query (the default). receiver: our
-- host name for %{r} in explanations ("unknown").
-- detail: for fail the explanation of the domain's exp= (nil without
-- one), for permerror and temperror what went wrong.
function M.check(opts)
  assert(type(opts) == "table", "check expects a table")
  local ip = packed_ip(opts.ip)
  assert(ip, "ip must be an IPv4 or IPv6 address")
  local helo = opts.helo or ""
  local sender = opts.sender or ""
  if sender == "" then
    sender = "postmaster@" .. helo
  end
  local local_part, domain = sender:match("^(.*)@([^@]*)$")
  if not local_part then
    local_part, domain = "postmaster", sender
  end
  if local_part == "" then
    local_part = "postmaster"
  end
  domain = domain:lower():gsub("%.$", "")
  local ev = setmetatable({
    ip = ip, ip_text = opts.ip:lower(), sender = local_part .. "@" .. domain, local_part = local_part,
    sender_domain = domain, helo = helo, receiver = opts.receiver or "unknown",
    query = opts.query or require("luasmtp.dns").query, terms = 0, voids = 0,
  }, Eval)
  if not valid_domain(domain) then
    return "none", "not a valid domain: " .. domain
  end
  local ok, result = pcall(function()
    local record = ev:record(domain)
    if not record then
      return "none"
    end
    return ev:check_host(domain, record, true)
  end)
  if ok then
    return result, result == "fail" and ev.detail or nil
  end
  if getmetatable(result) == Stop then
    return result.result, result.detail
  end
  error(result, 0)
end

-- For the tests: the macro expander on its own.
function M._expand(text, vars)
  local tokens = assert(parse_macro(text, vars.exp))
  local ev = setmetatable({
    ip = packed_ip(vars.ip), ip_text = vars.ip, sender = vars.sender, local_part = vars.sender:match("^(.*)@"),
    sender_domain = vars.sender:match("@(.*)$"), helo = vars.helo or "", receiver = vars.receiver or "unknown",
    query = vars.query, terms = 0, voids = 0, validated = vars.validated,
  }, Eval)
  return ev:expand(tokens, vars.domain, vars.exp)
end

return M
