--- luasmtp.credentials.schemes: Dovecot's {SCHEME}secret notation.
--
-- Parsing an entry into a record, verifying a password against it
-- (constant time), deriving SCRAM keys, making new entries
-- (credentials.hash) and the keys for unknown users. The stores
-- (credentials/store.lua, passwd_file.lua, hook.lua) build on it.
local core = require "luasmtp.core"

local digest, hmac, pbkdf2 = core.digest, core.hmac, core.pbkdf2
local equal, b64decode, b64encode = core.equal, core.b64decode, core.b64encode

local M = {}

local SCRAM_DEFAULT_ITERATIONS = 4096
local SCRAM_MAX_ITERATIONS = 10000000

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


M.SCRAM_DEFAULT_ITERATIONS = SCRAM_DEFAULT_ITERATIONS
M.SCRAM_MAX_ITERATIONS = SCRAM_MAX_ITERATIONS
M.SCRAM_ALGS = SCRAM_ALGS
M.SCRAM_MECH = SCRAM_MECH
M.HASH_SIZE = HASH_SIZE
M.hexdecode = hexdecode
M.check_string = check_string
M.copy = copy
M.split_scheme = split_scheme
M.make_record = make_record
M.verify_record = verify_record
M.derive_scram = derive_scram

return M
