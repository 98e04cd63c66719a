--- luasmtp.credentials.hook: a store over the script's own functions
-- (LDAP, SQL, HTTP); they run in the session's task and may wait.
local core = require "luasmtp.core"

local digest, equal = core.digest, core.equal
local schemes = require "luasmtp.credentials.schemes"

local SCRAM_DEFAULT_ITERATIONS = schemes.SCRAM_DEFAULT_ITERATIONS
local SCRAM_ALGS, SCRAM_MECH = schemes.SCRAM_ALGS, schemes.SCRAM_MECH
local check_string, copy, make_record = schemes.check_string, schemes.copy, schemes.make_record
local verify_record, derive_scram = schemes.verify_record, schemes.derive_scram
local store = require "luasmtp.credentials.store"
local public_entry = store.public_entry

local M = {}

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


return M
