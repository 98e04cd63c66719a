--- luasmtp.sasl: SMTP AUTH (RFC 4954) over SASL, server and client side.
--
-- The mechanisms live in luasmtp/sasl/: password.lua (PLAIN, LOGIN),
-- cram_md5.lua, scram.lua (SCRAM-SHA-1/256 and -PLUS), oauth.lua
-- (OAUTHBEARER, XOAUTH2), external.lua (EXTERNAL with TLS client
-- certificates). This module chooses mechanisms and drives one AUTH
-- exchange over an `io` object with two methods:
--   io:send_line(line)     -> true | nil, err, detail   (line without CRLF)
--   io:receive_line()      -> line | nil, err, detail
--
-- A server mechanism object answers :step(message) (message is the
-- decoded client message, nil when the client sent no initial response)
-- with one of
--   "challenge", bytes                 send 334 and read the next message
--   "success", user, authzid, extra
--   "failure", class, reason           class: "credentials" (535),
--                                      "malformed" (501), "tempfail" (454)
-- A client mechanism object has :start() -> initial response | nil,
-- :step(challenge) -> response | nil, err, :complete() -> boolean and
-- .error (what went wrong, for the caller).
local core = require "luasmtp.core"
local scram = require "luasmtp.sasl.scram"
local password = require "luasmtp.sasl.password"
local cram_md5 = require "luasmtp.sasl.cram_md5"
local oauth = require "luasmtp.sasl.oauth"
local external = require "luasmtp.sasl.external"
local saslprep = require "luasmtp.sasl.saslprep"
local reply_value = require "luasmtp.reply"

local b64encode, b64decode = core.b64encode, core.b64decode

local M = {}

--- Largest decoded client message the server accepts (bytes). The
-- base64 line is checked against the matching length before decoding.
M.MAX_MESSAGE = 12288
M.DEFAULT_FAILURE_DELAY = 1.0
local MAX_STEPS = 10
local MAX_REPLY_LINES = 100
local DEFAULT_MAX_LINE = 512

local MECHANISMS = {
  PLAIN = password,
  LOGIN = password,
  ["CRAM-MD5"] = cram_md5,
  ["SCRAM-SHA-1"] = scram,
  ["SCRAM-SHA-1-PLUS"] = scram,
  ["SCRAM-SHA-256"] = scram,
  ["SCRAM-SHA-256-PLUS"] = scram,
  XOAUTH2 = oauth,
  OAUTHBEARER = oauth,
  EXTERNAL = external,
}

-- Mechanisms that hand the secret itself to the server.
local CLEARTEXT = { PLAIN = true, LOGIN = true, XOAUTH2 = true, OAUTHBEARER = true }

--- Client preference, strongest first.
M.PASSWORD_ORDER = {
  "SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN",
}
local TOKEN_ORDER = { "OAUTHBEARER", "XOAUTH2" }

M.saslprep = saslprep.prepare
M.certificate_identity = external.certificate_identity
M.derive_scram_keys = scram.derive_keys

local function set_of(list)
  local set = {}
  for _, v in ipairs(list or {}) do
    set[type(v) == "string" and v:upper() or v] = true
  end
  return set
end

---------------------------------------------------------------------------
-- Server side

--- The channel binding types usable on this connection: a set, and
-- whether there is any.
local function usable_cb_types(policy)
  if not policy.tls or type(policy.channel_binding) ~= "function" then
    return {}, false
  end
  local list = policy.cb_types
  if not list then
    local version = policy.tls_version or (policy.tlsinfo and policy.tlsinfo.version)
    if version == "TLSv1.3" then
      list = { "tls-exporter" }
    elseif version then
      list = { "tls-unique" }
    else
      list = { "tls-exporter", "tls-unique" }
    end
  end
  local set, any = {}, false
  for _, kind in ipairs(list) do
    if policy.channel_binding(kind) then
      set[kind], any = true, true
    end
  end
  return set, any
end

--- The client certificate, when the client presented one that verified.
local function verified_peer(policy)
  if not policy.tls then
    return nil
  end
  local info = policy.tlsinfo
  if info then
    return info.verified == true and info.peer or nil
  end
  if policy.peer_verified == true then
    return policy.peer_certificate
  end
  return nil
end

