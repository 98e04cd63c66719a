--- luasmtp: SMTP toolkit for Lua 5.4 on a C core.
--
-- This module gathers the public API. Every function that waits
-- (connect, receive, send, starttls, sleep, resolve) yields the calling
-- task; called from the main chunk, it runs the loop until it is done.
-- I/O failures return nil, token, detail with token one of:
-- "timeout", "closed", "reset", "tls", "limit", "refused", "dns",
-- "unreachable", "io", "protocol".
local core = require "luasmtp.core"
local net = require "luasmtp.net"
local http = require "luasmtp.http"

local M = {
  version = core.version,

  -- tasks and the loop
  spawn = core.spawn,
  run = core.run,
  step = core.step,
  sleep = core.sleep,
  now = core.now,
  update_now = core.update_now,
  time = core.time,
  current = core.current,
  on_error = core.on_error,
  cond = core.cond,
  wait_signal = core.wait_signal,
  -- live objects and memory (core.stats) and the server sessions in progress
  stats = function()
    local st = core.stats()
    local server = package.loaded["luasmtp.server"]
    st.sessions = server and server.sessions() or 0
    return st
  end,

  -- DNS
  resolve = core.resolve,
  resolve_mx = core.resolve_mx,
  resolve_txt = core.resolve_txt,
  -- also empties luasmtp.dns's cache (its answers came from the old servers)
  dns_configure = function(opts)
    local ok, err, detail = core.dns_configure(opts)
    local dns = package.loaded["luasmtp.dns"]
    if ok and dns then
      dns.cache_clear()
    end
    return ok, err, detail
  end,

  -- HTTP(S) client (src/http.c)
  http = http,

  -- gzip over zlib (src/gzip.c)
  gzip = core.gzip,
  gunzip = core.gunzip,

  -- TCP, UNIX-domain sockets and TLS
  connect = net.connect,
  connect_unix = net.connect_unix,
  listen = net.listen,
  serve = net.serve,
  parse_address = net.parse_address,
  format_address = net.format_address,
  socketpair = core.socketpair,
  tls = {
    context = core.tls_context,
    dane_usable = core.dane_usable,
  },

  -- hashes, HMAC, PBKDF2, random, base64, crypt(3) (src/crypto.c)
  crypto = {
    digest = core.digest,
    hmac = core.hmac,
    pbkdf2 = core.pbkdf2,
    random = core.random,
    equal = core.equal,
    xor = core.xor,
    b64encode = core.b64encode,
    b64decode = core.b64decode,
    crypt = core.crypt,
    crypt_gensalt = core.crypt_gensalt,
    cram_md5_context = core.cram_md5_context,
    cram_md5_response = core.cram_md5_response,
  },
}

return M
