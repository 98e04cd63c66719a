--- luasmtp.mailauth.plugin: the `mailauth` server plugin. SPF of the
-- HELO name and of MAIL FROM, DKIM verification while the body arrives,
-- DMARC when the message has ended, and an Authentication-Results field
-- (RFC 8601) at the top of the message; Authentication-Results fields
-- that claim our authserv-id are removed first.
--
--   local mailauth = require "luasmtp.mailauth.plugin"
--   server.new { plugins = { mailauth { authserv_id = "mx.example.org" }, policy, received(), store } }
--
-- The results are in session.auth_results for the plugins that follow:
--   { helo = { result, detail, domain }, spf = { result, detail, domain, identity = "mailfrom"|"helo" },
--     dkim = { signature results of luasmtp.dkim }, dmarc = verdict of luasmtp.mailauth.dmarc,
--     from_domain = the RFC5322.From domain (nil when there is not exactly one) }
-- spf is there from the mail phase on, dkim and dmarc from the message
-- phase on. Put mailauth before plugins that edit the header (received)
-- so DKIM sees the fields as they arrived.
local ar = require "luasmtp.mailauth.ar"
local dmarc = require "luasmtp.mailauth.dmarc"
local options = require "luasmtp.options"
local spf = require "luasmtp.mailauth.spf"