--- server_mechanisms(policy) -> { "SCRAM-SHA-256-PLUS", ... }
-- What to advertise in EHLO (see README "SASL" for the policy fields).
function M.server_mechanisms(policy)
  assert(type(policy) == "table", "policy table expected")
  local v = policy.verifier
  if v == nil or (not policy.tls and not policy.allow_plaintext) then
    return {}
  end
  local caps
  if type(v.capabilities) == "function" then
    caps = v:capabilities()
  end
  -- with capabilities, SCRAM and CRAM-MD5 must be declared; without, a
  -- method is enough
  local function can(method, declared)
    return type(v[method]) == "function" and (caps == nil or declared)
  end
  local _, has_cb = usable_cb_types(policy)
  local out = {}
  for _, base in ipairs { "SCRAM-SHA-256", "SCRAM-SHA-1" } do
    if can("scram_keys", caps and caps.scram and caps.scram[base] == true) then
      if has_cb then
        out[#out + 1] = base .. "-PLUS"
      end
      out[#out + 1] = base
    end
  end
  if can("cram_md5", caps and caps.cram_md5 == true) then
    out[#out + 1] = "CRAM-MD5"
  end
  if can("verify_password", caps and caps.plaintext ~= false) then
    out[#out + 1] = "PLAIN"
    out[#out + 1] = "LOGIN"
  end
  if can("verify_token", caps and caps.token ~= false) then
    out[#out + 1] = "OAUTHBEARER"
    out[#out + 1] = "XOAUTH2"
  end
  if type(v.external) == "function" and verified_peer(policy) then
    out[#out + 1] = "EXTERNAL"
  end
  if policy.mechanisms then
    local allowed = set_of(policy.mechanisms)
    local filtered = {}
    for _, m in ipairs(out) do
      if allowed[m] then filtered[#filtered + 1] = m end
    end
    out = filtered
  end
  return out
end

-- Results are reply values (luasmtp.reply) with an ok field.
local function reply(code, enhanced, text, extra)
  extra = extra or {}
  extra.ok = false
  return reply_value.new(code, enhanced, text, extra)
end

local function failure(policy, class, reason, mechanism)
  local extra = { reason = reason, mechanism = mechanism }
  if class == "credentials" then
    local delay = policy.failure_delay or M.DEFAULT_FAILURE_DELAY
    if delay > 0 then
      core.sleep(delay)
    end
    return reply(535, "5.7.8", "Authentication credentials invalid", extra)
  elseif class == "tempfail" then
    return reply(454, "4.7.0", "Temporary authentication failure", extra)
  end
  return reply(501, "5.5.2", "Malformed authentication message", extra)
end

local function cancelled(mechanism)
  return reply(501, "5.0.0", "Authentication cancelled", { mechanism = mechanism, reason = "cancelled" })
end

local function too_long(mechanism)
  return reply(500, "5.5.6", "Authentication exchange line is too long",
    { mechanism = mechanism, reason = "message too long" })
end

--- server_exchange(io, mechanism, initial_response, policy) -> result | nil, err, detail
-- Runs one AUTH exchange: sends the 334 challenges, reads the client's
-- messages, and returns what to answer (the caller sends the final
-- reply):
--   { ok = true, code = 235, user =, authzid =, mechanism =, channel_binding = }
--   { ok = false, code =, enhanced =, text =, reason =, mechanism = }
-- (both are reply values, luasmtp.reply)
-- or nil, err, detail when the connection fails. initial_response is the
-- argument of the AUTH command (nil when there is none, "=" for empty).
function M.server_exchange(io, mech_name, initial_response, policy)
  assert(type(io) == "table" or type(io) == "userdata", "io object expected")
  assert(type(policy) == "table" and policy.verifier ~= nil, "policy with a verifier expected")
  local name = type(mech_name) == "string" and mech_name:upper() or ""
  local offered = set_of(M.server_mechanisms(policy))
  if not MECHANISMS[name] or not offered[name] then
    return reply(504, "5.5.4", "Unrecognized authentication type", { reason = "mechanism not offered" })
  end
  local max = policy.max_message or M.MAX_MESSAGE
  local max_b64 = (max + 2) // 3 * 4

  local function decode(line)
    if #line > max_b64 then
      return nil, "long"
    end
    local data = b64decode(line)
    if not data then
      return nil, "malformed"
    end
    if #data > max then
      return nil, "long"
    end
    return data
  end

  local supports_cb = false
  for m in pairs(offered) do
    if m:find("%-PLUS$") then supports_cb = true end
  end
  local ctx = {
    mechanism = name,
    policy = policy,
    verifier = policy.verifier,
    cb_types = (usable_cb_types(policy)),
    supports_cb = supports_cb,
    channel_binding = policy.channel_binding,
    peer = verified_peer(policy),
  }
  local mech = MECHANISMS[name].server(ctx)

  local msg, problem
  if initial_response == "*" then
    return cancelled(name)
  elseif initial_response == "=" then
    msg = ""
  elseif initial_response ~= nil then
    msg, problem = decode(initial_response)
    if problem == "long" then
      return too_long(name)
    elseif problem then
      return reply(501, "5.5.2", "Invalid base64 data", { mechanism = name, reason = "invalid base64" })
    end
  end

  for _ = 1, MAX_STEPS do
    local kind, a, b, c = mech:step(msg)
    if kind == "success" then
      local user, authzid = a, b
      if authzid ~= nil and authzid ~= user then
        local v = policy.verifier
        local allowed, err, detail = false, nil, nil
        if type(v.authorize) == "function" then
          allowed, err, detail = v:authorize(user, authzid)
        end
        if allowed == nil and err ~= nil then
          return failure(policy, "tempfail", detail or err, name)
        elseif allowed ~= true then
          return failure(policy, "credentials", "authorization denied", name)
        end
      end
      return reply_value.new(235, "2.7.0", "Authentication successful", { ok = true, user = user,
        authzid = authzid, mechanism = name, channel_binding = c and c.channel_binding or nil })
    elseif kind == "failure" then
      return failure(policy, a, b, name)
    end
    assert(kind == "challenge", "bad mechanism step result")
    local ok, err, detail = io:send_line("334 " .. b64encode(a))
    if not ok then
      return nil, err, detail
    end
    local line
    line, err, detail = io:receive_line()
    if not line then
      if err == "limit" then
        return too_long(name)
      end
      return nil, err, detail
    end
    if line == "*" then
      return cancelled(name)
    end
    msg, problem = decode(line)
    if problem == "long" then
      return too_long(name)
    elseif problem then
      return reply(501, "5.5.2", "Invalid base64 data", { mechanism = name, reason = "invalid base64" })
    end
  end
  return failure(policy, "malformed", "too many steps", name)
end

--- tls_policy(sock [, policy]) -> policy with the TLS fields of sock set:
-- tls, tlsinfo, tls_version and channel_binding.
function M.tls_policy(sock, policy)
  local p = {}
  for k, v in pairs(policy or {}) do p[k] = v end
  local info = sock:tlsinfo()
  p.tls = info ~= nil
  if info then
    p.tlsinfo = info
    p.tls_version = info.version
    p.channel_binding = function(kind) return (sock:channel_binding(kind)) end
  end
  return p
end

---------------------------------------------------------------------------
-- Client side

--- client(mechanism, creds, opts) -> mechanism object | nil, "invalid", detail
-- creds: user, password, authzid, token. opts: see README "SASL".
function M.client(mech, creds, opts)
  assert(type(mech) == "string", "mechanism name expected")
  local name = mech:upper()
  local module = MECHANISMS[name]
  if not module then
    error("unknown SASL mechanism " .. mech, 2)
  end
  creds = creds or {}
  opts = opts or {}
  assert(type(creds) == "table" and type(opts) == "table", "creds and opts must be tables")
  return module.client(name, creds, opts)
end

--- tls_binding(sock) -> { type =, data = } | nil: the channel binding of
-- a TLS socket (tls-exporter on TLS 1.3, tls-unique before), for
-- opts.channel_binding.
function M.tls_binding(sock)
  local info = sock:tlsinfo()
  if not info then
    return nil
  end
  local kind = info.version == "TLSv1.3" and "tls-exporter" or "tls-unique"
  local data = sock:channel_binding(kind)
  if not data then
    return nil
  end
  return { type = kind, data = data }
end

--- choose(server_mechanisms, creds, opts) -> mechanism object | nil, err, detail
-- server_mechanisms: a list, or the EHLO AUTH parameter as a string.
-- opts.exclude: mechanisms not to take (already refused); they still
-- count as advertised, so a refused -PLUS never lets a plain SCRAM in.
function M.choose(server_mechs, creds, opts)
  creds = creds or {}
  opts = opts or {}
  if type(server_mechs) == "string" then
    local list = {}
    for m in server_mechs:gmatch("%S+") do list[#list + 1] = m end
    server_mechs = list
  end
  assert(type(server_mechs) == "table", "server mechanisms: list or string expected")
  local offered = set_of(server_mechs)
  local allowed = opts.mechanisms and set_of(opts.mechanisms)
  local excluded = set_of(opts.exclude)
  local cleartext_ok = opts.tls or opts.allow_plaintext
  local cb = opts.channel_binding
  local plus_advertised = false
  for m in pairs(offered) do
    local base, plus = scram.split_name(m)
    if base and plus then plus_advertised = true end
  end
  local candidates = {}
  if creds.external or opts.external then
    candidates[#candidates + 1] = "EXTERNAL"
  end
  if creds.token then
    for _, m in ipairs(TOKEN_ORDER) do candidates[#candidates + 1] = m end
  end
  if creds.password then
    for _, m in ipairs(M.PASSWORD_ORDER) do candidates[#candidates + 1] = m end
  end
  local skipped = {}
  for _, m in ipairs(candidates) do
    if offered[m] and (not allowed or allowed[m]) and not excluded[m] then
      local base, plus = scram.split_name(m)
      if plus and not cb then
        skipped[#skipped + 1] = m .. " (no channel binding)"
      elseif base and not plus and cb and plus_advertised then
        skipped[#skipped + 1] = m .. " (the server offers -PLUS)"
      elseif CLEARTEXT[m] and not cleartext_ok then
        skipped[#skipped + 1] = m .. " (no TLS)"
      else
        return M.client(m, creds, opts)
      end
    end
  end
  local detail = "no usable mechanism; server offers: " .. table.concat(server_mechs, " ")
  if #skipped > 0 then
    detail = detail .. "; not used: " .. table.concat(skipped, ", ")
  end
  return nil, "unsupported", detail
end

--- Read one reply (all lines of a multi-line one).
-- -> { code =, enhanced =, text =, last = text of the last line } | nil, err, detail
local function read_reply(io)
  local code, texts = nil, {}
  for _ = 1, MAX_REPLY_LINES do
    local line, err, detail = io:receive_line()
    if not line then
      return nil, err, detail
    end
    local c, sep, text = line:match("^(%d%d%d)([ %-]?)(.*)$")
    if not c or (sep == "" and text ~= "") or (code and c ~= code) then
      return nil, "protocol", "malformed reply: " .. line:sub(1, 200)
    end
    code = c
    texts[#texts + 1] = text
    if sep ~= "-" then
      local n = math.tointeger(tonumber(code))
      local r = { code = n, last = text }
      if n ~= 334 then
        local class = code:sub(1, 1)
        for i, t in ipairs(texts) do
          local enh, rest = t:match("^(%d%.%d%d?%d?%.%d%d?%d?) ?(.*)$")
          if enh and enh:sub(1, 1) == class then
            r.enhanced = r.enhanced or enh
            texts[i] = rest
          end
        end
      end
      r.text = table.concat(texts, "\n")
      return r
    end
  end
  return nil, "protocol", "reply of more than " .. MAX_REPLY_LINES .. " lines"
end

-- gave_up: this side gave up with "*" (client_error says why)
local function outcome(r, mech, client_error, gave_up)
  local ok = r.code == 235 and client_error == nil and mech:complete()
  local res = reply_value.new(r.code, r.enhanced, r.text, { ok = ok })
  if not ok then
    res.cancelled = gave_up
    res.client_error = client_error or mech.error
    if r.code == 235 and not res.client_error then
      res.client_error = "the server accepted before the exchange was complete"
    end
    res.oauth_error = mech.error_json
  end
  return res
end

--- client_exchange(io, mech [, opts]) -> result | nil, err, detail
-- Sends AUTH (with the initial response when it fits in opts.max_line,
-- default 512 octets), answers the 334 challenges and returns
--   { ok = true, code = 235, enhanced =, text = }
--   { ok = false, code =, enhanced =, text =, client_error =, oauth_error =, cancelled = }
-- client_error says why the client gave up or does not trust a success
-- (a SCRAM server that did not prove it knows the password), or what the
-- server reported inside the mechanism (SCRAM e=); cancelled is true when
-- this side gave up with "*".
function M.client_exchange(io, mech, opts)
  opts = opts or {}
  local ir = mech:start()
  local cmd = "AUTH " .. mech.name
  local pending
  if ir ~= nil then
    local enc = ir == "" and "=" or b64encode(ir)
    if #cmd + 1 + #enc + 2 <= (opts.max_line or DEFAULT_MAX_LINE) then
      cmd = cmd .. " " .. enc
    else
      pending = ir
    end
  end
  local ok, err, detail = io:send_line(cmd)
  if not ok then
    return nil, err, detail
  end
  for _ = 1, MAX_STEPS do
    local r
    r, err, detail = read_reply(io)
    if not r then
      return nil, err, detail
    end
    if r.code ~= 334 then
      return outcome(r, mech)
    end
    local response, cerr
    if pending then
      response, pending = pending, nil
    else
      local challenge = b64decode(r.last)
      if not challenge then
        cerr = "invalid base64 in server challenge"
      else
        response, cerr = mech:step(challenge)
      end
    end
    if response == nil then
      ok, err, detail = io:send_line("*")
      if not ok then
        return nil, err, detail
      end
      r, err, detail = read_reply(io)
      if not r then
        return nil, err, detail
      end
      return outcome(r, mech, cerr or "mechanism failed", true)
    end
    ok, err, detail = io:send_line(b64encode(response))
    if not ok then
      return nil, err, detail
    end
  end
  return nil, "protocol", "too many AUTH round trips"
end

--- socket_io(sock [, timeout]) -> io for the exchanges over a luasmtp
-- socket (lines capped at what MAX_MESSAGE needs).
function M.socket_io(sock, timeout)
  local cap = (M.MAX_MESSAGE + 2) // 3 * 4 + 16
  return {
    send_line = function(_, line) return sock:send(line .. "\r\n") end,
    receive_line = function() return sock:receiveline(cap, timeout) end,
  }
end

return M
