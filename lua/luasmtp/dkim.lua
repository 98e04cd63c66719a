--- luasmtp.dkim: DKIM signatures (RFC 6376), Ed25519 (RFC 8463), the
-- algorithm and key size rules of RFC 8301.
--
--   local v = dkim.verifier{}
--   v:headers(fields)       -- raw fields "Name: value\r\n", in order
--   v:body(chunk) ...       -- body bytes as they arrive
--   local results = v:finish()
--
--   local s = dkim.signer{ domain = "example.org", selector = "s1", key_file = "s1.pem" }
--   s:headers(fields); s:body(chunk) ...; local field = s:finish()
--
-- Canonicalisation, the body hash (computed on the fly), tag lists and
-- the signature operations are C without Lua (src/lib/dkim.c); this module
-- is the policy: which fields are signed, which results mean what.
local core = require "luasmtp.core"
local options = require "luasmtp.options"

local M = {}

M.MAX_SIGNATURES = 10   -- signatures checked per message; the rest are "neutral"
M.MIN_RSA_BITS = 1024   -- RFC 8301 3.2: smaller RSA keys never pass
M.MAX_SIGNED_FIELDS = 256 -- h= names beyond this make the signature a permerror

M.DEFAULT_HEADERS = {
  "from", "reply-to", "subject", "date", "to", "cc", "message-id",
  "in-reply-to", "references", "mime-version", "content-type",
  "content-transfer-encoding", "content-id", "content-description",
  "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc",
  "resent-message-id", "list-id", "list-help", "list-unsubscribe",
  "list-unsubscribe-post", "list-subscribe", "list-post", "list-owner",
  "list-archive", "sender",
}

local ALGORITHMS = {
  ["rsa-sha256"] = { key = "rsa", hash = "sha256" },
  ["rsa-sha1"] = { key = "rsa", hash = "sha1" },
  ["ed25519-sha256"] = { key = "ed25519", hash = "sha256" },
}

local function b64(s)
  return core.b64encode(s)
end

local function unb64(s)
  return core.b64decode((s:gsub("[ \t\r\n]", "")))
end

local function field_name(f)
  local name = f:match("^([^:]*):")
  return name and name:gsub("[ \t]+$", ""):lower()
end

local function field_value(f)
  return f:match("^[^:]*:(.*)$"):gsub("\r\n$", "")
end

local function now_of(opts)
  local now = opts.now
  if type(now) == "function" then return now() end
  return now or os.time()
end

local function split_canon(c)
  c = (c or "simple"):lower()
  local h, b = c:match("^([a-z]+)/([a-z]+)$")
  if not h then h, b = c, "simple" end
  if (h ~= "simple" and h ~= "relaxed") or (b ~= "simple" and b ~= "relaxed") then return nil end
  return h, b
end

