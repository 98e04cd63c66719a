--- luasmtp.credentials: credential stores for the server side of SASL.
--
-- A store answers the questions the SASL mechanisms ask:
--
--   store:lookup(user) -> entry | nil
--       entry = { user =, scheme =, secret =, extra = {k = v}, uid =, gid =,
--                 gecos =, home =, shell = } (passwd fields only when set)
--   store:verify_password(user, password) -> true | false      (PLAIN, LOGIN)
--   store:scram_keys(user, alg) -> { salt =, iterations =, stored_key =,
--                                    server_key = } | nil    (SCRAM-SHA-*)
--   store:cram_md5(user) -> function(challenge) -> hex | nil  (CRAM-MD5)
--   store:capabilities() -> { plaintext =, cram_md5 =, scram = {
--                               ["SCRAM-SHA-1"] =, ["SCRAM-SHA-256"] = } }
--
-- Hook stores may also answer `nil, token, detail` when their backend
-- fails (the server then answers 454 4.7.0, not 535).
--
-- Secrets use Dovecot's `{SCHEME}secret` notation, so passwd-files written
-- with `doveadm pw` work unchanged. Supported schemes:
--   {PLAIN} {CLEAR} {CLEARTEXT} (and .b64/.hex forms), {CRAM-MD5},
--   {SCRAM-SHA-1} {SCRAM-SHA-256},
--   crypt(3): {CRYPT} {SHA512-CRYPT} {SHA256-CRYPT} {BLF-CRYPT}
--     {MD5-CRYPT} {DES-CRYPT} and yescrypt ($y$) through {CRYPT},
--   digests: {PLAIN-MD5} {LDAP-MD5} {MD5} {SHA} {SHA1} {SHA256} {SHA512}
--     {SMD5} {SSHA} {SSHA256} {SSHA512}.
-- Not supported (entries load with a warning and never verify): ARGON2*,
-- PBKDF2, DIGEST-MD5, OTP and the other legacy schemes.
--
-- Every password comparison is constant-time, and verifying a password
-- for an unknown user costs about as much as for a known one.
local core = require "luasmtp.core"

local digest, hmac, pbkdf2 = core.digest, core.hmac, core.pbkdf2
local equal, b64decode, b64encode = core.equal, core.b64decode, core.b64encode

local M = {}

local SCRAM_DEFAULT_ITERATIONS = 4096
local SCRAM_MAX_ITERATIONS = 10000000
local MAX_FILE_SIZE = 64 * 1024 * 1024
local MAX_LINE = 64 * 1024
local MAX_WARNINGS = 100

local HASH_SIZE = { md5 = 16, sha1 = 20, sha256 = 32, sha512 = 64 }

-- SCRAM algorithm names: mechanism name or digest name -> digest name.
local SCRAM_ALGS = {
  ["SCRAM-SHA-1"] = "sha1", ["SCRAM-SHA-256"] = "sha256",
  sha1 = "sha1", sha256 = "sha256",
}
local SCRAM_MECH = { sha1 = "SCRAM-SHA-1", sha256 = "SCRAM-SHA-256" }

-- Fixed-size digest schemes: hex or base64 of the digest of the password
-- (told apart by length, as Dovecot does).
local DIGEST_SCHEMES = {
  ["PLAIN-MD5"] = "md5", ["LDAP-MD5"] = "md5",
  SHA = "sha1", SHA1 = "sha1", SHA256 = "sha256", SHA512 = "sha512",
}
-- Salted digest schemes: base64(digest(password .. salt) .. salt).
local SALTED_SCHEMES = { SMD5 = "md5", SSHA = "sha1", SSHA256 = "sha256", SSHA512 = "sha512" }
local CRYPT_SCHEMES = {
  CRYPT = true, ["DES-CRYPT"] = true, ["MD5-CRYPT"] = true,
  ["SHA256-CRYPT"] = true, ["SHA512-CRYPT"] = true, ["BLF-CRYPT"] = true,
}
local PLAIN_SCHEMES = { PLAIN = true, CLEAR = true, CLEARTEXT = true }

-- ---------------------------------------------------------------------
-- Small helpers

