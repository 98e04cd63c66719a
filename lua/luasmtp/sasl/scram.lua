--- luasmtp.sasl.scram: SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802,
-- RFC 7677) and their -PLUS variants with channel binding (tls-exporter,
-- RFC 9266; tls-unique, RFC 5929), client and server side.
--
--   C: gs2-header client-first-bare        n,,n=user,r=<cnonce>
--   S: server-first                        r=<cnonce><snonce>,s=<salt>,i=<n>
--   C: client-final                        c=<b64 gs2-header+cbdata>,r=<nonce>,p=<proof>
--   S: server-final                        v=<b64 ServerSignature> | e=<error>
--
-- SaltedPassword = Hi(SASLprep(password), salt, i)   (PBKDF2-HMAC)
-- ClientKey = HMAC(SaltedPassword, "Client Key"), StoredKey = H(ClientKey)
-- ServerKey = HMAC(SaltedPassword, "Server Key")
-- AuthMessage = client-first-bare "," server-first "," client-final-without-proof
-- ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage)
-- ServerSignature = HMAC(ServerKey, AuthMessage)
local core = require "luasmtp.core"
local credentials = require "luasmtp.credentials"
local gs2 = require "luasmtp.sasl.gs2"
local saslprep = require "luasmtp.sasl.saslprep"

local hmac, digest, pbkdf2 = core.hmac, core.digest, core.pbkdf2
local b64encode, b64decode, equal, xor = core.b64encode, core.b64decode, core.equal, core.xor

local M = {}

-- mechanism (without -PLUS) -> digest algorithm and output size
M.ALGORITHMS = {
  ["SCRAM-SHA-1"] = { alg = "sha1", size = 20 },
  ["SCRAM-SHA-256"] = { alg = "sha256", size = 32 },
}

M.DEFAULT_MIN_ITERATIONS = 4096
M.DEFAULT_MAX_ITERATIONS = 1000000
M.CLIENT_NONCE_BYTES = 24
M.SERVER_NONCE_BYTES = 24
local MAX_NONCE = 1024

--- split_name("SCRAM-SHA-256-PLUS") -> "SCRAM-SHA-256", true
function M.split_name(mech)
  local base = mech:match("^(.-)%-PLUS$")
  if base and M.ALGORITHMS[base] then
    return base, true
  end
  if M.ALGORITHMS[mech] then
    return mech, false
  end
  return nil
end

-- A nonce is printable ASCII without ",".
local function valid_nonce(n)
  return #n >= 1 and #n <= MAX_NONCE and not n:find("[^\33-\43\45-\126]")
end

