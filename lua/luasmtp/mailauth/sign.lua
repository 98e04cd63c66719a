--- luasmtp.mailauth.sign: a server plugin that DKIM-signs the messages
-- it is given, in the message phase (after the header edits of the
-- plugins before it, before the deliver phase queues or stores it).
--
--   local sign = require "luasmtp.mailauth.sign"
--   server.new { plugins = { submission, received(),
--     sign { domains = { ["example.org"] = {
--       { selector = "rsa2026", key_file = "/etc/luasmtp/rsa.pem" },
--       { selector = "ed2026", key_file = "/etc/luasmtp/ed25519.pem" } } } },
--     queue.plugin(q) } }
--
-- domains: the signing domain (d=) per From domain: a list of
--   luasmtp.dkim signer options (domain defaults to the From domain), or
--   one such table. Mail whose From domain is not listed is not signed.
-- when(session, message) -> boolean: which messages are signed; by default
--   those of authenticated sessions (session.user), so an MX that also
--   relays signs what its users submit, not what strangers send.
-- The signatures are computed from the header view and the body chunks
-- (the body is streamed, never made one string) and prepended, the first
-- signature of the list on top.
local dkim = require "luasmtp.dkim"
local options = require "luasmtp.options"

local function from_domain(header)
  local froms = header:get_all("From")
  if #froms ~= 1 then return nil end
  local addr = froms[1]:match("<([^>]*)>") or froms[1]
  local d = addr:match("@([%w%.%-]+)%s*$")
  return d and d:lower()
end

local schema = options.schema("dkim_sign", {
  { "domains", "table", nil,
    "From domain -> the signatures to make: a list of `dkim.signer` options, or one (required)" },
  { "when", "function", nil,
    "`when(session, message) -> boolean`: which messages are signed (default: those of authenticated sessions)" },
})

local function new(opts)
  assert(type(opts) == "table", "dkim sign: options with domains expected")
  opts = schema:apply(opts, 3)
  assert(opts.domains, "dkim sign: options with domains expected")
  local domains = {}
  for d, list in pairs(opts.domains) do
    if list[1] == nil then list = { list } end
    domains[d:lower()] = list
  end
  local when = opts.when or function(session) return session.user ~= nil end

  return {
    name = "dkim_sign",
    message = function(session, message)
      if not when(session, message) then return end
      local list = domains[from_domain(message.header) or ""]
      if not list then return end
      local fields = {}
      for _, _, _, raw in message.header:fields() do
        fields[#fields + 1] = raw
      end
      local signers = {}
      for i, o in ipairs(list) do
        local so = {}
        for k, v in pairs(o) do so[k] = v end
        so.domain = so.domain or from_domain(message.header)
        signers[i] = dkim.signer(so)
        signers[i]:headers(fields)
      end
      for piece in message:body_chunks(65536) do
        for _, s in ipairs(signers) do s:body(piece) end
      end
      for i = #signers, 1, -1 do
        local field = signers[i]:finish()
        local value = assert(field:match("^DKIM%-Signature: (.*)\r\n$"), "unexpected DKIM-Signature field")
        message.header:prepend("DKIM-Signature", value)
      end
    end,
  }
end

return setmetatable({ schema = schema }, { __call = function(_, opts) return new(opts) end })
