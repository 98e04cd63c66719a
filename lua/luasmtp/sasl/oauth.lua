--- luasmtp.sasl.oauth: OAuth 2.0 bearer tokens, OAUTHBEARER (RFC 7628)
-- and Google's XOAUTH2, client and server side.
--
--   OAUTHBEARER  C: n,a=user,^Ahost=...^Aport=...^Aauth=Bearer <token>^A^A
--   XOAUTH2      C: user=<user>^Aauth=Bearer <token>^A^A
-- On a bad token the server sends a JSON error status as a challenge;
-- the client answers ^A (OAUTHBEARER) or an empty response (XOAUTH2) and
-- the server fails the exchange.
--
-- The server asks verifier:verify_token(user, token, mechanism), which
-- returns true (the token is good for user), a user name (the token's
-- owner, for OAUTHBEARER without a= or when it knows better), false, or
-- nil, token, detail when its backend fails.
local gs2 = require "luasmtp.sasl.gs2"

local M = {}

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return ({ ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" })[c]
      or ("\\u%04x"):format(c:byte())
  end) .. '"'
end

--- The error status a server sends for a refused token (RFC 7628 3.2.2).
local function error_json(policy)
  local fields = { '"status":' .. json_string(policy.oauth_status or "invalid_token") }
  if policy.oauth_scope then
    fields[#fields + 1] = '"scope":' .. json_string(policy.oauth_scope)
  end
  if policy.oauth_configuration then
    fields[#fields + 1] = '"openid-configuration":' .. json_string(policy.oauth_configuration)
  end
  return "{" .. table.concat(fields, ",") .. "}"
end

--- "k=v^Ak=v^A" -> { k = v } | nil (keys are letters; values printable,
-- space, tab, CR, LF).
local function kvpairs(s)
  local t = {}
  for pair in s:gmatch("([^\1]*)\1") do
    local k, v = pair:match("^(%a+)=([\t\n\r\32-\126]*)$")
    if not k or t[k] then
      return nil
    end
    t[k] = v
  end
  return t
end

local function bearer(auth)
  return auth and auth:match("^[Bb][Ee][Aa][Rr][Ee][Rr] +([%w%-%._~%+/]+=*)$")
end

---------------------------------------------------------------------------
-- Server

local Server = {}
Server.__index = Server

function Server:_parse(msg)
  if self.ctx.mechanism == "XOAUTH2" then
    local body = msg:match("^(.*\1)\1$")
    local kv = body and kvpairs(body)
    if not kv or not kv.user or kv.user == "" then
      return nil
    end
    return kv.user, bearer(kv.auth)
  end
  local header, rest = gs2.parse(msg)
  if not header or header.flag == "p" then
    return nil
  end
  local body = rest:match("^\1(.*\1)\1$") or (rest == "\1\1" and "")
  local kv = body and kvpairs(body)
  if not kv then
    return nil
  end
  return header.authzid or "", bearer(kv.auth)
end

function Server:step(msg)
  local state = self.state
  if state == "start" then
    if msg == nil then
      return "challenge", ""
    end
    local user, token = self:_parse(msg)
    if not user or not token then
      self.state = "done"
      return "failure", "malformed", "malformed " .. self.ctx.mechanism .. " message"
    end
    local ok, err, detail = self.ctx.verifier:verify_token(user, token, self.ctx.mechanism)
    if ok == nil and err ~= nil then
      self.state = "done"
      return "failure", "tempfail", detail or err
    end
    if type(ok) == "string" and ok ~= "" then
      user = ok
    elseif ok ~= true or user == "" then
      self.state = "refused"
      return "challenge", error_json(self.ctx.policy)
    end
    self.state = "done"
    return "success", user, nil
  elseif state == "refused" then
    self.state = "done"
    return "failure", "credentials", "invalid token"
  end
  return "failure", "malformed", "unexpected message"
end

---------------------------------------------------------------------------
-- Client

local Client = {}
Client.__index = Client

function Client:start()
  local token = "auth=Bearer " .. self.token .. "\1"
  if self.name == "XOAUTH2" then
    return "user=" .. self.user .. "\1" .. token .. "\1"
  end
  local extra = ""
  if self.host then extra = extra .. "host=" .. self.host .. "\1" end
  if self.port then extra = extra .. "port=" .. math.tointeger(self.port) .. "\1" end
  return gs2.header("n", nil, self.user) .. "\1" .. extra .. token .. "\1"
end

--- The only challenge is the server's error status (JSON): kept in
-- mech.error, answered as the mechanism requires.
function Client:step(challenge)
  if self.error then
    return nil, "unexpected challenge"
  end
  self.error = "server refused the token: " .. challenge
  self.error_json = challenge
  return self.name == "XOAUTH2" and "" or "\1"
end

function Client:complete()
  return self.error == nil
end

function M.server(ctx)
  return setmetatable({ ctx = ctx, state = "start" }, Server)
end

--- creds: user (required for XOAUTH2, the a= of OAUTHBEARER), token.
-- opts: host, port (OAUTHBEARER kvpairs, optional).
function M.client(mech, creds, opts)
  assert(type(creds.token) == "string" and bearer("Bearer " .. creds.token),
    mech .. " needs creds.token (a bearer token: base64url characters)")
  if mech == "XOAUTH2" then
    assert(type(creds.user) == "string" and creds.user ~= "", "XOAUTH2 needs creds.user")
  end
  assert(creds.user == nil or (type(creds.user) == "string" and not creds.user:find("[%c]")),
    "creds.user must be a string without control characters")
  assert(opts.host == nil or (type(opts.host) == "string" and not opts.host:find("[%c]")), "bad opts.host")
  return setmetatable({ name = mech, user = creds.user, token = creds.token,
    host = opts.host, port = opts.port }, Client)
end

return M
