--- luasmtp.delivery: mail straight to the recipients' MX hosts.
--
--   local delivery = require "luasmtp.delivery"
--   local res = delivery.deliver { from = "me@example.org",
--     to = { "bob@example.net" }, body = msg, tls_policy = "dane" }
--   for _, r in ipairs(res.recipients) do print(r.address, r.ok, r.text) end
--
-- Per recipient domain: the destinations (MX hosts, destinations.lua),
-- each host's addresses, the TLS policy for that host (policy.lua: DANE,
-- MTA-STS, the configured level, REQUIRETLS), Happy Eyeballs to its
-- addresses (connect.lua), then an SMTP session (luasmtp.client). Every
-- step goes into the recipient's decision trail.
local core = require "luasmtp.core"
local client = require "luasmtp.client"
local destinations = require "luasmtp.delivery.destinations"
local policy = require "luasmtp.delivery.policy"
local happy = require "luasmtp.delivery.connect"
local pool = require "luasmtp.client.pool"

local M = {
  LEVELS = policy.LEVELS,
  DEFAULT_LEVEL = policy.DEFAULT_LEVEL,
  MAX_PARALLEL = 8, -- domains delivered to at once
}

local function resolver_of(opts)
  if opts.dns then return opts.dns end
  local ok, dns = pcall(require, "luasmtp.dns")
  assert(ok, "delivery needs a resolver: opts.dns, or the luasmtp.dns module")
  return dns
end

local function check_level(opts)
  local level = opts.tls_policy or policy.DEFAULT_LEVEL
  assert(policy.LEVELS[level], "tls_policy must be none, may, encrypt, verify, dane or dane-only")
  return level
end

-- The domain part of an address ("user@[192.0.2.1]" keeps the brackets).
local function domain_of(address)
  local d = address:match("@([^@]+)$")
  return d and (d:sub(1, 1) == "[" and d or d:lower())
end

