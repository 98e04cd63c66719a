--- luasmtp.sasl.external: EXTERNAL (RFC 4422 appendix A) with the TLS
-- client certificate as the external authentication.
--
--   C: [authzid]
--
-- The server offers it only when the client presented a certificate that
-- verified against the server's trust store. Who the certificate names is
-- policy: verifier:external(identity, authzid) gets the certificate
-- details (subject, issuer, common_name, sans = {dns, ip, email},
-- fingerprint, ...) and the requested authorization identity, and returns
-- the user name or nil. M.certificate_identity picks the usual candidate.
local M = {}

--- certificate_identity(peer) -> the first email SAN, else the subject
-- common name, else nil.
function M.certificate_identity(peer)
  if type(peer) ~= "table" then
    return nil
  end
  local emails = peer.sans and peer.sans.email
  if emails and emails[1] and emails[1] ~= "" then
    return emails[1]
  end
  if peer.common_name and peer.common_name ~= "" then
    return peer.common_name
  end
  return nil
end

local Server = {}
Server.__index = Server

function Server:step(msg)
  if self.done then
    return "failure", "malformed", "unexpected message"
  end
  if msg == nil then
    return "challenge", ""
  end
  self.done = true
  if msg:find("%z") or not utf8.len(msg) then
    return "failure", "malformed", "malformed authorization identity"
  end
  local peer = self.ctx.peer
  if not peer then
    return "failure", "credentials", "no verified client certificate"
  end
  local identity = {}
  for k, v in pairs(peer) do identity[k] = v end
  local authzid = msg ~= "" and msg or nil
  local user, err, detail = self.ctx.verifier:external(identity, authzid)
  if user == nil and err ~= nil then
    return "failure", "tempfail", detail or err
  end
  if type(user) ~= "string" or user == "" then
    return "failure", "credentials", "certificate not accepted"
  end
  return "success", user, authzid
end

local Client = {}
Client.__index = Client

function Client:start()
  self.sent = true
  return self.authzid or ""
end

function Client.step()
  return nil, "unexpected challenge"
end

function Client:complete()
  return self.sent == true
end

function M.server(ctx)
  return setmetatable({ ctx = ctx }, Server)
end

--- creds.authzid: optional identity to act as.
function M.client(mech, creds)
  assert(creds.authzid == nil or type(creds.authzid) == "string", "creds.authzid must be a string")
  return setmetatable({ name = mech, authzid = creds.authzid }, Client)
end

return M