local function hexdecode(s)
  if #s % 2 ~= 0 or s:find("[^%x]") then
    return nil
  end
  return (s:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end))
end

local function check_string(v, n, name)
  if type(v) ~= "string" then
    error(("bad argument #%d (%s: string expected, got %s)"):format(n, name, type(v)), 3)
  end
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

-- Decode s as hex when it has the length of a hex digest of `size`
-- bytes, else as strict base64 (Dovecot's rule); `enc` forces one.
local function decode_digest(s, size, enc)
  if enc == "hex" then
    return hexdecode(s)
  elseif enc == "base64" then
    return b64decode(s)
  end
  if size and #s == 2 * size then
    local raw = hexdecode(s)
    if raw then return raw end
  end
  return b64decode(s)
end

-- ---------------------------------------------------------------------
-- Parsing secrets into records
--
-- A record is the internal form of an entry: the public fields plus
-- `kind` ("plain", "crypt", "digest", "salted", "cram", "scram",
-- "invalid") and what verification needs.

--- Split "{SCHEME}secret" into SCHEME (upper case) and secret; without a
-- scheme prefix the default scheme applies.
local function split_scheme(s, default_scheme)
  local scheme, rest = s:match("^{([^{}]+)}(.*)$")
  if not scheme then
    return default_scheme:upper(), s
  end
  return scheme:upper(), rest
end

local function parse_scram(alg, secret)
  local iter, salt, stored, server = secret:match("^(%d+),([^,]+),([^,]+),([^,]+)$")
  if not iter then
    return nil, "malformed SCRAM entry"
  end
  iter = tonumber(iter)
  salt, stored, server = b64decode(salt), b64decode(stored), b64decode(server)
  if not iter or iter < 1 or iter > SCRAM_MAX_ITERATIONS then
    return nil, "SCRAM iteration count out of range"
  end
  if not salt or #salt == 0 or not stored or not server
      or #stored ~= HASH_SIZE[alg] or #server ~= HASH_SIZE[alg] then
    return nil, "malformed SCRAM entry"
  end
  return { salt = salt, iterations = math.tointeger(iter), stored_key = stored, server_key = server }
end

--- Build a record for user from a `{SCHEME}secret` string. Returns the
-- record (kind "invalid" with rec.problem when the secret cannot be
-- used) — never raises on hostile input.
local function make_record(user, secret, default_scheme)
  local scheme, body = split_scheme(secret, default_scheme)
  local rec = { user = user, scheme = scheme, secret = body }
  local base, enc = scheme:match("^(.-)%.(%w+)$")
  if base and (enc == "B64" or enc == "BASE64" or enc == "HEX") then
    enc = enc == "HEX" and "hex" or "base64"
  else
    base, enc = scheme, nil
  end

  if base == "MD5" then
    -- Dovecot: MD5-CRYPT when it looks like one, else PLAIN-MD5
    base = body:sub(1, 3) == "$1$" and "MD5-CRYPT" or "PLAIN-MD5"
  end

  if PLAIN_SCHEMES[base] then
    local pw = body
    if enc == "hex" then pw = hexdecode(body) elseif enc == "base64" then pw = b64decode(body) end
    if not pw then
      rec.kind, rec.problem = "invalid", "bad " .. enc .. " encoding"
    else
      rec.kind, rec.password = "plain", pw
    end
  elseif CRYPT_SCHEMES[base] and not enc then
    if body == "" or body:find("[%z\1-\31\127]") then
      rec.kind, rec.problem = "invalid", "malformed crypt hash"
    else
      rec.kind = "crypt"
    end
  elseif DIGEST_SCHEMES[base] then
    local alg = DIGEST_SCHEMES[base]
    local raw = decode_digest(body, HASH_SIZE[alg], enc)
    if not raw or #raw ~= HASH_SIZE[alg] then
      rec.kind, rec.problem = "invalid", "malformed " .. base .. " digest"
    else
      rec.kind, rec.alg, rec.raw = "digest", alg, raw
    end
  elseif SALTED_SCHEMES[base] then
    local alg = SALTED_SCHEMES[base]
    local raw = enc == "hex" and hexdecode(body) or b64decode(body)
    if not raw or #raw <= HASH_SIZE[alg] then
      rec.kind, rec.problem = "invalid", "malformed " .. base .. " digest"
    else
      rec.kind, rec.alg = "salted", alg
      rec.raw, rec.salt = raw:sub(1, HASH_SIZE[alg]), raw:sub(HASH_SIZE[alg] + 1)
    end
  elseif base == "CRAM-MD5" and not enc then
    if #body ~= 64 or body:find("[^%x]") then
      rec.kind, rec.problem = "invalid", "malformed CRAM-MD5 context"
    else
      rec.kind, rec.context = "cram", body:lower()
    end
  elseif (base == "SCRAM-SHA-1" or base == "SCRAM-SHA-256") and not enc then
    local alg = SCRAM_ALGS[base]
    local keys, problem = parse_scram(alg, body)
    if keys then
      rec.kind, rec.alg, rec.scram = "scram", alg, keys
    else
      rec.kind, rec.problem = "invalid", problem
    end
  else
    rec.kind, rec.problem = "invalid", "unsupported scheme " .. scheme
  end
  return rec
end

-- ---------------------------------------------------------------------
-- Verification

local function verify_record(rec, password)
  local kind = rec.kind
  if kind == "plain" then
    -- compare digests: equal() takes time by length, and the lengths
    -- of the digests say nothing about the password
    return equal(digest("sha256", password), digest("sha256", rec.password))
  elseif kind == "crypt" then
    local h = core.crypt(password, rec.secret)
    return h ~= nil and equal(h, rec.secret)
  elseif kind == "digest" then
    return equal(digest(rec.alg, password), rec.raw)
  elseif kind == "salted" then
    return equal(digest(rec.alg, password .. rec.salt), rec.raw)
  elseif kind == "cram" then
    return equal(core.cram_md5_context(password), rec.context)
  elseif kind == "scram" then
    local keys = rec.scram
    local salted = pbkdf2(rec.alg, password, keys.salt, keys.iterations, HASH_SIZE[rec.alg])
    local stored = digest(rec.alg, hmac(rec.alg, salted, "Client Key"))
    return equal(stored, keys.stored_key)
  end
  return false
end

--- SCRAM keys for a password (RFC 5802): SaltedPassword = Hi(password,
-- salt, i), StoredKey = H(HMAC(SaltedPassword, "Client Key")),
-- ServerKey = HMAC(SaltedPassword, "Server Key"). The password is used as
-- it is (no SASLprep), as Dovecot does.
local function derive_scram(alg, password, salt, iterations)
  local salted = pbkdf2(alg, password, salt, iterations, HASH_SIZE[alg])
  return {
    salt = salt,
    iterations = iterations,
    stored_key = digest(alg, hmac(alg, salted, "Client Key")),
    server_key = hmac(alg, salted, "Server Key"),
  }
end

-- ---------------------------------------------------------------------
-- Store data: records by user, the dummy record, capabilities

--- Finish a set of records: pick the dummy record (a record of the most
-- common usable scheme, so verifying for an unknown user costs what it
-- costs for a known one) and compute the capabilities.
local function finish_data(records)
  local counts, first = {}, {}
  local caps = { plaintext = false, cram_md5 = false,
                 scram = { ["SCRAM-SHA-1"] = false, ["SCRAM-SHA-256"] = false } }
  for _, rec in pairs(records) do
    if rec.kind ~= "invalid" then
      local key = rec.kind .. ":" .. rec.scheme
      counts[key] = (counts[key] or 0) + 1
      -- the first in user order, so the choice does not depend on pairs()
      if not first[key] or rec.user < first[key].user then first[key] = rec end
      caps.plaintext = true
      if rec.kind == "plain" or rec.kind == "cram" then caps.cram_md5 = true end
      if rec.kind == "plain" then
        caps.scram["SCRAM-SHA-1"], caps.scram["SCRAM-SHA-256"] = true, true
      elseif rec.kind == "scram" then
        caps.scram[SCRAM_MECH[rec.alg]] = true
      end
    end
  end
  local best
  for key, n in pairs(counts) do
    if not best or n > counts[best] or (n == counts[best] and key < best) then best = key end
  end
  local dummy = best and first[best] or { kind = "plain", password = b64encode(core.random(18)) }
  return { records = records, dummy = dummy, caps = caps, derived = setmetatable({}, { __mode = "k" }) }
end

local function public_entry(rec)
  local e = {
    user = rec.user, scheme = rec.scheme, secret = rec.secret,
    extra = copy(rec.extra or {}),
    uid = rec.uid, gid = rec.gid, gecos = rec.gecos, home = rec.home, shell = rec.shell,
  }
  return e
end

-- ---------------------------------------------------------------------
-- Stores backed by records (passwd-file and table)

local Store = {}
Store.__index = Store

-- The current data (the passwd-file store reloads here).
function Store:_data()
  return self._current
end

function Store:_record(user)
  local data = self:_data()
  if self._lowercase then user = user:lower() end
  return data.records[user], data
end

--- store:lookup(user) -> entry | nil
function Store:lookup(user)
  check_string(user, 1, "user")
  local rec = self:_record(user)
  return rec and public_entry(rec) or nil
end

--- store:verify_password(user, password) -> boolean
-- An unknown user, or one whose entry cannot be used, costs a verification
-- against a record of the store's most common scheme, then fails.
function Store:verify_password(user, password)
  check_string(user, 1, "user")
  check_string(password, 2, "password")
  local rec, data = self:_record(user)
  if not rec or rec.kind == "invalid" then
    verify_record(data.dummy, password)
    return false
  end
  return verify_record(rec, password) == true
end

--- store:scram_keys(user, alg) -> keys | nil
-- alg: "SCRAM-SHA-1", "SCRAM-SHA-256" (or "sha1", "sha256"). Keys come
-- from a matching {SCRAM-*} entry, or are derived once from a {PLAIN}
-- entry (random salt, opts.scram_iterations, default 4096) and cached
-- until the entry changes. Each call returns a fresh table.
function Store:scram_keys(user, alg)
  check_string(user, 1, "user")
  local a = SCRAM_ALGS[alg]
  if not a then
    error("bad argument #2 (alg: \"SCRAM-SHA-1\" or \"SCRAM-SHA-256\" expected)", 2)
  end
  local rec, data = self:_record(user)
  if not rec then return nil end
  if rec.kind == "scram" then
    return rec.alg == a and copy(rec.scram) or nil
  elseif rec.kind == "plain" then
    local cache = data.derived[rec]
    if not cache then
      cache = {}
      data.derived[rec] = cache
    end
    if not cache[a] then
      cache[a] = derive_scram(a, rec.password, core.random(16), self._scram_iterations)
    end
    return copy(cache[a])
  end
  return nil
end

--- store:cram_md5(user) -> function(challenge) -> hex | nil
-- The function returns the response a client that knows the password
-- sends (lowercase hex HMAC-MD5). Available for {PLAIN} and {CRAM-MD5}
-- entries.
function Store:cram_md5(user)
  check_string(user, 1, "user")
  local rec = self:_record(user)
  if not rec then return nil end
  local context
  if rec.kind == "cram" then
    context = rec.context
  elseif rec.kind == "plain" then
    context = core.cram_md5_context(rec.password)
  else
    return nil
  end
  local response = core.cram_md5_response
  return function(challenge)
    return response(context, challenge)
  end
end

--- store:capabilities() -> { plaintext, cram_md5, scram = {...} }
-- A mechanism counts as available when at least one entry can serve it
-- (users whose entries cannot simply fail that mechanism).
function Store:capabilities()
  local caps = self:_data().caps
  return { plaintext = caps.plaintext, cram_md5 = caps.cram_md5, scram = copy(caps.scram) }
end

-- ---------------------------------------------------------------------
-- passwd-file

--- Parse the extra fields (field 8): space-separated key=value; a bare key
-- is true.
local function parse_extra(s)
  local extra = {}
  for field in s:gmatch("[^ \t]+") do
    local k, v = field:match("^([^=]+)=(.*)$")
    if k then extra[k] = v else extra[field] = true end
  end
  return extra
end

--- Parse passwd-file text. Returns records and warnings; never raises on
-- any content.
local function parse_passwd(text, name, opts)
  local records, warnings, dropped = {}, {}, 0
  local function warn(lineno, msg)
    if #warnings < MAX_WARNINGS then
      warnings[#warnings + 1] = ("%s:%d: %s"):format(name, lineno, msg)
    else
      dropped = dropped + 1
    end
  end
  local lineno = 0
  local pos = 1
  local len = #text
  while pos <= len do
    local nl = text:find("\n", pos, true)
    local line = text:sub(pos, (nl or len + 1) - 1)
    pos = (nl or len) + 1
    lineno = lineno + 1
    if line:sub(-1) == "\r" then line = line:sub(1, -2) end
    if #line > MAX_LINE then
      warn(lineno, "line too long, skipped")
    elseif line:find("^%s*$") or line:find("^%s*#") then -- luacheck: ignore 542
      -- blank or comment
    elseif line:find("[%z\1-\8\10-\31\127]") then
      warn(lineno, "control characters, skipped")
    else
      local fields = {}
      for f in (line .. ":"):gmatch("([^:]*):") do fields[#fields + 1] = f end
      local user, secret = fields[1], fields[2]
      if #fields < 2 or user == "" then
        warn(lineno, "malformed line (expected user:password), skipped")
      elseif user:find("[%s]") then
        warn(lineno, "white space in user name, skipped")
      else
        if opts.lowercase then user = user:lower() end
        if records[user] then
          warn(lineno, "duplicate user " .. user .. ", kept the first")
        else
          local rec
          if secret == "" then
            rec = { user = user, scheme = "", secret = "", kind = "invalid", problem = "empty password" }
          else
            rec = make_record(user, secret, opts.default_scheme)
          end
          if rec.kind == "invalid" then
            warn(lineno, ("user %s: %s"):format(user, rec.problem))
          end
          local function field(i)
            local v = fields[i]
            return v ~= nil and v ~= "" and v or nil
          end
          rec.uid, rec.gid, rec.gecos = field(3), field(4), field(5)
          rec.home, rec.shell = field(6), field(7)
          -- field 8 onwards: extra fields (they may contain ':')
          rec.extra = parse_extra(#fields >= 8 and table.concat(fields, ":", 8) or "")
          records[user] = rec
        end
      end
    end
  end
  if dropped > 0 then
    warnings[#warnings + 1] = ("%s: %d more warnings"):format(name, dropped)
  end
  return records, warnings
end

local function read_file(path, max_size)
  local f, err = io.open(path, "rb")
  if not f then return nil, "io", err end
  local size = f:seek("end")
  if size and size > max_size then
    f:close()
    return nil, "limit", ("%s: larger than %d bytes"):format(path, max_size)
  end
  f:seek("set")
  local text = f:read(max_size + 1)
  f:close()
  text = text or ""
  if #text > max_size then
    return nil, "limit", ("%s: larger than %d bytes"):format(path, max_size)
  end
  return text
end

local PasswdStore = setmetatable({}, { __index = Store })
PasswdStore.__index = PasswdStore

--- Load the file; on success install the new data. Returns true or
-- nil, token, detail (the old data stays).
function PasswdStore:_load()
  local sig, err, detail = core.file_signature(self.path)
  if not sig then return nil, err, detail end
  local text
  text, err, detail = read_file(self.path, self._max_size)
  if not text then return nil, err, detail end
  local records, warnings = parse_passwd(text, self.path, self._opts)
  self._current = finish_data(records)
  self.warnings = warnings
  -- A file rewritten while it was read: keep the old signature so the
  -- next check reads it again.
  local after = core.file_signature(self.path)
  self._signature = after == sig and sig or nil
  self._load_error = nil
  return true
end

--- The current data, reloading the file first when it has changed (at
-- most once per check_interval seconds).
function PasswdStore:_data()
  local now = core.time()
  if now - self._checked >= self._interval or now < self._checked then
    self._checked = now
    local sig, err, detail = core.file_signature(self.path)
    if sig ~= self._signature then
      local ok
      if sig then ok, err, detail = self:_load() end
      if not ok then
        local msg = ("%s: reload failed, keeping the previous data: %s"):format(self.path, detail or err)
        if msg ~= self._load_error then
          self._load_error = msg
          if #self.warnings < MAX_WARNINGS + 1 then self.warnings[#self.warnings + 1] = msg end
        end
      end
    end
  end
  return self._current
end

--- credentials.passwd_file(path [, opts]) -> store | nil, token, detail
-- opts: default_scheme ("CRYPT": the scheme of entries without {SCHEME}),
-- lowercase (fold user names to lower case), check_interval (seconds
-- between checks for a changed file, default 1), max_size (bytes, default
-- 64 MiB), scram_iterations (for keys derived from {PLAIN}, default 4096).
-- store.warnings lists the lines skipped or unusable ("path:line: why").
function M.passwd_file(path, opts)
  check_string(path, 1, "path")
  opts = opts or {}
  if type(opts) ~= "table" then error("bad argument #2 (opts: table expected)", 2) end
  local iterations = opts.scram_iterations or SCRAM_DEFAULT_ITERATIONS
  assert(math.type(iterations) == "integer" and iterations >= 1 and iterations <= SCRAM_MAX_ITERATIONS,
    "opts.scram_iterations must be an integer in [1, 10000000]")
  local interval = opts.check_interval or 1
  assert(type(interval) == "number" and interval >= 0, "opts.check_interval must be seconds >= 0")
  local store = setmetatable({
    path = path,
    warnings = {},
    _opts = { default_scheme = opts.default_scheme or "CRYPT", lowercase = opts.lowercase and true or false },
    _lowercase = opts.lowercase and true or false,
    _interval = interval,
    _max_size = opts.max_size or MAX_FILE_SIZE,
    _scram_iterations = iterations,
    _checked = core.time(),
  }, PasswdStore)
  local ok, err, detail = store:_load()
  if not ok then return nil, err, detail end
  return store
end

-- ---------------------------------------------------------------------
-- Table store

--- credentials.table(t [, opts]) -> store
-- t maps user names to "password" (plaintext, unless it starts with a
-- "{SCHEME}" prefix), to "{SCHEME}secret", or to a table
-- { password = "plaintext" } / { secret = "{SCHEME}secret" }, with an
-- optional `extra` table. opts: lowercase, scram_iterations.
function M.table(t, opts)
  if type(t) ~= "table" then error("bad argument #1 (table expected)", 2) end
  opts = opts or {}
  local records = {}
  for user, v in pairs(t) do
    if type(user) ~= "string" or user == "" then error("credentials.table: user names must be strings", 2) end
    local key = opts.lowercase and user:lower() or user
    local rec
    if type(v) == "string" then
      rec = make_record(key, v, "PLAIN")
    elseif type(v) == "table" and type(v.password) == "string" then
      rec = make_record(key, "{PLAIN}" .. v.password, "PLAIN")
    elseif type(v) == "table" and type(v.secret) == "string" then
      rec = make_record(key, v.secret, "PLAIN")
    else
      error("credentials.table: entry for " .. user .. " must be a string or {password=} / {secret=}", 2)
    end
    rec.extra = type(v) == "table" and type(v.extra) == "table" and copy(v.extra) or {}
    records[key] = rec
  end
  return setmetatable({
    warnings = {},
    _current = finish_data(records),
    _lowercase = opts.lowercase and true or false,
    _scram_iterations = opts.scram_iterations or SCRAM_DEFAULT_ITERATIONS,
  }, Store)
end

-- ---------------------------------------------------------------------
-- Hook store

local HookStore = {}
HookStore.__index = HookStore

--- credentials.hook(fns) -> store
-- fns (all optional, but lookup or verify_password is needed):
--   lookup(user) -> entry | nil | nil, token, detail
--       entry = { secret = "{SCHEME}..." } or { password = "plaintext" }
--       (plus extra, ...): the store verifies passwords, derives SCRAM keys
--       and CRAM-MD5 responses from it like a table entry
--   verify_password(user, password) -> boolean | nil, token, detail
--   scram_keys(user, alg) -> keys | nil | nil, token, detail
--       alg is "SCRAM-SHA-1" or "SCRAM-SHA-256"
--   cram_md5(user) -> function(challenge) -> hex | nil
--   capabilities: a table like store:capabilities() returns, or a
--       function returning one
-- The functions run in the task of the SMTP session, so they may wait
-- (network I/O). Making unknown users cost as much as known ones is up
-- to them when they implement verify_password.
function M.hook(fns)
  if type(fns) ~= "table" then error("bad argument #1 (table expected)", 2) end
  for _, k in ipairs { "lookup", "verify_password", "scram_keys", "cram_md5" } do
    if fns[k] ~= nil and type(fns[k]) ~= "function" then
      error("bad argument #1 (" .. k .. " must be a function)", 2)
    end
  end
  if not fns.lookup and not fns.verify_password then
    error("bad argument #1 (lookup or verify_password is required)", 2)
  end
  return setmetatable({ warnings = {}, _fns = fns, _derived = {} }, HookStore)
end

-- A record from a hook's entry, or nil, token, detail.
function HookStore:_record(user)
  local entry, err, detail = self._fns.lookup(user)
  if entry == nil then return nil, err, detail end
  if type(entry) ~= "table" then error("credentials hook: lookup must return a table or nil", 0) end
  local rec
  if type(entry.password) == "string" then
    rec = make_record(user, "{PLAIN}" .. entry.password, "PLAIN")
  elseif type(entry.secret) == "string" then
    rec = make_record(user, entry.secret, entry.scheme or "PLAIN")
  else
    rec = { user = user, scheme = "", secret = "", kind = "invalid" }
  end
  rec.extra = type(entry.extra) == "table" and entry.extra or {}
  return rec
end

function HookStore:lookup(user)
  check_string(user, 1, "user")
  if not self._fns.lookup then return nil end
  local rec, err, detail = self:_record(user)
  if not rec then return nil, err, detail end
  return public_entry(rec)
end

function HookStore:verify_password(user, password)
  check_string(user, 1, "user")
  check_string(password, 2, "password")
  if self._fns.verify_password then
    local ok, err, detail = self._fns.verify_password(user, password)
    if ok == nil and err then return nil, err, detail end
    return ok == true
  end
  local rec, err, detail = self:_record(user)
  if not rec then
    if err then return nil, err, detail end
    return false
  end
  return verify_record(rec, password) == true
end

function HookStore:scram_keys(user, alg)
  check_string(user, 1, "user")
  local a = SCRAM_ALGS[alg]
  if not a then
    error("bad argument #2 (alg: \"SCRAM-SHA-1\" or \"SCRAM-SHA-256\" expected)", 2)
  end
  if self._fns.scram_keys then
    return self._fns.scram_keys(user, SCRAM_MECH[a])
  end
  if not self._fns.lookup then return nil end
  local rec, err, detail = self:_record(user)
  if not rec then return nil, err, detail end
  if rec.kind == "scram" then
    return rec.alg == a and copy(rec.scram) or nil
  elseif rec.kind == "plain" then
    -- derived keys are cached per user, algorithm and password
    local key = a .. "\0" .. user
    local cached = self._derived[key]
    if not cached or not equal(cached.password_hash, digest("sha256", rec.password)) then
      cached = {
        password_hash = digest("sha256", rec.password),
        keys = derive_scram(a, rec.password, core.random(16), SCRAM_DEFAULT_ITERATIONS),
      }
      self._derived[key] = cached
    end
    return copy(cached.keys)
  end
  return nil
end

function HookStore:cram_md5(user)
  check_string(user, 1, "user")
  if self._fns.cram_md5 then return self._fns.cram_md5(user) end
  if not self._fns.lookup then return nil end
  local rec, err, detail = self:_record(user)
  if not rec then return nil, err, detail end
  local context
  if rec.kind == "cram" then
    context = rec.context
  elseif rec.kind == "plain" then
    context = core.cram_md5_context(rec.password)
  else
    return nil
  end
  return function(challenge) return core.cram_md5_response(context, challenge) end
end

function HookStore:capabilities()
  local caps = self._fns.capabilities
  if type(caps) == "function" then caps = caps() end
  if type(caps) == "table" then
    local scram = type(caps.scram) == "table" and caps.scram or {}
    return {
      plaintext = caps.plaintext ~= false,
      cram_md5 = caps.cram_md5 == true,
      scram = { ["SCRAM-SHA-1"] = scram["SCRAM-SHA-1"] == true, ["SCRAM-SHA-256"] = scram["SCRAM-SHA-256"] == true },
    }
  end
  -- Without a declaration: only what the hooks given can surely serve.
  local scram = self._fns.scram_keys ~= nil
  return {
    plaintext = true,
    cram_md5 = self._fns.cram_md5 ~= nil,
    scram = { ["SCRAM-SHA-1"] = scram, ["SCRAM-SHA-256"] = scram },
  }
end

-- ---------------------------------------------------------------------
-- Creating entries and fake SCRAM keys

local CRYPT_PREFIX = { ["SHA512-CRYPT"] = "$6$", ["SHA256-CRYPT"] = "$5$", ["BLF-CRYPT"] = "$2y$" }

--- credentials.hash(password, scheme [, opts]) -> "{SCHEME}..."
-- scheme: "SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "CRYPT" (yescrypt
-- where libxcrypt has it, else SHA512-CRYPT), "SCRAM-SHA-1",
-- "SCRAM-SHA-256", "CRAM-MD5", "PLAIN". opts.rounds: crypt cost (default:
-- the method's default, 10 for BLF-CRYPT); opts.iterations: SCRAM
-- iterations (default 4096). Raises on an unknown scheme or a password
-- crypt(3) cannot take (NUL bytes, 512 bytes or more).
function M.hash(password, scheme, opts)
  check_string(password, 1, "password")
  check_string(scheme, 2, "scheme")
  opts = opts or {}
  scheme = scheme:upper()
  if scheme == "PLAIN" then
    return "{PLAIN}" .. password
  elseif scheme == "CRAM-MD5" then
    return "{CRAM-MD5}" .. core.cram_md5_context(password)
  elseif scheme == "SCRAM-SHA-1" or scheme == "SCRAM-SHA-256" then
    local iterations = opts.iterations or SCRAM_DEFAULT_ITERATIONS
    local k = derive_scram(SCRAM_ALGS[scheme], password, core.random(16), iterations)
    return ("{%s}%d,%s,%s,%s"):format(scheme, k.iterations, b64encode(k.salt),
      b64encode(k.stored_key), b64encode(k.server_key))
  end
  local prefix = CRYPT_PREFIX[scheme]
  local rounds = opts.rounds
  if scheme == "BLF-CRYPT" then
    rounds = rounds or 10
  elseif scheme == "CRYPT" then
    prefix = pcall(core.crypt_gensalt, "$y$") and "$y$" or "$6$"
  end
  if not prefix then
    error("bad argument #2 (unsupported scheme " .. scheme .. ")", 2)
  end
  local h, _, detail = core.crypt(password, core.crypt_gensalt(prefix, rounds or 0))
  if not h then error("credentials.hash: " .. detail, 2) end
  return "{" .. scheme .. "}" .. h
end

local fake_secret
--- credentials.fake_scram_keys(user, alg) -> keys
-- Keys to run a SCRAM exchange for an unknown user to its end, so the
-- salt and iteration count do not reveal that the user does not exist:
-- the salt is the same for the same user within the process, the keys
-- are random (the proof never verifies).
function M.fake_scram_keys(user, alg)
  check_string(user, 1, "user")
  local a = SCRAM_ALGS[alg]
  if not a then
    error("bad argument #2 (alg: \"SCRAM-SHA-1\" or \"SCRAM-SHA-256\" expected)", 2)
  end
  fake_secret = fake_secret or core.random(32)
  return {
    salt = hmac("sha256", fake_secret, a .. "\0" .. user):sub(1, 16),
    iterations = SCRAM_DEFAULT_ITERATIONS,
    stored_key = core.random(HASH_SIZE[a]),
    server_key = core.random(HASH_SIZE[a]),
  }
end

return M
