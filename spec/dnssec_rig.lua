--- A DNSSEC test rig on loopback: signed zones served by nsd behind a
-- validating unbound. For the specs of every module that reads DNS.
--
--   local rig = require "spec.dnssec_rig"
--   local r = rig.start {
--     records = { "mx 300 IN A 127.0.0.2", "@ IN MX 10 mx" },  -- example.test
--     zones = {
--       { name = "plain.example.test", signed = false, records = { ... } },
--       { name = "bad.example.test", bogus = "ds", records = { ... } },
--       { name = "forged.example.test", bogus = "tamper", records = { ... } },
--     },
--   }
--   require("luasmtp.dns").configure { servers = { r.server } }
--   ...
--   r:stop()            -- always (finally / lazy_teardown); idempotent
--
-- records are zone-file lines (any type nsd knows: A, AAAA, MX, CNAME,
-- TXT, TLSA, ...), names relative to their zone or absolute. The apex
-- zone (default example.test) is signed; its DS is unbound's trust
-- anchor. Subzones are delegated from it: signed (a DS in the parent,
-- authentic answers), signed = false (no DS: provably insecure,
-- authentic false), bogus = "ds" (the parent's DS names a key that did
-- not sign the zone: every answer SERVFAIL) or bogus = "tamper" (signed,
-- then every A record's address changed, so its signature fails).
-- r:reload(spec) rebuilds the zones with new records and restarts both
-- daemons on the same ports (a fresh unbound cache).
--
-- Nothing leaves loopback: unbound binds its outgoing queries to
-- 127.0.0.1, reaches the zones through stub-zone entries pointing at
-- nsd, refuses every name outside the apex zone and has no root trust
-- anchor. Both daemons run under timeout(1) with a lifetime (default
-- 600 s) so they end even when the test process dies; r:stop() ends them
-- by pid.
--
-- The functions block (shell commands, short sleeps); call them from the
-- setup of a spec or from a test body.
local H = require "spec.helper"

local M = {}

local LIFETIME = 600

local sh = H.shquote

local function run(cmd)
  local ok = os.execute(cmd)
  return ok == true
end

local function must(cmd, what)
  os.execute("mkdir -p " .. sh(H.tmp))
  local log = H.tmp .. "/dnssec_rig_cmd.log"
  if not run(cmd .. " >" .. sh(log) .. " 2>&1") then
    local f = io.open(log)
    local out = f and f:read("a") or ""
    if f then f:close() end
    error("dnssec rig: " .. what .. " failed: " .. out, 2)
  end
end

local write = H.writefile

local function shell_sleep(s)
  os.execute("sleep " .. s)
end

local function alive(pid)
  return run("kill -0 " .. math.tointeger(pid) .. " 2>/dev/null")
end

local function stop_pid(pid)
  if not pid then return end
  H.kill(pid)
  for _ = 1, 100 do
    if not alive(pid) then return end
    shell_sleep(0.05)
  end
  os.execute("kill -9 " .. math.tointeger(pid) .. " 2>/dev/null")
end

-- A key (one KSK-flagged key signs everything) per zone name, kept for
-- the process so trust anchors stay the same across rigs.
local keys = {}
local function key_for(dir, zone, tag)
  local id = zone .. (tag or "")
  if keys[id] then return keys[id] end
  local kdir = dir .. "/keys/" .. id
  must("mkdir -p " .. sh(kdir), "mkdir")
  must("cd " .. sh(kdir) .. " && ldns-keygen -a ECDSAP256SHA256 -k " .. sh(zone), "ldns-keygen")
  local p = assert(io.popen("ls " .. sh(kdir) .. "/*.key"))
  local keyfile = p:read("l")
  p:close()
  assert(keyfile, "dnssec rig: ldns-keygen made no key")
  local base = keyfile:gsub("%.key$", "")
  local ds = H.readfile(base .. ".ds")
  keys[id] = { base = base, ds = ds }
  return keys[id]
end

local function zone_text(origin, records, extra)
  local lines = {
    "$ORIGIN " .. origin .. ".",
    "$TTL 300",
    "@ IN SOA ns." .. origin .. ". hostmaster." .. origin .. ". 1 3600 600 86400 60",
    "@ IN NS ns." .. origin .. ".",
    "ns IN A 127.0.0.1",
  }
  for _, r in ipairs(extra or {}) do lines[#lines + 1] = r end
  for _, r in ipairs(records or {}) do lines[#lines + 1] = r end
  return table.concat(lines, "\n") .. "\n"
end

-- After signing: every A record of the zone gets another address, its
-- RRSIG stays: a signature that no longer verifies.
local function tamper(text)
  return (text:gsub("(\tIN\tA\t%d+%.%d+%.%d+%.)(%d+)", function(prefix, last)
    return prefix .. tostring((tonumber(last) + 100) % 256)
  end))
end

local function sign(dir, zone, text, key, bogus)
  local src = dir .. "/" .. zone .. ".zone"
  local out = dir .. "/" .. zone .. ".signed"
  write(src, text)
  must(string.format("ldns-signzone -f %s -o %s %s %s", sh(out), sh(zone), sh(src), sh(key.base)),
    "ldns-signzone " .. zone)
  if bogus == "tamper" then
    write(out, tamper(H.readfile(out)))
  end
  return out
end

-- Write every zone file of spec; returns { {name, file}, ... } and the
-- trust anchor text.
local function build_zones(dir, spec)
  local origin = spec.origin or "example.test"
  local files, delegations = {}, {}
  for _, z in ipairs(spec.zones or {}) do
    assert(z.name:sub(-#origin - 1) == "." .. origin, "subzone " .. z.name .. " is not under " .. origin)
    local label = z.name:sub(1, -#origin - 2)
    delegations[#delegations + 1] = label .. " IN NS ns." .. origin .. "."
    local text = zone_text(z.name, z.records)
    if z.signed == false then
      write(dir .. "/" .. z.name .. ".signed", text)
    else
      local key = key_for(dir, z.name)
      sign(dir, z.name, text, key, z.bogus)
      local ds = key.ds
      if z.bogus == "ds" then
        ds = key_for(dir, z.name, ".unused").ds -- a key that signs nothing
      end
      delegations[#delegations + 1] = (ds:gsub("\n+$", ""))
    end
    files[#files + 1] = z.name
  end
  local key = key_for(dir, origin)
  sign(dir, origin, zone_text(origin, spec.records, delegations), key)
  table.insert(files, 1, origin)
  return origin, files, key.ds
end

local function nsd_conf(dir, port, zones)
  local t = {
    "server:",
    "  ip-address: 127.0.0.1@" .. port,
    "  port: " .. port,
    "  do-ip6: no",
    "  username: \"\"",
    "  chroot: \"\"",
    "  zonesdir: \"" .. dir .. "\"",
    "  database: \"\"",
    "  zonelistfile: \"" .. dir .. "/nsd.zonelist\"",
    "  xfrdfile: \"" .. dir .. "/nsd.xfrd\"",
    "  xfrdir: \"" .. dir .. "\"",
    "  pidfile: \"" .. dir .. "/nsd.pid\"",
    "  logfile: \"" .. dir .. "/nsd.log\"",
    "  server-count: 1",
    "  reuseport: no",
    "  verbosity: 1",
    "remote-control:",
    "  control-enable: no",
  }
  for _, z in ipairs(zones) do
    t[#t + 1] = "zone:"
    t[#t + 1] = "  name: \"" .. z .. "\""
    t[#t + 1] = "  zonefile: \"" .. dir .. "/" .. z .. ".signed\""
  end
  return table.concat(t, "\n") .. "\n"
end

local function unbound_conf(dir, port, nsd_port, origin, zones)
  local t = {
    "server:",
    "  interface: 127.0.0.1",
    "  port: " .. port,
    "  do-ip6: no",
    "  do-daemonize: no",
    "  username: \"\"",
    "  chroot: \"\"",
    "  directory: \"" .. dir .. "\"",
    "  pidfile: \"" .. dir .. "/unbound.pid\"",
    "  use-syslog: no",
    "  logfile: \"" .. dir .. "/unbound.log\"",
    "  verbosity: 1",
    "  val-log-level: 2",
    "  num-threads: 1",
    "  so-reuseport: no",
    "  outgoing-interface: 127.0.0.1",
    "  outgoing-range: 64",
    "  do-not-query-localhost: no",
    "  qname-minimisation: no",
    "  access-control: 127.0.0.0/8 allow",
    "  module-config: \"validator iterator\"",
    "  trust-anchor-file: \"" .. dir .. "/anchor.ds\"",
    "  local-zone: \".\" refuse",
    "  local-zone: \"test.\" nodefault",
    "  local-zone: \"" .. origin .. ".\" transparent",
    "remote-control:",
    "  control-enable: no",
  }
  for _, z in ipairs(zones) do
    t[#t + 1] = "stub-zone:"
    t[#t + 1] = "  name: \"" .. z .. "\""
    t[#t + 1] = "  stub-addr: 127.0.0.1@" .. nsd_port
  end
  return table.concat(t, "\n") .. "\n"
end

-- Wait until the server at port answers a SOA query for zone.
local function wait_ready(port, zone, pid, what, logfile)
  for _ = 1, 600 do -- at least 30 s: a loaded machine starts daemons slowly
    if not alive(pid) then break end
    if run(string.format("drill -Q -p %d @127.0.0.1 %s SOA >/dev/null 2>&1", port, sh(zone))) then
      return true
    end
    shell_sleep(0.05)
  end
  local f = io.open(logfile)
  local log = f and f:read("a") or ""
  if f then f:close() end
  return false, what .. " did not start: " .. log
end

local Rig = {}
Rig.__index = Rig

function Rig:_launch()
  local dir = self.dir
  write(dir .. "/nsd.conf", nsd_conf(dir, self.nsd_port, self.zones))
  write(dir .. "/unbound.conf", unbound_conf(dir, self.port, self.nsd_port, self.origin, self.zones))
  must("nsd-checkconf " .. sh(dir .. "/nsd.conf"), "nsd-checkconf")
  must("unbound-checkconf " .. sh(dir .. "/unbound.conf"), "unbound-checkconf")
  os.remove(dir .. "/nsd.log")
  os.remove(dir .. "/unbound.log")
  self.nsd_pid = H.start(string.format("exec timeout -k 5 %d nsd -d -c %s", self.lifetime,
    sh(dir .. "/nsd.conf")), dir .. "/nsd.out")
  local ok, err = wait_ready(self.nsd_port, self.origin, self.nsd_pid, "nsd", dir .. "/nsd.out")
  if not ok then return nil, err end
  self.unbound_pid = H.start(string.format("exec timeout -k 5 %d unbound -d -c %s", self.lifetime,
    sh(dir .. "/unbound.conf")), dir .. "/unbound.out")
  ok, err = wait_ready(self.port, self.origin, self.unbound_pid, "unbound", dir .. "/unbound.log")
  if not ok then return nil, err end
  return true
end

function Rig:_build(spec)
  local origin, zones, anchor = build_zones(self.dir, spec)
  self.origin, self.zones = origin, zones
  write(self.dir .. "/anchor.ds", anchor)
end

--- Stop both daemons (idempotent).
function Rig:stop()
  stop_pid(self.unbound_pid)
  stop_pid(self.nsd_pid)
  self.unbound_pid, self.nsd_pid = nil, nil
end

--- New zone contents (the same spec shape as start), same ports.
function Rig:reload(spec)
  self:stop()
  self:_build(spec)
  local ok, err = self:_launch()
  if not ok then
    self:stop()
    error("dnssec rig: " .. err, 2)
  end
end

--- The log of unbound (validation failures are explained there).
function Rig:unbound_log()
  local f = io.open(self.dir .. "/unbound.log")
  local s = f and f:read("a") or ""
  if f then f:close() end
  return s
end

--- Start the rig; see the header. spec.lifetime: seconds before the
-- daemons end by themselves.
function M.start(spec)
  H.need("nsd", "unbound", "ldnsutils")
  spec = spec or {}
  local base = H.tmp .. "/dnssec"
  must("mkdir -p " .. sh(base), "mkdir")
  local p = assert(io.popen("mktemp -d " .. sh(base .. "/rig.XXXXXX")))
  local dir = p:read("l")
  p:close()
  local self = setmetatable({ dir = dir, lifetime = spec.lifetime or LIFETIME }, Rig)
  local okb, berr = pcall(self._build, self, spec)
  if not okb then
    error(berr, 2)
  end
  local last
  for _ = 1, 3 do -- a port taken between choosing and binding: try others
    self.nsd_port, self.port = H.free_port(), H.free_port()
    self.server = "127.0.0.1:" .. self.port
    self.nsd_server = "127.0.0.1:" .. self.nsd_port
    local ok, err = self:_launch()
    if ok then
      return self
    end
    self:stop()
    last = err
  end
  error("dnssec rig: " .. tostring(last), 2)
end

--- Hex of the TLSA association data for a PEM certificate file:
-- selector 0 (whole certificate) or 1 (SubjectPublicKeyInfo), mtype 0
-- (as is), 1 (SHA-256) or 2 (SHA-512).
function M.tlsa_hex(certfile, selector, mtype)
  local der
  if selector == 0 then
    der = string.format("openssl x509 -in %s -outform DER", sh(certfile))
  else
    der = string.format("openssl x509 -in %s -pubkey -noout | openssl pkey -pubin -outform DER",
      sh(certfile))
  end
  local digest = ({ [0] = "", [1] = " | openssl dgst -sha256 -binary",
                    [2] = " | openssl dgst -sha512 -binary" })[mtype]
  assert(digest, "mtype must be 0, 1 or 2")
  local p = assert(io.popen(der .. digest .. " | od -An -v -tx1 | tr -d ' \\n'"))
  local hex = p:read("a")
  p:close()
  assert(hex and #hex > 0, "could not compute TLSA data for " .. certfile)
  return hex
end

--- A TLSA record line for owner (e.g. "_25._tcp.mx") and a certificate.
function M.tlsa_record(owner, usage, selector, mtype, certfile)
  return string.format("%s IN TLSA %d %d %d %s", owner, usage, selector, mtype,
    M.tlsa_hex(certfile, selector, mtype))
end

return M
