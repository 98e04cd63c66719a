--- luasmtp.credentials.store: stores backed by records (the passwd-file
-- store and the table store share these methods).
local core = require "luasmtp.core"

local b64encode = core.b64encode
local schemes = require "luasmtp.credentials.schemes"

local SCRAM_DEFAULT_ITERATIONS = schemes.SCRAM_DEFAULT_ITERATIONS
local SCRAM_ALGS, SCRAM_MECH = schemes.SCRAM_ALGS, schemes.SCRAM_MECH
local check_string, copy, make_record = schemes.check_string, schemes.copy, schemes.make_record
local verify_record, derive_scram = schemes.verify_record, schemes.derive_scram

local options = require "luasmtp.options"

local M = {}

M.table_schema = options.schema("credentials.table", {
  { "lowercase", "boolean", false, "fold user names to lower case" },
  { "scram_iterations", "integer", SCRAM_DEFAULT_ITERATIONS, "for SCRAM keys derived from the passwords" },
})

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
-- Table store

--- credentials.table(t [, opts]) -> store
-- t maps user names to "password" (plaintext, unless it starts with a
-- "{SCHEME}" prefix), to "{SCHEME}secret", or to a table
-- { password = "plaintext" } / { secret = "{SCHEME}secret" }, with an
-- optional `extra` table. opts: lowercase, scram_iterations.
function M.table(t, opts)
  if type(t) ~= "table" then error("bad argument #1 (table expected)", 2) end
  opts = M.table_schema:apply(opts, 2)
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


M.Store = Store
M.finish_data = finish_data
M.public_entry = public_entry

return M