-- The header fields h= names, chosen from the bottom up: each name takes
-- the last instance not yet taken; a name with none left contributes
-- nothing (RFC 6376 5.4.2). Returns the canonical bytes.
local function header_data(fields, names, relaxed, out)
  local used = {}
  for _, name in ipairs(names) do
    for i = #fields, 1, -1 do
      if not used[i] and field_name(fields[i]) == name then
        used[i] = true
        out[#out + 1] = core.dkim_canon_header(relaxed, fields[i])
        break
      end
    end
  end
  return out
end

-- The signature field itself, b= emptied, canonical, without its CRLF.
local function signature_data(field, relaxed)
  local stripped = core.dkim_strip_b(field)
  return (core.dkim_canon_header(relaxed, stripped):gsub("\r\n$", ""))
end

-- Body hashers shared by the signatures with the same c=, hash and l=.
local function hasher_for(hashers, body_relaxed, hash, limit)
  local key = (body_relaxed and "r" or "s") .. hash .. (limit or "")
  local h = hashers[key]
  if not h then
    h = { hasher = core.dkim_body(body_relaxed, hash, limit) }
    hashers[key] = h
    hashers[#hashers + 1] = h
  end
  return h
end

------------------------------------------------------------------------
-- Verifying

local function is_subdomain(sub, domain)
  sub, domain = sub:lower(), domain:lower()
  return sub == domain or sub:sub(-#domain - 1) == "." .. domain
end

-- A parsed DKIM-Signature, or nil, reason.
local function parse_signature(field, now)
  local tags, err = core.dkim_tags(field_value(field))
  if not tags then return nil, "signature tag list: " .. err end
  for _, t in ipairs{ "v", "a", "b", "bh", "d", "h", "s" } do
    if not tags[t] then return nil, "signature lacks " .. t .. "=" end
  end
  if tags.v ~= "1" then return nil, "signature version " .. tags.v .. " unknown" end
  local sig = { field = field, tags = tags, domain = tags.d, selector = tags.s,
    algorithm = tags.a:lower(), header_b = tags.b:gsub("[ \t\r\n]", ""):sub(1, 12) }
  local alg = ALGORITHMS[sig.algorithm]
  if not alg then return sig, "algorithm " .. tags.a .. " unknown" end
  sig.key_type, sig.hash = alg.key, alg.hash
  sig.header_c, sig.body_c = split_canon(tags.c)
  if not sig.header_c then return sig, "canonicalization " .. tags.c .. " unknown" end
  sig.b = unb64(tags.b)
  sig.bh = unb64(tags.bh)
  if not sig.b or #sig.b == 0 then return sig, "b= is not base64" end
  if not sig.bh then return sig, "bh= is not base64" end
  if not tags.d:match("^[%w%.%-_]+$") or not tags.s:match("^[%w%.%-_]+$") then
    return sig, "d= or s= is not a domain name"
  end
  sig.names = {}
  local from = false
  for name in (tags.h .. ":"):gmatch("([^:]*):") do
    name = name:gsub("[ \t\r\n]", ""):lower()
    if name == "" then return sig, "h= has an empty field name" end
    if name == "from" then from = true end
    sig.names[#sig.names + 1] = name
    if #sig.names > M.MAX_SIGNED_FIELDS then return sig, "h= names too many fields" end
  end
  if not from then return sig, "h= does not include From" end
  if tags.i then
    local at_domain = tags.i:match("@(.*)$")
    if not at_domain or not is_subdomain(at_domain, tags.d) then
      return sig, "i= is not within d="
    end
    sig.identity = tags.i
  else
    sig.identity = "@" .. tags.d
  end
  if tags.l then
    if not tags.l:match("^%d+$") or #tags.l > 15 then return sig, "l= is not a number" end
    sig.body_length = tonumber(tags.l)
  end
  if tags.q and not tags.q:lower():match("^dns/txt") then return sig, "q= " .. tags.q .. " unknown" end
  if tags.x then
    if not tags.x:match("^%d+$") or #tags.x > 15 then return sig, "x= is not a number" end
    if tags.t and tags.t:match("^%d+$") and tonumber(tags.t) > tonumber(tags.x) then
      return sig, "x= is before t="
    end
    if tonumber(tags.x) < now then sig.expired = true end
  end
  return sig
end

local Verifier = {}
Verifier.__index = Verifier

--- verifier{ query =, now = } -> v
-- query(name, "TXT") -> result | nil, "dns", detail (the shape of
-- luasmtp.dns.query; the default); now: seconds or a function (x=).
M.verifier_schema = options.schema("dkim.verifier", {
  { "query", "function", nil, "`query(name, \"TXT\")` with the shape of `luasmtp.dns.query` (the default)" },
  { "now", "number|function", nil, "the time for x= checks: seconds or a function (default `os.time()`)" },
})

function M.verifier(opts)
  assert(opts == nil or type(opts) == "table", "verifier expects a table")
  opts = M.verifier_schema:apply(opts, 2)
  local query = opts.query
  if not query then
    local dns = require "luasmtp.dns"
    query = dns.query
  end
  return setmetatable({ query = query, now = now_of(opts), sigs = {}, hashers = {},
    fields = nil, keys = {} }, Verifier)
end

--- v:headers(fields): the message's header fields, raw, in order.
function Verifier:headers(fields)
  assert(self.fields == nil, "headers already given")
  assert(type(fields) == "table", "fields must be a list of strings")
  self.fields = fields
  for _, f in ipairs(fields) do
    if field_name(f) == "dkim-signature" then
      local sig, err = parse_signature(f, self.now)
      sig = sig or { field = f }
      if #self.sigs >= M.MAX_SIGNATURES then
        sig.result, sig.reason = "neutral", "more than " .. M.MAX_SIGNATURES .. " signatures, not checked"
      elseif err then
        sig.result, sig.reason = "permerror", err
      elseif sig.hash == "sha1" then
        sig.result, sig.reason = "permerror", "rsa-sha1 is not accepted (RFC 8301)"
      elseif sig.expired then
        sig.result, sig.reason = "fail", "signature expired (x=)"
      else
        sig.body = hasher_for(self.hashers, sig.body_c == "relaxed", sig.hash, sig.body_length)
      end
      self.sigs[#self.sigs + 1] = sig
    end
  end
end

--- v:body(chunk): the next body bytes (after v:headers).
function Verifier:body(chunk)
  assert(self.fields, "headers first")
  for _, h in ipairs(self.hashers) do h.hasher:update(chunk) end
end

-- Whether a colon-separated tag value lists item (case-insensitive).
local function list_has(value, item)
  return (":" .. value:gsub("[ \t\r\n]", ""):lower() .. ":"):find(":" .. item .. ":", 1, true) ~= nil
end

-- The key record for a signature: key | nil, result, reason.
function Verifier:key(sig)
  local name = sig.selector .. "._domainkey." .. sig.domain
  local cached = self.keys[name:lower()]
  if not cached then
    local r, err, detail = self.query(name, "TXT")
    if not r then
      cached = { result = "temperror", reason = "key lookup: " .. tostring(detail or err) }
    elseif #r.answers == 0 then
      cached = { result = "permerror", reason = "no key record at " .. name }
    else
      cached = { records = r.answers }
    end
    self.keys[name:lower()] = cached
  end
  if not cached.records then return nil, cached.result, cached.reason end
  local reason = "key record unusable"
  for _, txt in ipairs(cached.records) do
    local tags, terr = core.dkim_tags(txt)
    if not tags then
      reason = "key record: " .. terr
    elseif tags.v and tags.v ~= "DKIM1" then
      reason = "key record version " .. tags.v
    elseif not tags.p then
      reason = "key record lacks p="
    elseif tags.p:gsub("[ \t\r\n]", "") == "" then
      return nil, "permerror", "key revoked"
    elseif (tags.k or "rsa"):lower() ~= sig.key_type then
      reason = "key type " .. (tags.k or "rsa") .. " does not match a=" .. sig.algorithm
    elseif tags.h and not list_has(tags.h, sig.hash) then
      reason = "key does not allow " .. sig.hash
    elseif tags.s and not (list_has(tags.s, "*") or list_has(tags.s, "email")) then
      reason = "key service type " .. tags.s
    else
      local der = unb64(tags.p)
      local key = der and core.dkim_pubkey(sig.key_type, der)
      if not key then return nil, "permerror", "key p= is not a " .. sig.key_type .. " key" end
      if sig.key_type == "rsa" and key:bits() < M.MIN_RSA_BITS then
        return nil, "permerror", ("RSA key of %d bits is too small (RFC 8301)"):format(key:bits())
      end
      local flags = tags.t or ""
      if list_has(flags, "s") and sig.identity:match("@(.*)$"):lower() ~= sig.domain:lower() then
        return nil, "permerror", "key t=s demands i= in d= exactly"
      end
      return key, list_has(flags, "y") and "testing" or nil
    end
  end
  return nil, "permerror", reason
end

--- v:finish() -> results: one per signature, in header order:
-- { result = "pass"|"fail"|"neutral"|"temperror"|"permerror", reason,
--   domain, selector, algorithm, identity, header_b, body_length,
--   unsigned_bytes (l= only: body bytes after the signed part),
--   testing (the key has t=y) }
function Verifier:finish()
  assert(self.fields, "headers not given")
  for _, h in ipairs(self.hashers) do
    h.digest, h.length = h.hasher:final()
  end
  local results = {}
  for _, sig in ipairs(self.sigs) do
    if not sig.result then
      local body = sig.body
      if sig.body_length and sig.body_length > body.length then
        sig.result, sig.reason = "fail", "l= is longer than the body"
      elseif not core.equal(body.digest, sig.bh) then
        sig.result, sig.reason = "fail", "body hash mismatch"
      else
        local key, res, reason = self:key(sig)
        if not key then
          sig.result, sig.reason = res, reason
        else
          sig.testing = res == "testing" or nil
          local relaxed = sig.header_c == "relaxed"
          local data = header_data(self.fields, sig.names, relaxed, {})
          data[#data + 1] = signature_data(sig.field, relaxed)
          if key:verify(sig.hash, table.concat(data), sig.b) then
            sig.result = "pass"
            if sig.body_length and body.length > sig.body_length then
              sig.unsigned_bytes = body.length - sig.body_length
              sig.reason = ("%d body bytes after the l= signed part"):format(sig.unsigned_bytes)
            end
          else
            sig.result, sig.reason = "fail", "signature does not verify"
          end
        end
      end
    end
    results[#results + 1] = { result = sig.result, reason = sig.reason, domain = sig.domain,
      selector = sig.selector, algorithm = sig.algorithm, identity = sig.identity,
      header_b = sig.header_b, body_length = sig.body_length,
      unsigned_bytes = sig.unsigned_bytes, testing = sig.testing }
  end
  return results
end

------------------------------------------------------------------------
-- Signing

local Signer = {}
Signer.__index = Signer

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then error("dkim signer: " .. err, 3) end
  local s = f:read("a")
  f:close()
  return s
end

-- Parsed private keys by PEM text: a signer is made per message, and
-- parsing (and OpenSSL's first use of a key) costs more than signing.
local key_cache, key_cache_size = {}, 0
local KEY_CACHE_MAX = 64

local function private_key(pem)
  local key = key_cache[pem]
  if not key then
    key = core.dkim_privkey(pem)
    assert(key, "key is not an RSA or Ed25519 private key in PEM")
    if key_cache_size >= KEY_CACHE_MAX then key_cache, key_cache_size = {}, 0 end
    key_cache[pem] = key
    key_cache_size = key_cache_size + 1
  end
  return key
end

--- signer{ domain, selector, key = PEM | key_file =, algorithm =,
--   canonicalization = "relaxed/relaxed", headers =, oversign = {"from"},
--   identity =, expire = seconds, body_length = false, now = } -> s
M.signer_schema = options.schema("dkim.signer", {
  { "domain", "string", nil, "d=, the signing domain (required)" },
  { "selector", "string", nil, "s=, the key's selector (required)" },
  { "key", "string", nil, "the private key in PEM (RSA of 1024 bits or more, or Ed25519)" },
  { "key_file", "string", nil, "a file holding the PEM key (instead of `key`)" },
  { "algorithm", "string", nil, "`rsa-sha256` or `ed25519-sha256` (default: from the key)" },
  { "canonicalization", "string", "relaxed/relaxed", "c=, header/body: `simple` or `relaxed` each" },
  { "headers", "table", nil, "the field names to sign (default `dkim.DEFAULT_HEADERS`)" },
  { "oversign", "table", { "from" }, "names signed once more than they occur, so none can be added" },
  { "identity", "string", nil, "i=, an address within domain" },
  { "expire", "number", nil, "x= this many seconds after t=" },
  { "body_length", "boolean", false, "add l= (the signed body length)" },
  { "now", "number|function", nil, "the time for t=: seconds or a function (default `os.time()`)" },
})

function M.signer(opts)
  assert(type(opts) == "table", "signer expects a table")
  opts = M.signer_schema:apply(opts, 2)
  assert(type(opts.domain) == "string" and opts.domain:match("^[%w%.%-_]+$"), "domain must be a domain name")
  assert(type(opts.selector) == "string" and opts.selector:match("^[%w%.%-_]+$"), "selector must be a name")
  local pem = opts.key or (opts.key_file and read_file(opts.key_file))
  assert(type(pem) == "string", "key (PEM) or key_file required")
  local key = private_key(pem)
  local algorithm = opts.algorithm or (key:kind() == "ed25519" and "ed25519-sha256" or "rsa-sha256")
  local alg = ALGORITHMS[algorithm]
  assert(alg and algorithm ~= "rsa-sha1", "algorithm must be rsa-sha256 or ed25519-sha256")
  assert(alg.key == key:kind(), "algorithm " .. algorithm .. " does not match the " .. key:kind() .. " key")
  if alg.key == "rsa" then
    assert(key:bits() >= M.MIN_RSA_BITS, "RSA keys under 1024 bits do not verify (RFC 8301)")
  end
  local hc, bc = split_canon(opts.canonicalization)
  assert(hc, "canonicalization must be simple or relaxed, header/body")
  if opts.identity then
    local d = opts.identity:match("@(.+)$")
    assert(d and is_subdomain(d, opts.domain), "identity must be an address within domain")
  end
  assert(opts.expire == nil or (type(opts.expire) == "number" and opts.expire > 0), "expire: seconds > 0")
  local names = {}
  for _, n in ipairs(opts.headers or M.DEFAULT_HEADERS) do names[#names + 1] = n:lower() end
  local oversign = {}
  for _, n in ipairs(opts.oversign) do oversign[n:lower()] = true end
  return setmetatable({ domain = opts.domain, selector = opts.selector, key = key,
    algorithm = algorithm, hash = alg.hash, header_c = hc, body_c = bc, names = names,
    oversign = oversign, identity = opts.identity, expire = opts.expire,
    body_length = opts.body_length, now = now_of(opts),
    hasher = core.dkim_body(bc == "relaxed", alg.hash) }, Signer)
end

function Signer:headers(fields)
  assert(self.fields == nil, "headers already given")
  assert(type(fields) == "table", "fields must be a list of strings")
  self.fields = fields
end

function Signer:body(chunk)
  assert(self.fields, "headers first")
  self.hasher:update(chunk)
end

-- Fold "tag=value;" parts into lines of at most 78 columns. Each part is
-- a list of atoms that may be split between (h= at its colons).
local function fold(parts)
  local out, col = { "DKIM-Signature:" }, #"DKIM-Signature:"
  for _, atoms in ipairs(parts) do
    for i, atom in ipairs(atoms) do
      local sep = i == 1 and " " or ""
      if col + #sep + #atom > 78 then
        out[#out + 1] = "\r\n\t"
        col = 1
        sep = ""
      end
      out[#out + 1] = sep .. atom
      col = col + #sep + #atom
    end
  end
  return table.concat(out), col
end

--- s:finish() -> "DKIM-Signature: ...\r\n" (to prepend to the message)
function Signer:finish()
  assert(self.fields, "headers not given")
  local bh, length = self.hasher:final()
  local count = {}
  for _, f in ipairs(self.fields) do
    local n = field_name(f)
    if n then count[n] = (count[n] or 0) + 1 end
  end
  local h, seen = {}, {}
  for _, n in ipairs(self.names) do
    if not seen[n] then
      seen[n] = true
      for _ = 1, (count[n] or 0) + (self.oversign[n] and 1 or 0) do h[#h + 1] = n end
    end
  end
  for n in pairs(self.oversign) do
    if not seen[n] then h[#h + 1] = n end
  end
  assert(count.from, "the message has no From field")
  local parts = {
    { "v=1;" }, { "a=" .. self.algorithm .. ";" }, { "c=" .. self.header_c .. "/" .. self.body_c .. ";" },
    { "d=" .. self.domain .. ";" }, { "s=" .. self.selector .. ";" }, { "t=" .. math.floor(self.now) .. ";" },
  }
  if self.expire then parts[#parts + 1] = { "x=" .. math.floor(self.now + self.expire) .. ";" } end
  if self.identity then parts[#parts + 1] = { "i=" .. self.identity .. ";" } end
  if self.body_length then parts[#parts + 1] = { "l=" .. length .. ";" } end
  local hatoms = {}
  for i, n in ipairs(h) do hatoms[i] = (i == 1 and "h=" or "") .. n .. (i == #h and ";" or ":") end
  parts[#parts + 1] = hatoms
  parts[#parts + 1] = { "bh=" .. b64(bh) .. ";" }
  parts[#parts + 1] = { "b=" }
  local unsigned, col = fold(parts)
  local relaxed = self.header_c == "relaxed"
  local data = header_data(self.fields, h, relaxed, {})
  data[#data + 1] = signature_data(unsigned .. "\r\n", relaxed)
  local sig = b64(self.key:sign(self.hash, table.concat(data)))
  local out, pos = { unsigned }, 1
  while pos <= #sig do
    local room = 78 - col
    if room < 8 then
      out[#out + 1] = "\r\n\t"
      col, room = 1, 77
    end
    out[#out + 1] = sig:sub(pos, pos + room - 1)
    pos = pos + room
    col = col + room
  end
  out[#out + 1] = "\r\n"
  return table.concat(out)
end

------------------------------------------------------------------------
-- Whole messages

--- split(message) -> fields, body: the raw header fields and the body.
-- A message without any CRLF is taken as LF-terminated and converted.
function M.split(message)
  assert(type(message) == "string", "message must be a string")
  if not message:find("\r\n", 1, true) then message = message:gsub("\n", "\r\n") end
  local fields, pos = {}, 1
  while pos <= #message do
    local e = message:find("\r\n", pos, true)
    if not e then -- headers without a body or final CRLF
      fields[#fields + 1] = message:sub(pos) .. "\r\n"
      return fields, ""
    end
    if e == pos then return fields, message:sub(pos + 2) end
    local line = message:sub(pos, e + 1)
    local c = line:byte(1)
    if (c == 32 or c == 9) and #fields > 0 then
      fields[#fields] = fields[#fields] .. line
    else
      fields[#fields + 1] = line
    end
    pos = e + 2
  end
  return fields, ""
end

--- verify_message(str, opts) -> results (as v:finish())
function M.verify_message(message, opts)
  local fields, body = M.split(message)
  local v = M.verifier(opts)
  v:headers(fields)
  v:body(body)
  return v:finish()
end

--- sign_message(str, opts | { opts, opts, ... }) -> signed message, fields
-- Several option tables give several signatures (e.g. rsa and ed25519),
-- each over the original message.
function M.sign_message(message, opts)
  assert(type(opts) == "table", "sign_message expects options")
  local list = opts[1] and opts or { opts }
  if not message:find("\r\n", 1, true) then message = message:gsub("\n", "\r\n") end
  local fields, body = M.split(message)
  local out = {}
  for i, o in ipairs(list) do
    local s = M.signer(o)
    s:headers(fields)
    s:body(body)
    out[i] = s:finish()
  end
  return table.concat(out) .. message, out
end

return M
