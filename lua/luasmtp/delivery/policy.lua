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
local client = require "luasmtp.client"
local dane = require "luasmtp.dane"
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

--- tlsa(dest, hostinfo, port, resolver) -> info | nil, token, err
-- Only for a host whose address records are DNSSEC-secure, reached
-- through a secure MX (or none): luasmtp.dane looks the records up (the
-- CNAME-expanded host name first when its records are secure, then the
-- MX name itself, RFC 7672 section 2.2.2) and gives the names a DANE-TA
-- certificate may carry. info = { state = "none" | "usable" |
-- "unusable", records (all found), usable (how many DANE can use), base
-- (TLSA base domain), qname, names }. A failed lookup (a bogus
-- signature is a SERVFAIL) is nil, token, err: a temporary failure.
function M.tlsa(dest, hostinfo, port, resolver)
  local t, token, detail = dane.lookup(hostinfo.name, { port = port, query = resolver.query,
    expanded = hostinfo.expanded_authentic and hostinfo.expanded or nil })
  if not t then
    local err = setmetatable({ token = token or "dns", permanent = false,
      message = ("TLSA lookup for %s: %s"):format(hostinfo.name, tostring(detail or token)) }, client.Error)
    return nil, err.token, err
  end
  local qname = ("_%d._tcp.%s"):format(port, t.base_domain)
  if #t.tlsa == 0 then
    return { state = "none", qname = qname }
  end
  return {
    state = t.usable > 0 and "usable" or "unusable",
    records = t.tlsa,
    usable = t.usable,
    base = t.base_domain,
    qname = qname,
    names = dane.names { base_domain = t.base_domain, host = hostinfo.name, next_hop = dest.domain,
      expanded_next_hop = dest.expanded, mx_authentic = dest.have_mx and dest.authentic and dest.expanded_authentic },
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