--- Split a SCRAM message into its attributes, in order:
-- { {name, value}, ... } or nil when one is not `x=value`.
local function attributes(msg)
  local list = {}
  for field in (msg .. ","):gmatch("([^,]*),") do
    local name, value = field:match("^(%a)=(.*)$")
    if not name then
      return nil
    end
    list[#list + 1] = { name, value }
  end
  return list
end

--- SCRAM keys from a password: what a server stores.
-- derive_keys(mech, password, salt, iterations) -> { salt, iterations,
-- stored_key, server_key } (the password is SASLprepped first; raises if
-- it cannot be).
function M.derive_keys(mech, password, salt, iterations)
  local a = assert(M.ALGORITHMS[M.split_name(mech) or ""], "unknown SCRAM mechanism")
  local prepared = assert(saslprep.prepare(password))
  local salted = pbkdf2(a.alg, prepared, salt, iterations, a.size)
  return {
    salt = salt,
    iterations = iterations,
    stored_key = digest(a.alg, hmac(a.alg, salted, "Client Key")),
    server_key = hmac(a.alg, salted, "Server Key"),
  }
end

---------------------------------------------------------------------------
-- Client

local Client = {}
Client.__index = Client

--- client(mech, creds, opts) -> object | nil, "invalid", detail
-- creds: user, password, authzid (optional).
-- opts:
--   channel_binding  { type = "tls-exporter" | "tls-unique", data = bytes }:
--                    required for -PLUS; for the plain variant it makes
--                    the client send "y" (it supports channel binding but
--                    believes the server does not)
--   nonce            client nonce (tests: known-answer vectors)
--   min_iterations   refuse fewer (default 4096)
--   max_iterations   refuse more: a server could make us burn CPU (1000000)
function M.client(mech, creds, opts)
  local base, plus = M.split_name(mech)
  assert(base, "unknown SCRAM mechanism")
  assert(type(creds.user) == "string", "SCRAM needs creds.user")
  assert(type(creds.password) == "string", "SCRAM needs creds.password")
  local cb = opts.channel_binding
  if plus then
    assert(type(cb) == "table" and type(cb.type) == "string" and type(cb.data) == "string",
      mech .. " needs opts.channel_binding = { type =, data = }")
  end
  local user, err = saslprep.prepare(creds.user)
  if not user then
    return nil, "invalid", "user name: " .. err
  end
  local password
  password, err = saslprep.prepare(creds.password)
  if not password then
    return nil, "invalid", "password: " .. err
  end
  local min_i = opts.min_iterations or M.DEFAULT_MIN_ITERATIONS
  local max_i = opts.max_iterations or M.DEFAULT_MAX_ITERATIONS
  assert(math.type(min_i) == "integer" and min_i >= 1, "opts.min_iterations must be an integer >= 1")
  assert(math.type(max_i) == "integer" and max_i >= min_i and max_i <= 10000000,
    "opts.max_iterations must be an integer in [min_iterations, 10000000]")
  local nonce = opts.nonce or b64encode(core.random(M.CLIENT_NONCE_BYTES))
  assert(type(nonce) == "string" and valid_nonce(nonce), "opts.nonce must be printable ASCII without ','")
  local flag
  if plus then
    flag = "p"
  elseif cb then
    flag = "y"
  else
    flag = "n"
  end
  return setmetatable({
    name = mech,
    algorithm = M.ALGORITHMS[base],
    user = user,
    password = password,
    authzid = creds.authzid,
    cb = plus and cb or nil,
    flag = flag,
    nonce = nonce,
    min_iterations = min_i,
    max_iterations = max_i,
    state = "start",
  }, Client)
end

--- mech:start() -> client-first-message
function Client:start()
  assert(self.state == "start", "start called twice")
  self.header = gs2.header(self.flag, self.cb and self.cb.type, self.authzid)
  self.client_first_bare = "n=" .. gs2.encode_name(self.user) .. ",r=" .. self.nonce
  self.state = "first"
  return self.header .. self.client_first_bare
end

-- server-first -> client-final
function Client:_final(server_first)
  local attrs = attributes(server_first)
  if not attrs then
    return nil, "malformed server-first-message"
  end
  if attrs[1][1] == "e" then
    return nil, "server error: " .. attrs[1][2]
  elseif attrs[1][1] == "m" then
    return nil, "server requires an unsupported extension"
  end
  if #attrs < 3 or attrs[1][1] ~= "r" or attrs[2][1] ~= "s" or attrs[3][1] ~= "i" then
    return nil, "malformed server-first-message"
  end
  local nonce, salt, iterations = attrs[1][2], b64decode(attrs[2][2]), attrs[3][2]
  if not valid_nonce(nonce) then
    return nil, "malformed server nonce"
  end
  if #nonce <= #self.nonce or nonce:sub(1, #self.nonce) ~= self.nonce then
    return nil, "server nonce does not extend the client nonce"
  end
  if not salt or salt == "" then
    return nil, "missing or invalid salt"
  end
  if not iterations:match("^[1-9]%d*$") or #iterations > 9 then
    return nil, "invalid iteration count"
  end
  iterations = math.tointeger(tonumber(iterations))
  if iterations < self.min_iterations then
    return nil, ("iteration count %d below the minimum %d"):format(iterations, self.min_iterations)
  end
  if iterations > self.max_iterations then
    return nil, ("iteration count %d above the maximum %d"):format(iterations, self.max_iterations)
  end
  local a = self.algorithm
  local salted = pbkdf2(a.alg, self.password, salt, iterations, a.size)
  self.password = nil
  local client_key = hmac(a.alg, salted, "Client Key")
  local stored_key = digest(a.alg, client_key)
  local server_key = hmac(a.alg, salted, "Server Key")
  local cbind = self.header .. (self.cb and self.cb.data or "")
  local without_proof = "c=" .. b64encode(cbind) .. ",r=" .. nonce
  local auth_message = self.client_first_bare .. "," .. server_first .. "," .. without_proof
  local proof = xor(client_key, hmac(a.alg, stored_key, auth_message))
  self.server_signature = hmac(a.alg, server_key, auth_message)
  return without_proof .. ",p=" .. b64encode(proof)
end

-- server-final: checks the server signature (constant time)
function Client:_verify(server_final)
  local attrs = attributes(server_final)
  if not attrs then
    return nil, "malformed server-final-message"
  end
  if attrs[1][1] == "e" then
    return nil, "server error: " .. attrs[1][2], true
  end
  local v = attrs[1][1] == "v" and b64decode(attrs[1][2])
  if not v then
    return nil, "malformed server-final-message"
  end
  if not equal(v, self.server_signature) then
    return nil, "server signature mismatch: the server does not know the credentials"
  end
  self.verified = true
  return true
end

--- mech:step(challenge) -> response | nil, err
-- A server-final e= error is answered with an empty response (the
-- server then fails the exchange); mech.error holds it.
function Client:step(challenge)
  if self.state == "first" then
    self.state = "final"
    local resp, err = self:_final(challenge)
    if not resp then
      self.state = "failed"
      self.error = err
    end
    return resp, err
  elseif self.state == "final" then
    self.state = "done"
    local ok, err, reported = self:_verify(challenge)
    if not ok then
      self.state = "failed"
      self.error = err
      if reported then
        return ""
      end
      return nil, err
    end
    return ""
  end
  self.error = "unexpected challenge"
  return nil, self.error
end

--- mech:finish(server_final) -> true | nil, err
-- For protocols that carry server-final with the success reply.
function Client:finish(server_final)
  if self.state ~= "final" then
    return nil, "unexpected server-final-message"
  end
  self.state = "done"
  local ok, err = self:_verify(server_final)
  if not ok then
    self.error = err
  end
  return ok, err
end

--- mech:complete() -> true once the server has proved itself
function Client:complete()
  return self.verified == true
end

---------------------------------------------------------------------------
-- Server

local Server = {}
Server.__index = Server

--- Keys for a user the verifier does not know (see
-- credentials.fake_scram_keys), with the iteration count the policy
-- says the real entries use.
local function fake_keys(mech, user, iterations)
  local keys = credentials.fake_scram_keys(user, mech)
  keys.iterations = iterations
  return keys, true
end

--- server(ctx) -> object with :step(msg) (see luasmtp.sasl)
-- ctx: mechanism, verifier, policy, cb_types (set of offered types),
-- supports_cb (the server offers the -PLUS variant).
function M.server(ctx)
  local base, plus = M.split_name(ctx.mechanism)
  assert(base, "unknown SCRAM mechanism")
  return setmetatable({
    ctx = ctx,
    base = base,
    plus = plus,
    algorithm = M.ALGORITHMS[base],
    state = "start",
  }, Server)
end

function Server:_first(msg)
  local ctx, policy = self.ctx, self.ctx.policy
  local header, bare = gs2.parse(msg)
  if not header then
    return "failure", "malformed", bare
  end
  if header.flag == "p" then
    if not self.plus then
      return "failure", "malformed", "channel binding requested with a non-PLUS mechanism"
    end
    if not ctx.cb_types[header.cb_type] then
      return "failure", "credentials", "unsupported channel binding type " .. header.cb_type
    end
  elseif self.plus then
    return "failure", "malformed", "-PLUS mechanism without channel binding"
  elseif header.flag == "y" and ctx.supports_cb then
    return "failure", "credentials", "channel binding downgrade detected (client sent y)"
  end
  local attrs = attributes(bare)
  if not attrs or #attrs < 2 then
    return "failure", "malformed", "malformed client-first-message"
  end
  if attrs[1][1] == "m" then
    return "failure", "malformed", "unsupported mandatory extension"
  end
  if attrs[1][1] ~= "n" or attrs[2][1] ~= "r" then
    return "failure", "malformed", "malformed client-first-message"
  end
  local user = gs2.decode_name(attrs[1][2])
  if not user then
    return "failure", "malformed", "invalid user name encoding"
  end
  local prepared = saslprep.prepare(user)
  if not prepared then
    return "failure", "malformed", "user name not allowed by SASLprep"
  end
  local cnonce = attrs[2][2]
  if not valid_nonce(cnonce) then
    return "failure", "malformed", "invalid client nonce"
  end
  local keys, err, detail = ctx.verifier:scram_keys(prepared, self.base)
  local fake = false
  if keys == nil and err ~= nil then
    return "failure", "tempfail", detail or err
  end
  local a = self.algorithm
  if keys == nil then
    keys, fake = fake_keys(self.base, prepared, policy.scram_iterations or 4096)
  end
  assert(type(keys) == "table" and type(keys.salt) == "string" and #keys.salt > 0
    and math.type(keys.iterations) == "integer" and keys.iterations >= 1
    and type(keys.stored_key) == "string" and #keys.stored_key == a.size
    and type(keys.server_key) == "string" and #keys.server_key == a.size,
    "verifier:scram_keys returned malformed keys")
  self.user, self.authzid, self.header, self.keys, self.fake = prepared, header.authzid, header, keys, fake
  self.nonce = cnonce .. (policy.nonce or b64encode(core.random(M.SERVER_NONCE_BYTES)))
  self.client_first_bare = bare
  self.server_first = ("r=%s,s=%s,i=%d"):format(self.nonce, b64encode(keys.salt), keys.iterations)
  self.state = "final"
  return "challenge", self.server_first
end

function Server:_final(msg)
  local attrs = attributes(msg)
  if not attrs or #attrs < 3 or attrs[1][1] ~= "c" or attrs[2][1] ~= "r" or attrs[#attrs][1] ~= "p" then
    return "failure", "malformed", "malformed client-final-message"
  end
  local cbind, proof = b64decode(attrs[1][2]), b64decode(attrs[#attrs][2])
  if not cbind or not proof then
    return "failure", "malformed", "invalid base64 in client-final-message"
  end
  if attrs[2][2] ~= self.nonce then
    return "failure", "malformed", "nonce mismatch"
  end
  local expected = self.header.text
  if self.header.flag == "p" then
    local data = self.ctx.channel_binding(self.header.cb_type)
    if not data then
      return "failure", "tempfail", "channel binding data unavailable"
    end
    expected = expected .. data
  end
  self.state = "failed"
  if not equal(cbind, expected) then
    self.reason = "channel binding mismatch"
    return "challenge", "e=channel-bindings-dont-match"
  end
  local a, keys = self.algorithm, self.keys
  local without_proof = msg:sub(1, #msg - #attrs[#attrs][2] - 3)
  local auth_message = self.client_first_bare .. "," .. self.server_first .. "," .. without_proof
  local signature = hmac(a.alg, keys.stored_key, auth_message)
  local ok = #proof == a.size and equal(digest(a.alg, xor(proof, signature)), keys.stored_key)
  if not ok or self.fake then
    self.reason = "invalid proof"
    return "challenge", "e=invalid-proof"
  end
  self.state = "verified"
  return "challenge", "v=" .. b64encode(hmac(a.alg, keys.server_key, auth_message))
end

function Server:step(msg)
  local state = self.state
  if state == "start" then
    if msg == nil then
      return "challenge", ""
    end
    return self:_first(msg)
  elseif state == "final" then
    return self:_final(msg)
  elseif state == "verified" then
    self.state = "done"
    if msg ~= "" then
      return "failure", "malformed", "non-empty response after server-final-message"
    end
    return "success", self.user, self.authzid, { channel_binding = self.header.cb_type }
  elseif state == "failed" then
    self.state = "done"
    return "failure", "credentials", self.reason
  end
  return "failure", "malformed", "unexpected message"
end

return M