local function describe_dest(dest)
  if dest.literal then return "address literal " .. dest.domain end
  local hosts = {}
  for _, h in ipairs(dest.hosts) do
    hosts[#hosts + 1] = h.preference and ("%s (%d)"):format(h.name, h.preference) or h.name
  end
  local via = dest.expanded ~= dest.domain and (" via CNAME " .. dest.expanded) or ""
  return ("%s %s%s: %s; DNSSEC %s"):format(dest.have_mx and "MX for" or "no MX, implicit MX for",
    dest.domain, via, table.concat(hosts, ", "),
    (dest.authentic and dest.expanded_authentic) and "secure" or "insecure")
end

-- A per-domain context: resolver, policy sources, the trail.
local Attempt = {}
Attempt.__index = Attempt

function Attempt:note(event, text, fields)
  local entry = fields or {}
  entry.event, entry.text = event, text
  self.trail[#self.trail + 1] = entry
  return entry
end

-- The MTA-STS policy of the domain, fetched at most once per attempt.
function Attempt:sts()
  if self.sts_done then return self.sts_policy end
  self.sts_done = true
  local source = self.opts.mtasts
  if not source or self.dest.literal then return nil end
  local pol, token, detail = source:policy(self.domain)
  if pol then
    self:note("mta-sts", ("MTA-STS policy of %s: mode %s"):format(self.domain, tostring(pol.mode)),
      { mode = pol.mode, policy = pol })
    self.sts_policy = pol
  else
    self:note("mta-sts", ("no MTA-STS policy for %s%s"):format(self.domain,
      token and (": " .. tostring(detail or token)) or ""), { token = token })
    self.sts_failure, self.sts_failure_detail = token, detail and tostring(detail) or nil
  end
  return self.sts_policy
end

-- TLSA records in presentation form, for TLS-RPT policy strings.
local function tlsa_strings(records)
  local out = {}
  for i, r in ipairs(records) do
    out[i] = ("%d %d %d %s"):format(r.usage, r.selector, r.mtype,
      (r.data:gsub(".", function(c) return ("%02x"):format(c:byte()) end)))
  end
  return out
end

local function lines_of(text)
  local out = {}
  for line in tostring(text or ""):gmatch("[^\r\n]+") do out[#out + 1] = line end
  return out
end

-- Record one attempt for TLS-RPT (RFC 8460) when a recorder is given.
-- The policy domain is the TLSA base domain for DANE, else the
-- recipient domain. An MTA-STS policy that could not be fetched or
-- parsed is reported as such on each attempt that had to go without it.
function Attempt:report(plan, host, address, result, detail)
  local rec = self.opts.tlsrpt
  if not rec or self.tlsrpt_off or self.dest.literal then return end
  local entry = {
    policy_domain = self.domain,
    policy_type = plan and plan.policy_type or "no-policy-found",
    mx_host = host,
    receiving_ip = address,
    result = result,
    failure_reason_code = result ~= "success" and detail and tostring(detail) or nil,
  }
  if plan and plan.dane then
    entry.policy_domain = plan.dane.base_domain
    entry.policy_strings = tlsa_strings(plan.dane.tlsa)
  elseif entry.policy_type == "sts" and self.sts_policy then
    entry.policy_strings = lines_of(self.sts_policy.text)
  elseif entry.policy_type ~= "tlsa" and self.sts_failure and self.sts_failure:find("^sts%-") then
    entry.policy_type, entry.result = "sts", self.sts_failure
    entry.failure_reason_code = self.sts_failure_detail
  end
  local ok, _, err = rec:record(entry)
  self:note("tls-rpt", ("TLS-RPT: %s %s for %s%s%s"):format(entry.policy_type, entry.result, host,
    address and (" " .. address) or "", ok and "" or (" (not recorded: " .. tostring(err) .. ")")),
    { result = entry.result, policy_type = entry.policy_type })
end

-- Connection reuse (opts.sessions, a client pool). A session is kept
-- under a key naming everything its checks depended on: the recipient
-- domain, the TLS policy level, REQUIRETLS, the port, the HELO name, the
-- trust (cafile, capath, tls_context), the resolver and the MTA-STS
-- source. Only a session opened and verified for exactly that key is
-- taken again, within the pool's idle_timeout, max_age and max_messages.
local function reuse_key(domain, opts, level, port)
  local parts = { "mx", domain, level, opts.requiretls and "requiretls" or "", port, opts.helo or "",
    opts.cafile or "", opts.capath or "", opts.tls_context or "", opts.dns or "", opts.mtasts or "",
    opts.bind or "", opts.family or "" }
  for i, v in ipairs(parts) do parts[i] = tostring(v) end
  return table.concat(parts, "\0")
end
M.reuse_key = reuse_key

-- The message over session (a file body read from its start again).
function Attempt:send_on(session)
  if self.body_start then self.msg.body:seek("set", self.body_start) end
  return session:send(self.msg)
end

-- Done with a session: kept for the next message to this domain under
-- the same policy (what it was verified for goes with it), else closed.
function Attempt:release(session, info)
  local sessions = self.opts.sessions
  if sessions and self.reuse_key and info then
    session.delivery = info
    session.max_messages = session.max_messages or self.opts.max_messages_per_session
    sessions:keep(self.reuse_key, session)
  else
    session:close()
  end
end

-- A session kept from an earlier message to this domain under the same
-- policy carries this one. Returns true when that settled the
-- recipients (accepted or refused); false when none was kept or it broke
-- before anything was accepted (then a new session, as without reuse).
function Attempt:reuse(results)
  local sessions = self.opts.sessions
  if not sessions then return false end
  self.reuse_key = reuse_key(self.domain, self.opts, self.level, self.port)
  while true do
    local session = sessions:take(self.reuse_key)
    if not session then return false end
    local info = session.delivery
    self:note("reuse", ("%s [%s]: session reused (message %d on it), verified for %s: %s"):format(info.host,
      info.address, session.messages + 1, self.domain, info.plan.why or info.plan.level),
      { host = info.host, address = info.address, reused = true })
    local res, t, e = self:send_on(session)
    if res or not pool.retryable(t, e) then
      self:release(session, info)
      self.used = { host = info.host, address = info.address, plan = info.plan, tlsinfo = info.tlsinfo,
        reused = true }
      self.sts_policy = info.sts_policy
      if res or (e and e.result) then
        self:finish(results, res or e.result, nil)
      else
        self:finish(results, nil, e or setmetatable({ token = t or "io", permanent = false,
          message = tostring(t) }, client.Error))
      end
      return true
    end
    self:note("reuse", ("%s [%s]: the kept session failed (%s); a new one"):format(info.host, info.address,
      tostring(e)), { error = e })
    session:close()
  end
end

-- One client context with DANE enabled, made when first needed.
local dane_ctx
local function dane_context()
  dane_ctx = dane_ctx or core.tls_context { mode = "client", dane = true }
  return dane_ctx
end

-- Client options for a plan.
function Attempt:client_options(plan, hostinfo, sock, tls_mode)
  local o = self.opts
  local c = {
    sock = sock,
    host = hostinfo.name,
    port = self.port,
    tls = tls_mode or plan.tls,
    helo = o.helo,
    timeouts = o.timeouts,
    transcript = o.transcript,
    cafile = o.cafile,
    capath = o.capath,
    servername = plan.servername or hostinfo.name,
    verify = false,
  }
  if plan.verify == "pkix" then
    c.verify = true
    c.tls_context = client.tls_context(o, true)
  elseif plan.verify == "report" then
    -- chain and name checked (tlsinfo().verified), the handshake never
    -- fails on them
    c.verify = true
    c.tls_context = client.tls_context(o, false)
  elseif plan.verify == "dane" then
    -- the TLSA records decide (PKIX trust plays no part)
    c.verify = true
    c.tls_context = dane_context()
    c.starttls_options = { dane = plan.dane }
  elseif o.tls_context then
    c.tls_context = o.tls_context
  end
  return c
end

-- What the session says about TLS, for the trail.
local function tls_summary(session)
  local info = session:tlsinfo()
  if not info then return "no TLS", nil end
  local parts = { info.version or "TLS", info.cipher }
  if info.dane and info.dane.matched then
    local m = info.dane.matched
    parts[#parts + 1] = ("DANE matched TLSA %s %s %s at depth %s"):format(tostring(m.usage), tostring(m.selector),
      tostring(m.mtype), tostring(info.dane.depth))
  elseif info.verified then
    parts[#parts + 1] = "verified"
  else
    parts[#parts + 1] = "not verified" .. (info.verify_error and (" (" .. info.verify_error .. ")") or "")
  end
  return table.concat(parts, ", "), info
end

-- One SMTP session on a connected socket. Returns "done", result, err,
-- the plan that applied | "retry", err ("retry": this address failed,
-- try another one).
function Attempt:session(plan, hostinfo, sock, address)
  local msg = self.msg
  local session, token, err = client.connect(self:client_options(plan, hostinfo, sock))
  if not session and plan.tls == "opportunistic" and err and err.stage == "starttls" and token ~= "smtp" then
    -- opportunistic TLS that failed in the handshake: plaintext once,
    -- as Postfix does for "may"
    self:note("tls", ("STARTTLS with %s failed (%s); again without TLS"):format(address, tostring(err)))
    self:report(plan, hostinfo.name, address, policy.rpt_result(err, plan), err)
    local again, t2, e2 = happy.connect({ { address = address } }, self.port,
      { timeout = self.connect_timeout, bind = self.opts.bind })
    if not again then return "retry", e2 and tostring(e2) or t2 end
    session, token, err = client.connect(self:client_options(plan, hostinfo, again, "none"))
    plan = { level = plan.level, tls = "none", verify = false, policy_type = plan.policy_type,
      why = plan.why .. "; plaintext after a failed handshake", reported = true }
  end
  if not session then
    self:note("session", ("%s [%s]: %s"):format(hostinfo.name, address, tostring(err)), { error = err })
    if err.stage == "starttls" or token == "tls" or err.extension == "STARTTLS" then
      self:report(plan, hostinfo.name, address, policy.rpt_result(err, plan), err)
      err.message = ("TLS policy %s: %s"):format(plan.level, err.message)
    end
    return "retry", err
  end
  local summary, info = tls_summary(session)
  self:note("tls", ("%s [%s]: %s"):format(hostinfo.name, address, summary), { tlsinfo = info })
  if plan.verify == "report" then
    if not info then
      self:report(plan, hostinfo.name, address, "starttls-not-supported", "no STARTTLS")
    elseif not info.verified then
      self:report(plan, hostinfo.name, address, policy.rpt_result({ cause = info.verify_error }), info.verify_error)
    elseif plan.sts_mx_mismatch then
      self:report(plan, hostinfo.name, address, "validation-failure", "MX not in the MTA-STS policy")
    else
      self:report(plan, hostinfo.name, address, "success")
    end
  elseif not plan.reported and (info or plan.policy_type ~= "no-policy-found") then
    -- a plaintext session with no policy is not a TLS session to count
    self:report(plan, hostinfo.name, address, "success")
  end
  self.tlsinfo = info
  if msg.requiretls and not (session.tls and session:has("REQUIRETLS")) then
    session:close()
    local _, _, e = policy.refuse("REQUIRETLS", ("%s does not advertise REQUIRETLS"):format(hostinfo.name))
    self:note("policy", e.message, { error = e })
    return "retry", e
  end
  local res, t, e = self:send_on(session)
  self:release(session, { host = hostinfo.name, address = address, plan = plan, tlsinfo = info,
    sts_policy = self.sts_policy })
  if res then
    return "done", res, nil, plan
  end
  if e and e.result then
    return "done", e.result, nil, plan
  end
  if e and e.permanent then
    return "done", nil, e, plan
  end
  self:note("session", ("%s [%s]: %s"):format(hostinfo.name, address, tostring(e)), { error = e })
  return "retry", e or t
end

-- The TLS policy for one host: TLSA records when DANE may apply, the
-- MTA-STS policy when DANE does not, then policy.decide. Returns plan,
-- nil, tlsa | nil, err, tlsa (and notes each step in the trail).
function Attempt:plan(hostinfo)
  local ctx = { dest = self.dest, hostinfo = hostinfo, requiretls = self.msg.requiretls }
  if self.level == "dane" or self.level == "dane-only" then
    local eligible, why = policy.dane_eligible(self.dest, hostinfo)
    if eligible then
      local tlsa, token, err = policy.tlsa(self.dest, hostinfo, self.port, self.resolver)
      if tlsa then
        ctx.tlsa = tlsa
        self:note("tlsa", ("TLSA %s: %s"):format(tlsa.qname, tlsa.records
          and ("%d of %d records usable"):format(tlsa.usable, #tlsa.records) or "none"),
          { state = tlsa.state, records = tlsa.records, base = tlsa.base })
      else
        ctx.tlsa_error = err or token
        self:note("tlsa", tostring(err or token), { error = err })
      end
    else
      self:note("tlsa", "no DANE: " .. why)
    end
  end
  if not (ctx.tlsa and ctx.tlsa.state == "usable") and self.level ~= "none" and self.level ~= "dane-only" then
    ctx.sts = self:sts()
  end
  local plan, _, perr = policy.decide(self.level, ctx)
  if not plan then
    self:note("policy", perr.message, { error = perr })
    if perr.tlsrpt then
      self:report({ policy_type = perr.policy_type or (ctx.sts and "sts") or "tlsa" }, hostinfo.name, nil,
        perr.tlsrpt, perr.message)
    end
    return nil, perr, ctx.tlsa
  end
  self:note("policy", plan.why, { level = plan.level, verify = plan.verify, plan = plan })
  return plan, nil, ctx.tlsa
end

-- Deliver to one host: addresses, policy, connect, session.
-- Returns "done", result, err | "next", err
function Attempt:host(host)
  local resolver = self.resolver
  local hostinfo, _, err = destinations.addresses(host, resolver, { family = self.opts.family })
  if not hostinfo then
    self:note("addresses", err.message, { host = host.name, error = err })
    return "next", err
  end
  local list = {}
  for _, a in ipairs(hostinfo.addresses) do list[#list + 1] = a.address end
  self:note("addresses", ("%s%s: %s; DNSSEC %s"):format(host.name,
    hostinfo.expanded ~= host.name and (" (CNAME " .. hostinfo.expanded .. ")") or "",
    table.concat(list, ", "), hostinfo.authentic and "secure" or "insecure"),
    { host = host.name, addresses = list, authentic = hostinfo.authentic })

  local plan, perr = self:plan(hostinfo)
  if not plan then
    return "next", perr
  end

  -- failed connects are remembered for the whole delivery; an address
  -- whose session failed is left out for this host's policy only
  local last, skip = nil, {}
  while true do
    local sock, a2, a3, a4 = happy.connect(hostinfo.addresses, self.port, {
      timeout = self.connect_timeout, failed = self.failed, skip = skip, bind = self.opts.bind })
    local attempts = (sock and a3 or a4) or {}
    for _, a in ipairs(attempts) do
      self:note("connect", ("%s [%s]:%d: %s%s"):format(host.name, a.address, self.port, tostring(a.result),
        a.detail and (" (" .. tostring(a.detail) .. ")") or ""),
        { address = a.address, family = a.family, result = a.result })
    end
    if not sock then
      if #attempts == 0 and last then return "next", last end
      return "next", setmetatable({ token = a2, permanent = false,
        message = ("connect to %s port %d: %s"):format(host.name, self.port, tostring(a3)) }, client.Error)
    end
    local address = a2.address
    local status, res, e, used_plan = self:session(plan, hostinfo, sock, address)
    if status == "done" then
      self.used = { host = host.name, address = address, plan = used_plan or plan, tlsinfo = self.tlsinfo }
      return "done", res, e
    end
    last = type(res) == "table" and res or setmetatable({ token = "io", permanent = false,
      message = tostring(res) }, client.Error)
    skip[address] = true
  end
end

-- Deliver to one domain's recipients; fills results.
function Attempt:run(results)
  if self:reuse(results) then return end
  local dest, token, err = destinations.destinations(self.domain, self.resolver, { random = self.opts.random })
  if not dest then
    self:note("destinations", err.message, { error = err })
    return self:finish(results, nil, err)
  end
  self.dest = dest
  self:note("destinations", describe_dest(dest), { destinations = dest })
  local last
  local all_permanent = true
  for _, host in ipairs(dest.hosts) do
    local status, res, e = self:host(host)
    if status == "done" then
      return self:finish(results, res, e)
    end
    last = res
    all_permanent = all_permanent and res and res.permanent
  end
  if last and not all_permanent then last.permanent = false end
  return self:finish(results, nil, last or setmetatable({ token = token or "dns", permanent = false,
    message = "no MX host could be reached" }, client.Error))
end

-- Per-recipient results from a session result or an error.
function Attempt:finish(results, res, err)
  local used = self.used or {}
  for _, rcpt in ipairs(self.rcpts) do
    local r = { address = rcpt, domain = self.domain, trail = self.trail, mx = used.host, ip = used.address,
      tls_policy = used.plan and used.plan.level, tls_why = used.plan and used.plan.why,
      tls = used.tlsinfo, dane = used.tlsinfo and used.tlsinfo.dane,
      mta_sts = self.sts_policy and self.sts_policy.mode, reused = used.reused or false,
      dsn = res and res.dsn or false }
    local got = res and res:recipient(rcpt)
    if got then
      r.ok, r.permanent, r.reply = got.ok, got.permanent, got.reply
      r.error = got.error
      r.text = got.reply and client.format_reply(got.reply) or (got.error and tostring(got.error))
    else
      r.ok, r.permanent, r.error = false, err and err.permanent or false, err
      r.text = err and tostring(err) or "not delivered"
    end
    results[#results + 1] = r
  end
end

local Result = {}
Result.__index = Result

--- result:recipient(address) -> the entry for that address
function Result:recipient(address)
  for _, r in ipairs(self.recipients) do
    if r.address == address then return r end
  end
end

-- A body that each domain's session can send: a function body is read
-- once; a file too when several domains (sessions in parallel) share it.
local function replayable(body, shared)
  if io.type(body) == "file" and shared then
    local data, err = body:read("a")
    if not data then return nil, err end
    return data
  end
  if type(body) ~= "function" then return body end
  local parts = {}
  while true do
    local chunk, why = body()
    if chunk == nil then
      if why then return nil, why end
      return table.concat(parts)
    end
    parts[#parts + 1] = chunk
  end
end

-- fn(item) for each item, at most limit at once, each in its own task;
-- returns when all are done (an error in one is raised here, after).
local function run_parallel(items, limit, fn)
  if #items <= 1 or limit <= 1 then
    for _, item in ipairs(items) do fn(item) end
    return
  end
  local running, failure = 0, nil
  local cond = core.cond()
  local tasks = {}
  for _, item in ipairs(items) do
    while running >= limit do cond:wait() end
    running = running + 1
    tasks[#tasks + 1] = core.spawn(function()
      local ok, err = xpcall(fn, debug.traceback, item)
      if not ok then failure = failure or err end
      running = running - 1
      cond:signal()
    end)
  end
  for _, t in ipairs(tasks) do t:join() end
  cond:close()
  if failure then error(failure, 0) end
end

--- deliver(msg) -> result
-- msg: from, to (an address or a list), body, and the client's message
-- fields (requiretls, smtputf8, dsn, ...). Options in the same table:
-- port (25), tls_policy (see policy.lua), dns (a resolver with query()),
-- mtasts (:policy(domain), mx_matches), tlsrpt (:record{...}), cafile,
-- capath (PKIX trust), helo, timeouts (client phases; connect is the
-- Happy Eyeballs step), family, bind, transcript, random, max_parallel
-- (domains delivered to at once, 8), sessions (a client pool: sessions
-- are kept there after a message and the next message to the same
-- domain under the same policy goes over one of them; see reuse_key),
-- max_messages_per_session (a lower cap than the pool's for the sessions
-- this opens).
-- result = { ok, recipients = { {address, domain, ok, permanent, reply,
-- text, error, mx, ip, tls_policy, tls_why, tls (tlsinfo), dane (the
-- TLSA record matched), mta_sts (the policy's mode), reused (over a kept
-- session), dsn (the MX took the DSN parameters), trail = { {event,
-- text, ...}, ... } }, ... } } in the order given; result:recipient(addr).
function M.deliver(msg)
  assert(type(msg) == "table", "deliver needs a table")
  local level = check_level(msg)
  local to = type(msg.to) == "table" and msg.to or { msg.to }
  local result = setmetatable({ ok = true, recipients = {} }, Result)
  local order, groups = {}, {}
  for _, rcpt in ipairs(to) do
    local address = type(rcpt) == "table" and rcpt.address or rcpt
    local domain = type(address) == "string" and domain_of(address)
    local key = domain or ""
    if not groups[key] then
      groups[key] = {}
      order[#order + 1] = key
    end
    table.insert(groups[key], rcpt)
  end
  local body, why = replayable(msg.body or msg.message, #order > 1)
  local failed, attempts, by_domain = {}, {}, {}
  for _, domain in ipairs(order) do
    local rcpts = groups[domain]
    local addrs = {}
    for i, r in ipairs(rcpts) do addrs[i] = type(r) == "table" and r.address or r end
    local attempt = setmetatable({
      domain = domain, rcpts = addrs, trail = {}, opts = msg, level = level,
      port = msg.port or 25, failed = failed, results = {},
      connect_timeout = msg.timeouts and msg.timeouts.connect or 30,
    }, Attempt)
    by_domain[domain] = attempt
    if domain == "" or not body then
      local err = setmetatable({ token = "invalid", permanent = true,
        message = domain == "" and "recipient without a domain" or ("the body failed: " .. tostring(why)) },
        client.Error)
      attempt:note("invalid", err.message)
      attempt:finish(attempt.results, nil, err)
    else
      attempt.resolver = resolver_of(msg)
      local m = {}
      for k, v in pairs(msg) do m[k] = v end
      m.to, m.body, m.message = rcpts, body, nil
      attempt.msg = m
      if io.type(body) == "file" then attempt.body_start = body:seek("cur") end
      attempts[#attempts + 1] = attempt
    end
  end
  run_parallel(attempts, msg.max_parallel or M.MAX_PARALLEL, function(attempt) attempt:run(attempt.results) end)
  -- the results in the order the recipients were given
  local cursor = {}
  for _, rcpt in ipairs(to) do
    local address = type(rcpt) == "table" and rcpt.address or rcpt
    local key = type(address) == "string" and domain_of(address) or ""
    cursor[key] = (cursor[key] or 0) + 1
    result.recipients[#result.recipients + 1] = by_domain[key].results[cursor[key]]
  end
  for _, r in ipairs(result.recipients) do
    if not r.ok then result.ok = false end
  end
  return result
end

--- destinations(domain [, opts]) -> dest | nil, token, err: the hosts
-- to try, each with its addresses (host.addresses, or host.error).
function M.destinations(domain, opts)
  opts = opts or {}
  local resolver = resolver_of(opts)
  local dest, token, err = destinations.destinations(domain, resolver, { random = opts.random })
  if not dest then return nil, token, err end
  for _, host in ipairs(dest.hosts) do
    local info, _, e = destinations.addresses(host, resolver, { family = opts.family })
    host.info, host.error = info, e
    host.addresses = info and info.addresses or {}
  end
  return dest
end

--- policy(domain [, opts]) -> { domain, destinations, sts, hosts = {
-- {name, plan | error, tlsa}, ... } } | nil, token, err: the TLS policy
-- each host would get, without connecting.
function M.policy(domain, opts)
  opts = opts or {}
  local level = check_level(opts)
  local attempt = setmetatable({ domain = domain, trail = {}, opts = opts, level = level,
    port = opts.port or 25, msg = { requiretls = opts.requiretls }, tlsrpt_off = true }, Attempt)
  attempt.resolver = resolver_of(opts)
  local dest, token, err = M.destinations(domain, opts)
  if not dest then return nil, token, err end
  attempt.dest = dest
  local out = { domain = domain, destinations = dest, hosts = {}, trail = attempt.trail }
  for _, host in ipairs(dest.hosts) do
    local entry = { name = host.name }
    if host.info then
      entry.plan, entry.error, entry.tlsa = attempt:plan(host.info)
    else
      entry.error = host.error
    end
    out.hosts[#out.hosts + 1] = entry
  end
  out.sts = attempt.sts_policy
  return out
end

return M
