--- luasmtp.sasl.cram_md5: CRAM-MD5 (RFC 2195), client and server side.
--
--   S: <random.timestamp@hostname>
--   C: user SP hex(HMAC-MD5(password, challenge))
--
-- The server asks the verifier for cram_md5(user), a function that
-- computes the expected digest for a challenge (the store keeps the
-- password or Dovecot's {CRAM-MD5} context, never this module).
local core = require "luasmtp.core"

local M = {}

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

local Server = {}
Server.__index = Server

function Server:step(msg)
  local ctx = self.ctx
  if self.state == "start" then
    if msg ~= nil then
      self.state = "done"
      return "failure", "malformed", "CRAM-MD5 takes no initial response"
    end
    local policy = ctx.policy
    self.challenge = policy.challenge or ("<%d.%d@%s>"):format(
      string.unpack("<I4", core.random(4)) % 1000000000, math.floor(core.time()), policy.hostname or "localhost")
    self.state = "response"
    return "challenge", self.challenge
  elseif self.state == "response" then
    self.state = "done"
    local user, response = msg:match("^(.+) (%x+)$")
    if not user or #response ~= 32 or user:find("%z") or not utf8.len(user) then
      return "failure", "malformed", "malformed CRAM-MD5 response"
    end
    local compute, err, detail = ctx.verifier:cram_md5(user)
    if compute == nil and err ~= nil then
      return "failure", "tempfail", detail or err
    end
    local expected
    if compute then
      expected = compute(self.challenge)
    end
    if not expected then
      -- unknown user: spend the same work, then fail
      expected = hex(core.hmac("md5", core.random(16), self.challenge))
      core.equal(expected, response:lower())
      return "failure", "credentials", "invalid response"
    end
    if not core.equal(expected:lower(), response:lower()) then
      return "failure", "credentials", "invalid response"
    end
    return "success", user, nil
  end
  return "failure", "malformed", "unexpected message"
end

local Client = {}
Client.__index = Client

function Client.start()
  return nil
end

function Client:step(challenge)
  if self.answered then
    return nil, "unexpected challenge"
  end
  if challenge == "" then
    return nil, "empty CRAM-MD5 challenge"
  end
  self.answered = true
  return self.user .. " " .. hex(core.hmac("md5", self.password, challenge))
end

function Client:complete()
  return self.answered == true
end

function M.server(ctx)
  return setmetatable({ ctx = ctx, state = "start" }, Server)
end

function M.client(mech, creds)
  assert(type(creds.user) == "string" and creds.user ~= "", "CRAM-MD5 needs creds.user")
  assert(type(creds.password) == "string", "CRAM-MD5 needs creds.password")
  assert(creds.authzid == nil, "CRAM-MD5 has no authorization identity")
  return setmetatable({ name = mech, user = creds.user, password = creds.password }, Client)
end

M.hex = hex

return M
