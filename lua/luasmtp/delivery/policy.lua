--- luasmtp.delivery.policy: the TLS policy for one MX host.
--
-- Levels (modelled on Postfix's smtp_tls_security_level):
--   none       no TLS
--   may        STARTTLS when offered, certificate not checked
--   encrypt    STARTTLS required, certificate not checked
--   verify     STARTTLS required, PKIX chain and the MX host name
--   dane       DANE (RFC 7672) when the host has usable TLSA records,
--              mandatory unauthenticated TLS when it has only unusable
--              ones, else as may; MTA-STS applies when DANE does not
--   dane-only  DANE required
-- MTA-STS (RFC 8461) raises may, encrypt, dane-without-TLSA and verify:
-- enforce means PKIX against the MX name, and the MX must match the
-- policy; testing means the same checks, reported but not enforced.
-- REQUIRETLS (RFC 8689) needs DANE or PKIX, and an MX that came from
-- DNSSEC-signed records or an MTA-STS policy in enforce mode.
--
--   decide(level, ctx) -> plan | nil, token, err
--   tlsa(dest, hostinfo, port, resolver) -> info | nil, token, err
local core = require "luasmtp.core"
local client = require "luasmtp.client"
local destinations = require "luasmtp.delivery.destinations"
local mtasts = require "luasmtp.delivery.mtasts"

local M = {}

M.LEVELS = { none = true, may = true, encrypt = true, verify = true, dane = true, ["dane-only"] = true }
M.DEFAULT_LEVEL = "dane"

local function refuse(policy, why, fields)
  local err = fields or {}
  err.token, err.permanent = "policy", false
  err.policy = policy
  err.message = ("TLS policy %s: %s"):format(policy, why)
  return nil, "policy", setmetatable(err, client.Error)
end
M.refuse = refuse

-- TLSA records at _port._tcp.name: nil when there are none or they are
-- not DNSSEC-signed (not an error: the host did not opt in), else the
-- list; nil, token, err when the lookup failed (a bogus signature is a
-- SERVFAIL from the validating resolver: temporary).
local function lookup_tlsa(name, port, resolver)
  local qname = ("_%d._tcp.%s"):format(port, name)
  local res, steps, err = destinations.follow(qname, "TLSA", resolver)
  if not res then
    return nil, steps, err
  end
  for _, step in ipairs(steps) do
    if not step.authentic then return false, qname end
  end
  local records = {}
  if res.rcode == "NOERROR" then
    for _, rr in ipairs(res.answers or {}) do
      if type(rr) == "table" and rr.usage then records[#records + 1] = rr end
    end
  end
  if #records == 0 then return false, qname end
  return records, qname
end

--- names(dest, host, base) -> the names a DANE-TA certificate may carry
-- (RFC 7672 section 3.2.2): the TLSA base domain first (it is also the
-- SNI), then the original base, and with a secure MX the next-hop domain
-- and its CNAME expansion.
function M.names(dest, hostinfo, base)
  local list, seen = {}, {}
  local function add(n)
    if n and not seen[n] then
      seen[n] = true
      list[#list + 1] = n
    end
  end
  add(base)
  add(hostinfo.name)
  if dest.have_mx then
    add(dest.domain)
    add(dest.expanded)
  end
  return list
end

--- tlsa(dest, hostinfo, port, resolver) -> info | nil, token, err
-- Only for a host whose address records are DNSSEC-secure, reached
-- through a secure MX (or none). info = { state = "none" | "usable" |
-- "unusable", records, usable (a count), base
-- (TLSA base domain), qname, names }. The CNAME-expanded host name is
-- tried first when its records are secure, then the MX name itself
-- (RFC 7672 section 2.2.2). records are all the TLSA records found,
-- usable how many of them DANE can use.
function M.tlsa(dest, hostinfo, port, resolver)
  local candidates = { hostinfo.name }
  if hostinfo.expanded ~= hostinfo.name and hostinfo.expanded_authentic then
    candidates = { hostinfo.expanded, hostinfo.name }
  end
  local records, qname, base
  for _, name in ipairs(candidates) do
    local r, q, err = lookup_tlsa(name, port, resolver)
    if r == nil then
      err.message = "TLSA lookup: " .. err.message
      return nil, q, err
    end
    if r then
      records, qname, base = r, q, name
      break
    end
    qname = qname or q
  end
  if not records then
    return { state = "none", qname = qname }
  end
  -- usable for SMTP (RFC 7672 3.1.3): DANE-TA/DANE-EE, selectors 0/1,
  -- matching types 0-2; OpenSSL skips the others when they are added
  local usable = core.dane_usable(records)
  return {
    state = usable > 0 and "usable" or "unusable",
    records = records,
    usable = usable,
    base = base,
    qname = qname,
    names = M.names(dest, hostinfo, base),
  }
end

--- dane_eligible(dest, hostinfo) -> bool, why
-- RFC 7672 section 2.2: TLSA records are looked up only for a host whose
-- address records are DNSSEC-secure, named by a secure MX RRset.
function M.dane_eligible(dest, hostinfo)
  if dest.literal then
    return false, "an address literal has no TLSA records"
  end
  if dest.have_mx and not (dest.authentic and dest.expanded_authentic) then
    return false, ("the MX records of %s are not DNSSEC-signed"):format(dest.domain)
  end
  if not hostinfo.authentic then
    return false, ("the address records of %s are not DNSSEC-signed"):format(hostinfo.name)
  end
  return true
end

--- decide(level, ctx) -> plan | nil, "policy", err
-- ctx = { dest, hostinfo, tlsa (from M.tlsa, or nil when not looked
-- up), tlsa_error (the err of a failed lookup), sts (an MTA-STS policy
-- {mode, mx, ...} from luasmtp.delivery.mtasts, or nil), requiretls }.
-- plan = {
--   level,        the level that applies after DANE/MTA-STS: "none",
--                 "may", "encrypt", "verify", "dane", "sts-enforce",
--                 "sts-testing"
--   tls,          "none", "opportunistic" or "starttls" (client modes)
--   verify,       false, "pkix", "dane", or "report" (PKIX checked and
--                 reported, not enforced)
--   servername,   SNI and the name PKIX checks
--   dane,         { base_domain, tlsa = records, names } for DANE
--   policy_type,  for TLS-RPT: "tlsa", "sts" or "no-policy-found"
--   why,          one line: why this plan
-- }
function M.decide(level, ctx)
  level = level or M.DEFAULT_LEVEL
  assert(M.LEVELS[level], "unknown TLS policy level " .. tostring(level))
  local dest, hostinfo = ctx.dest, ctx.hostinfo
  local host = hostinfo.name
  local plan
  if level == "none" then
    if ctx.requiretls then
      return refuse("none", "the message requires TLS (REQUIRETLS) and the policy is none")
    end
    return { level = "none", tls = "none", verify = false, policy_type = "no-policy-found",
      why = "TLS policy none" }
  end

  -- DANE first: when it applies it wins over MTA-STS (RFC 8461 section 2)
  if level == "dane" or level == "dane-only" then
    local eligible, why = M.dane_eligible(dest, hostinfo)
    if not eligible then
      if level == "dane-only" then
        return refuse("dane-only", "no DANE for " .. host .. ": " .. why, { tlsrpt = "dane-required" })
      end
      ctx.dane_why = why
    elseif ctx.tlsa_error then
      return refuse(level, ("TLSA lookup for %s failed: %s"):format(host, tostring(ctx.tlsa_error)),
        { tlsrpt = "dnssec-invalid", policy_type = "tlsa" })
    elseif ctx.tlsa and ctx.tlsa.state == "usable" then
      plan = {
        level = "dane", tls = "starttls", verify = "dane",
        servername = ctx.tlsa.base,
        dane = { base_domain = ctx.tlsa.base, tlsa = ctx.tlsa.records, names = ctx.tlsa.names },
        policy_type = "tlsa",
        why = ("DANE: %d usable TLSA record%s at %s"):format(ctx.tlsa.usable,
          ctx.tlsa.usable == 1 and "" or "s", ctx.tlsa.qname),
      }
    elseif ctx.tlsa and ctx.tlsa.state == "unusable" then
      -- RFC 7672 section 2.2: TLSA records exist, none usable:
      -- mandatory TLS, not authenticated
      plan = { level = "encrypt", tls = "starttls", verify = false, policy_type = "tlsa",
        why = ("DANE: TLSA records at %s, none usable: mandatory unauthenticated TLS"):format(ctx.tlsa.qname) }
    elseif level == "dane-only" then
      return refuse("dane-only", ("no TLSA records for %s"):format(ctx.tlsa and ctx.tlsa.qname or host),
        { tlsrpt = "dane-required" })
    else
      ctx.dane_why = ("no TLSA records at %s"):format(ctx.tlsa and ctx.tlsa.qname or host)
    end
  end

  if not plan then
    local base = level == "verify" and "verify" or level == "encrypt" and "encrypt" or "may"
    local sts = ctx.sts
    if sts and (sts.mode == "enforce" or sts.mode == "testing") and not dest.literal then
      local match = mtasts.mx_matches(sts, host)
      if sts.mode == "enforce" then
        if not match then
          return refuse("MTA-STS enforce", ("MX %s is not listed in the MTA-STS policy of %s"):format(host,
            dest.domain), { tlsrpt = "validation-failure", policy_type = "sts" })
        end
        plan = { level = "sts-enforce", tls = "starttls", verify = "pkix", servername = host, policy_type = "sts",
          why = ("MTA-STS enforce for %s: PKIX against %s"):format(dest.domain, host) }
      else
        plan = { level = "sts-testing", tls = base == "may" and "opportunistic" or "starttls",
          verify = base == "verify" and "pkix" or "report", servername = host, policy_type = "sts",
          sts_mx_mismatch = not match or nil,
          why = ("MTA-STS testing for %s: checked and reported, not enforced%s"):format(dest.domain,
            match and "" or (" (MX " .. host .. " not in the policy)")) }
      end
    elseif base == "verify" then
      plan = { level = "verify", tls = "starttls", verify = "pkix", servername = host, policy_type = "no-policy-found",
        why = "TLS policy verify: PKIX against " .. host }
    elseif base == "encrypt" then
      plan = { level = "encrypt", tls = "starttls", verify = false, policy_type = "no-policy-found",
        why = "TLS policy encrypt: TLS required, certificate not checked" }
    else
      plan = { level = "may", tls = "opportunistic", verify = false, policy_type = "no-policy-found",
        why = level == "may" and "TLS policy may: opportunistic TLS" or
          ("TLS policy %s, %s: opportunistic TLS"):format(level, ctx.dane_why or "no DANE") }
    end
  end

  if ctx.requiretls and plan.verify ~= "dane" then
    -- RFC 8689 section 4.2.1: the MX from DNSSEC or MTA-STS, and the
    -- server verified with PKIX (or DANE)
    local sts_enforced = plan.level == "sts-enforce"
    if not (dest.literal or sts_enforced or (dest.authentic and dest.expanded_authentic)) then
      return refuse("REQUIRETLS", ("the MX records of %s are not DNSSEC-signed and no MTA-STS policy "
        .. "in enforce mode covers %s"):format(dest.domain, host))
    end
    if plan.verify ~= "pkix" then
      plan.tls, plan.verify, plan.servername = "starttls", "pkix", host
      plan.why = plan.why .. "; REQUIRETLS: PKIX against " .. host
    end
  end
  plan.requiretls = ctx.requiretls or nil
  return plan
end

--- rpt_result(err [, plan]) -> RFC 8460 result type for a failed attempt
function M.rpt_result(err, plan)
  if type(err) == "table" and err.tlsrpt then return err.tlsrpt end
  local text = tostring(err and (err.cause or err.message) or ""):lower()
  if type(err) == "table" and err.extension == "STARTTLS" then
    return "starttls-not-supported"
  end
  if plan and plan.verify == "dane" and (text:find("dane") or text:find("tlsa")
      or text:find("verif") or text:find("certificate")) then
    return "tlsa-invalid"
  end
  if text:find("hostname mismatch") or text:find("host name mismatch") then
    return "certificate-host-mismatch"
  elseif text:find("expired") then
    return "certificate-expired"
  elseif text:find("issuer") or text:find("self%-signed") or text:find("self signed")
      or text:find("not trusted") or text:find("unable to get") then
    return "certificate-not-trusted"
  end
  return "validation-failure"
end

return M
