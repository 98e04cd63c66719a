--- luasmtp.sasl.password: the mechanisms that send the password itself,
-- PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login), client and
-- server side. Only offered or used over TLS unless told otherwise.
--
--   PLAIN:  C: [authzid] NUL authcid NUL passwd
--   LOGIN:  S: "Username:"  C: user  S: "Password:"  C: passwd
local M = {}

-- The verifier's answer: "success" / "failure" triple for the driver.
local function check(ctx, user, password, authzid)
  local ok, err, detail = ctx.verifier:verify_password(user, password, authzid)
  if ok == nil and err ~= nil then
    return "failure", "tempfail", detail or err
  end
  if ok ~= true then
    return "failure", "credentials", "invalid password"
  end
  return "success", user, authzid
end

---------------------------------------------------------------------------
-- PLAIN

local PlainServer = {}
PlainServer.__index = PlainServer

function PlainServer:step(msg)
  if self.done then
    return "failure", "malformed", "unexpected message"
  end
  if msg == nil then
    return "challenge", ""
  end
  self.done = true
  local authzid, user, password = msg:match("^([^%z]*)%z([^%z]*)%z([^%z]*)$")
  if not authzid or user == "" or password == "" then
    return "failure", "malformed", "malformed PLAIN message"
  end
  if not utf8.len(msg) then
    return "failure", "malformed", "PLAIN message is not UTF-8"
  end
  return check(self.ctx, user, password, authzid ~= "" and authzid or nil)
end

local PlainClient = {}
PlainClient.__index = PlainClient

function PlainClient:start()
  self.sent = true
  return (self.authzid or "") .. "\0" .. self.user .. "\0" .. self.password
end

function PlainClient.step()
  return nil, "unexpected challenge"
end

function PlainClient:complete()
  return self.sent == true
end

---------------------------------------------------------------------------
-- LOGIN

local LoginServer = {}
LoginServer.__index = LoginServer

function LoginServer:step(msg)
  local state = self.state
  if state == "start" then
    if msg == nil then
      self.state = "user"
      return "challenge", "Username:"
    end
    state = "user" -- initial response: the user name
  end
  if state == "user" then
    if msg:find("%z") or not utf8.len(msg) then
      self.state = "done"
      return "failure", "malformed", "bad user name"
    end
    self.user, self.state = msg, "password"
    return "challenge", "Password:"
  elseif state == "password" then
    self.state = "done"
    if self.user == "" or msg == "" then
      return "failure", "credentials", "empty user name or password"
    end
    return check(self.ctx, self.user, msg, nil)
  end
  return "failure", "malformed", "unexpected message"
end

local LoginClient = {}
LoginClient.__index = LoginClient

function LoginClient.start()
  return nil
end

function LoginClient:step()
  self.steps = self.steps + 1
  if self.steps == 1 then
    return self.user
  elseif self.steps == 2 then
    return self.password
  end
  return nil, "unexpected challenge"
end

function LoginClient:complete()
  return self.steps == 2
end

---------------------------------------------------------------------------

function M.server(ctx)
  if ctx.mechanism == "PLAIN" then
    return setmetatable({ ctx = ctx }, PlainServer)
  end
  return setmetatable({ ctx = ctx, state = "start" }, LoginServer)
end

function M.client(mech, creds)
  assert(type(creds.user) == "string" and creds.user ~= "", mech .. " needs creds.user")
  assert(type(creds.password) == "string" and creds.password ~= "", mech .. " needs creds.password")
  if mech == "PLAIN" then
    assert(not creds.user:find("%z") and not creds.password:find("%z")
      and not (creds.authzid or ""):find("%z"), "PLAIN credentials must not contain NUL")
    return setmetatable({ name = mech, user = creds.user, password = creds.password,
      authzid = creds.authzid }, PlainClient)
  end
  assert(creds.authzid == nil, "LOGIN has no authorization identity")
  return setmetatable({ name = mech, user = creds.user, password = creds.password, steps = 0 }, LoginClient)
end

return M
