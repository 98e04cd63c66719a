--- luasmtp.credentials: credential stores for the server side of SASL.
--
-- A store answers the questions the SASL mechanisms ask:
--
--   store:lookup(user) -> entry | nil
--       entry = { user =, scheme =, secret =, extra = {k = v}, uid =, gid =,
--                 gecos =, home =, shell = } (passwd fields only when set)
--   store:verify_password(user, password) -> true | false      (PLAIN, LOGIN)
--   store:scram_keys(user, alg) -> { salt =, iterations =, stored_key =,
--                                    server_key = } | nil    (SCRAM-SHA-*)
--   store:cram_md5(user) -> function(challenge) -> hex | nil  (CRAM-MD5)
--   store:capabilities() -> { plaintext =, cram_md5 =, scram = {
--                               ["SCRAM-SHA-1"] =, ["SCRAM-SHA-256"] = } }
--
-- Hook stores may also answer `nil, token, detail` when their backend
-- fails (the server then answers 454 4.7.0, not 535).
--
-- Secrets use Dovecot's `{SCHEME}secret` notation, so passwd-files written
-- with `doveadm pw` work unchanged. Supported schemes:
--   {PLAIN} {CLEAR} {CLEARTEXT} (and .b64/.hex forms), {CRAM-MD5},
--   {SCRAM-SHA-1} {SCRAM-SHA-256},
--   crypt(3): {CRYPT} {SHA512-CRYPT} {SHA256-CRYPT} {BLF-CRYPT}
--     {MD5-CRYPT} {DES-CRYPT} and yescrypt ($y$) through {CRYPT},
--   digests: {PLAIN-MD5} {LDAP-MD5} {MD5} {SHA} {SHA1} {SHA256} {SHA512}
--     {SMD5} {SSHA} {SSHA256} {SSHA512}.
-- Not supported (entries load with a warning and never verify): ARGON2*,
-- PBKDF2, DIGEST-MD5, OTP and the other legacy schemes.
--
-- Every password comparison is constant-time, and verifying a password
-- for an unknown user costs about as much as for a known one.
--
-- The pieces: credentials/schemes.lua (the {SCHEME} notation),
-- store.lua (record stores, the table store), passwd_file.lua, hook.lua.
local schemes = require "luasmtp.credentials.schemes"
local store = require "luasmtp.credentials.store"
local passwd_file = require "luasmtp.credentials.passwd_file"
local hook = require "luasmtp.credentials.hook"

return {
  passwd_file = passwd_file.passwd_file,
  table = store.table,
  hook = hook.hook,
  hash = schemes.hash,
  fake_scram_keys = schemes.fake_scram_keys,
}