-- The domain of the one address of a From field value (RFC 5322
-- section 3.6.2 allows several mailboxes; DMARC then has no single
-- domain). Comments and display names are skipped.
local function from_domain(value)
  value = value:gsub("\r\n[ \t]", " ")
  local without_comments = value:gsub("%b()", " ")
  local without_quotes = without_comments:gsub('"[^"]*"', '""')
  local domains = {}
  for addr in without_quotes:gmatch("<([^>]*)>") do
    domains[#domains + 1] = addr:match("@([^@%s]+)%s*$")
  end
  if #domains == 0 then
    for item in (without_quotes .. ","):gmatch("([^,]*),") do
      local d = item:match("@([^@%s]+)%s*$")
      if d then
        domains[#domains + 1] = d
      end
    end
  end
  if #domains == 0 then
    return nil
  end
  local first = domains[1]:lower():gsub("%.$", "")
  for i = 2, #domains do
    if domains[i]:lower():gsub("%.$", "") ~= first then
      return nil
    end
  end
  return first
end

--- mailauth{ authserv_id =, query =, spf = true, dkim = true, dmarc = true, helo = true,
--   reporter =, header = true, receiver = } -> plugin
--   authserv_id  the name in Authentication-Results (default: the server's hostname)
--   query        DNS function (luasmtp.dns.query)
--   spf, dkim, dmarc, helo  which checks run (helo: SPF of the HELO name)
--   reporter     a luasmtp.mailauth.dmarc recorder (new{dir=}): aggregate data per message
--   header       add the Authentication-Results field (default true)
--   receiver     %{r} in SPF explanations (default: authserv_id)
local schema = options.schema("mailauth", {
  { "authserv_id", "string", nil, "the name in Authentication-Results (default: the server's hostname)" },
  { "query", "function", nil, "DNS function (default `luasmtp.dns.query`)" },
  { "spf", "boolean", true, "check SPF of MAIL FROM (and of the HELO name for a null sender)" },
  { "dkim", "boolean", true, "verify DKIM signatures while the body arrives" },
  { "dmarc", "boolean", true, "evaluate DMARC when the message has ended" },
  { "helo", "boolean", true, "check SPF of the HELO name" },
  { "reporter", "table", nil, "a DMARC recorder (`dmarc.new{ dir = }`): aggregate data per message" },
  { "header", "boolean", true, "add the Authentication-Results field" },
  { "receiver", "string", nil, "`%{r}` in SPF explanations (default: authserv_id)" },
})

local function new(opts)
  opts = schema:apply(opts, 3)
  local function enabled(k)
    return opts[k] ~= false
  end

  local function id_of(s)
    return opts.authserv_id or (s.config and s.config.hostname) or "localhost"
  end

  local function spf_check(s, sender)
    local result, detail = spf.check { ip = s.client_address, sender = sender, helo = s.helo_name or "",
                                       query = opts.query, receiver = opts.receiver or id_of(s) }
    return result, detail
  end

  local function results(s)
    s.auth_results = s.auth_results or {}
    return s.auth_results
  end

  return {
    name = "mailauth",

    helo = function(s, name)
      local r = results(s)
      r.helo = nil
      if enabled("helo") and enabled("spf") and s.client_port and name then
        local result, detail = spf_check(s, nil)
        r.helo = { result = result, detail = detail, domain = name:lower() }
      end
    end,

    mail = function(s, from)
      local r = results(s)
      r.spf, r.dkim, r.dmarc, r.from_domain, r.verifier = nil, nil, nil, nil, nil
      if not enabled("spf") or not s.client_port then
        return
      end
      if from == nil or from == "" then
        -- a null sender: the HELO identity is the one SPF checks (RFC 7208 2.4)
        if r.helo then
          r.spf = { result = r.helo.result, detail = r.helo.detail, domain = r.helo.domain, identity = "helo" }
        elseif s.helo_name then
          local result, detail = spf_check(s, nil)
          r.spf = { result = result, detail = detail, domain = s.helo_name:lower(), identity = "helo" }
        end
        return
      end
      local result, detail = spf_check(s, from)
      local domain = from:match("@([^@]*)$")
      r.spf = { result = result, detail = detail, domain = domain and domain:lower(), identity = "mailfrom",
                mailfrom = from }
    end,

    headers = function(s, message)
      local r = results(s)
      ar.remove_forged(message.header, id_of(s))
      if enabled("dkim") then
        local dkim = require "luasmtp.dkim"
        local fields = {}
        for _, _, _, raw in message.header:fields() do
          fields[#fields + 1] = raw
        end
        r.verifier = dkim.verifier { query = opts.query }
        r.verifier:headers(fields)
      end
      local froms = message.header:get_all("From")
      r.from_domain = #froms == 1 and from_domain(froms[1]) or nil
    end,

    body = function(s, _, piece)
      local r = results(s)
      if r.verifier then
        r.verifier:body(piece)
      end
    end,

    message = function(s, message)
      local r = results(s)
      if r.verifier then
        r.dkim = r.verifier:finish()
        r.verifier = nil
      end
      r.dkim = r.dkim or {}
      local entries = {}
      if r.spf then
        entries[#entries + 1] = ar.spf(r.spf.result, {
          mailfrom = r.spf.identity == "mailfrom" and r.spf.mailfrom or nil, helo = r.spf.domain,
        })
      end
      if enabled("dkim") then
        if #r.dkim == 0 then
          entries[#entries + 1] = { method = "dkim", result = "none" }
        end
        for _, sig in ipairs(r.dkim) do
          entries[#entries + 1] = ar.dkim(sig)
        end
      end
      if enabled("dmarc") then
        r.dmarc = dmarc.evaluate {
          from_domain = r.from_domain, query = opts.query,
          spf = r.spf and { result = r.spf.result, domain = r.spf.domain },
          dkim = r.dkim,
        }
        entries[#entries + 1] = ar.dmarc(r.dmarc)
        if opts.reporter then
          local ok, _, detail = opts.reporter:record(r.dmarc, {
            source_ip = s.client_address, envelope_from = r.spf and r.spf.domain, spf = r.spf, dkim = r.dkim,
          })
          if not ok and s.log then
            s:log("warning", "DMARC aggregate data not recorded: %s", tostring(detail))
          end
        end
      end
      if opts.header ~= false then
        message.header:prepend("Authentication-Results", ar.format(id_of(s), entries))
      end
    end,

    rset = function(s)
      local r = results(s)
      r.spf, r.dkim, r.dmarc, r.from_domain, r.verifier = nil, nil, nil, nil, nil
    end,
  }
end

return setmetatable({ schema = schema }, { __call = function(_, opts) return new(opts) end })
