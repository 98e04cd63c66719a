--- Credential stores (lua/luasmtp/credentials.lua): passwd-files written
-- with Dovecot's `doveadm pw` (package dovecot-core), the table and hook
-- stores, SCRAM keys, CRAM-MD5, reloading, hostile files.
local luasmtp = require "luasmtp"
local credentials = require "luasmtp.credentials"
local H = require "spec.helper"

local crypto = luasmtp.crypto

local DIR = H.tmp .. "/credentials"

local shquote = H.shquote

local function command_output(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  assert(ok, "command failed: " .. cmd .. ": " .. out)
  return (out:gsub("%s+$", ""))
end

--- `doveadm pw -s scheme -p password`: the "{SCHEME}..." string.
local function doveadm_pw(scheme, password)
  H.need("doveadm")
  return command_output("doveadm pw -s " .. scheme .. " -p " .. shquote(password))
end

--- Does doveadm accept password for hash?
local function doveadm_verifies(hash, password)
  H.need("doveadm")
  local p = assert(io.popen("doveadm pw -t " .. shquote(hash) .. " -p " .. shquote(password) .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  return ok == true and out:find("(verified)", 1, true) ~= nil
end

local function write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function b64(s) return crypto.b64encode(s) end

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

-- Check SCRAM keys against the password: StoredKey = H(ClientKey),
-- ServerKey = HMAC(SaltedPassword, "Server Key") (RFC 5802).
local function assert_scram_keys(keys, alg, password)
  local size = alg == "sha1" and 20 or 32
  local salted = crypto.pbkdf2(alg, password, keys.salt, keys.iterations, size)
  local client_key = crypto.hmac(alg, salted, "Client Key")
  assert.equal(b64(crypto.digest(alg, client_key)), b64(keys.stored_key))
  assert.equal(b64(crypto.hmac(alg, salted, "Server Key")), b64(keys.server_key))
end

-- Schemes doveadm writes that the store verifies, with the password used.
local SCHEMES = {
  "SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "CRYPT", "MD5-CRYPT", "DES-CRYPT",
  "SCRAM-SHA-1", "SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "CLEAR", "CLEARTEXT",
  "PLAIN-MD5", "LDAP-MD5", "SHA", "SHA256", "SHA512", "SMD5", "SSHA", "SSHA256", "SSHA512",
}
local function password_for(scheme)
  -- DES-CRYPT only uses 8 characters: keep the wrong passwords short
  if scheme == "DES-CRYPT" then return "s3cr" end
  return "S3cret p\195\164ss " .. scheme
end

describe("credentials", function()
  local file -- the doveadm passwd-file

  lazy_setup(function()
    os.execute("mkdir -p " .. shquote(DIR))
    local lines = { "# written by credentials_spec.lua with doveadm pw", "" }
    for _, scheme in ipairs(SCHEMES) do
      lines[#lines + 1] = ("u-%s:%s"):format(scheme:lower(), doveadm_pw(scheme, password_for(scheme)))
    end
    -- passwd fields and extra fields (which may hold ':')
    lines[#lines + 1] = "carol:" .. doveadm_pw("SHA512-CRYPT", "carolpw")
      .. ":1000:1001:Carol C:/home/carol:/bin/sh:userdb_quota_rule=*:storage=1G nodelay quota=5"
    -- no scheme: the default scheme (CRYPT)
    H.need("openssl")
    lines[#lines + 1] = "dave:" .. command_output("openssl passwd -6 davepw")
    lines[#lines + 1] = "   # an indented comment"
    lines[#lines + 1] = "argon:" .. doveadm_pw("ARGON2I", "x") -- unsupported scheme
    file = DIR .. "/users"
    write(file, table.concat(lines, "\n") .. "\n")
  end)

  describe("passwd_file with doveadm pw output", function()
    local store
    before_each(function()
      store = assert(credentials.passwd_file(file))
    end)

    it("verifies right and wrong passwords for every scheme", function()
      for _, scheme in ipairs(SCHEMES) do
        local user, pw = "u-" .. scheme:lower(), password_for(scheme)
        assert.is_true(store:verify_password(user, pw), scheme)
        assert.is_false(store:verify_password(user, pw .. "x"), scheme)
        assert.is_false(store:verify_password(user, pw:sub(1, -2)), scheme)
        assert.is_false(store:verify_password(user, ""), scheme)
        assert.is_false(store:verify_password(user, pw:upper()), scheme)
        assert.is_false(store:verify_password(user, "a\0" .. pw), scheme)
      end
      assert.is_true(store:verify_password("carol", "carolpw"))
      assert.is_true(store:verify_password("dave", "davepw"))
      assert.is_false(store:verify_password("dave", "carolpw"))
    end)

    it("refuses unknown users and user names that differ in case", function()
      assert.is_false(store:verify_password("nobody", "secret"))
      assert.is_false(store:verify_password("", ""))
      assert.is_false(store:verify_password("U-PLAIN", password_for("PLAIN")))
      assert.is_nil(store:lookup("nobody"))
      assert.is_nil(store:lookup("U-PLAIN"))
    end)

    it("loads unsupported schemes with a warning and never verifies them", function()
      assert.is_false(store:verify_password("argon", "x"))
      assert.equal("ARGON2I", store:lookup("argon").scheme)
      local found = false
      for _, w in ipairs(store.warnings) do
        if w:find("argon", 1, true) and w:find("unsupported scheme ARGON2I", 1, true) then found = true end
      end
      assert.is_true(found, table.concat(store.warnings, "\n"))
      assert.equal(1, #store.warnings, table.concat(store.warnings, "\n"))
    end)

    it("returns entries with passwd and extra fields", function()
      local e = store:lookup("carol")
      assert.equal("carol", e.user)
      assert.equal("SHA512-CRYPT", e.scheme)
      assert.matches("^%$6%$", e.secret)
      assert.equal("1000", e.uid)
      assert.equal("1001", e.gid)
      assert.equal("Carol C", e.gecos)
      assert.equal("/home/carol", e.home)
      assert.equal("/bin/sh", e.shell)
      assert.same({ userdb_quota_rule = "*:storage=1G", nodelay = true, quota = "5" }, e.extra)
      e.extra.quota = "changed" -- a copy: the store is not affected
      assert.equal("5", store:lookup("carol").extra.quota)
      local d = store:lookup("dave")
      assert.equal("CRYPT", d.scheme)
      assert.same({}, d.extra)
      assert.is_nil(d.uid)
    end)

    it("serves stored SCRAM keys in Dovecot's format", function()
      local k = store:scram_keys("u-scram-sha-256", "SCRAM-SHA-256")
      assert.equal(4096, k.iterations)
      assert.equal(16, #k.salt)
      assert.equal(32, #k.stored_key)
      assert_scram_keys(k, "sha256", password_for("SCRAM-SHA-256"))
      k = store:scram_keys("u-scram-sha-1", "SCRAM-SHA-1")
      assert.equal(20, #k.stored_key)
      assert_scram_keys(k, "sha1", password_for("SCRAM-SHA-1"))
      -- digest names work too; the other algorithm does not
      assert.same(k, store:scram_keys("u-scram-sha-1", "sha1"))
      assert.is_nil(store:scram_keys("u-scram-sha-1", "SCRAM-SHA-256"))
      assert.is_nil(store:scram_keys("u-scram-sha-256", "SCRAM-SHA-1"))
    end)

    it("derives SCRAM keys from plaintext entries, once", function()
      local pw = password_for("PLAIN")
      local k256 = store:scram_keys("u-plain", "SCRAM-SHA-256")
      assert.equal(4096, k256.iterations)
      assert.equal(16, #k256.salt)
      assert_scram_keys(k256, "sha256", pw)
      local again = store:scram_keys("u-plain", "SCRAM-SHA-256")
      assert.same(k256, again)
      again.salt = "x" -- a copy
      assert.equal(k256.salt, store:scram_keys("u-plain", "SCRAM-SHA-256").salt)
      local k1 = store:scram_keys("u-plain", "SCRAM-SHA-1")
      assert_scram_keys(k1, "sha1", pw)
      assert.are_not.equal(k1.salt, k256.salt)
      assert.are_not.equal(k256.salt, store:scram_keys("u-clear", "SCRAM-SHA-256").salt)
    end)

    it("has no SCRAM keys for hashed entries or unknown users", function()
      for _, user in ipairs { "u-sha512-crypt", "u-cram-md5", "u-ssha256", "nobody", "argon" } do
        assert.is_nil(store:scram_keys(user, "SCRAM-SHA-256"), user)
      end
      assert.has_error(function() store:scram_keys("u-plain", "SCRAM-MD5") end)
      assert.has_error(function() store:scram_keys("u-plain") end)
    end)

    it("answers CRAM-MD5 challenges for {CRAM-MD5} and plaintext entries", function()
      local chal = "<1896.697170952@postoffice.reston.mci.net>"
      for _, scheme in ipairs { "CRAM-MD5", "PLAIN", "CLEARTEXT" } do
        local f = store:cram_md5("u-" .. scheme:lower())
        assert.is_function(f, scheme)
        assert.equal(hex(crypto.hmac("md5", password_for(scheme), chal)), f(chal))
      end
      for _, user in ipairs { "u-sha512-crypt", "u-scram-sha-256", "u-plain-md5", "nobody" } do
        assert.is_nil(store:cram_md5(user), user)
      end
    end)

    it("reports what it can serve", function()
      assert.same({ plaintext = true, cram_md5 = true,
                    scram = { ["SCRAM-SHA-1"] = true, ["SCRAM-SHA-256"] = true } },
        store:capabilities())
    end)

    it("raises on arguments of the wrong type", function()
      assert.has_error(function() store:verify_password(nil, "x") end)
      assert.has_error(function() store:verify_password("x", nil) end)
      assert.has_error(function() store:lookup(42) end)
      assert.has_error(function() credentials.passwd_file(nil) end)
    end)
  end)

  describe("passwd_file options and capabilities", function()
    it("folds user names with lowercase", function()
      local path = DIR .. "/mixed"
      write(path, "Alice@Example.ORG:{PLAIN}pw\n")
      local store = assert(credentials.passwd_file(path, { lowercase = true }))
      assert.is_true(store:verify_password("alice@example.org", "pw"))
      assert.is_true(store:verify_password("ALICE@example.org", "pw"))
      assert.equal("alice@example.org", store:lookup("aLiCe@Example.org").user)
      local exact = assert(credentials.passwd_file(path))
      assert.is_false(exact:verify_password("alice@example.org", "pw"))
      assert.is_true(exact:verify_password("Alice@Example.ORG", "pw"))
    end)

    it("applies default_scheme to entries without a scheme", function()
      local path = DIR .. "/plainfile"
      write(path, "erin:erinpw\n")
      local store = assert(credentials.passwd_file(path, { default_scheme = "PLAIN" }))
      assert.is_true(store:verify_password("erin", "erinpw"))
      assert.equal("PLAIN", store:lookup("erin").scheme)
      -- as CRYPT (the default) "erinpw" is no valid hash
      store = assert(credentials.passwd_file(path))
      assert.is_false(store:verify_password("erin", "erinpw"))
    end)

    it("offers only the challenge-response mechanisms the entries allow", function()
      local path = DIR .. "/caps"
      write(path, "a:" .. doveadm_pw("SHA512-CRYPT", "x") .. "\n")
      local store = assert(credentials.passwd_file(path))
      assert.same({ plaintext = true, cram_md5 = false,
                    scram = { ["SCRAM-SHA-1"] = false, ["SCRAM-SHA-256"] = false } },
        store:capabilities())
      write(path, "a:" .. doveadm_pw("SCRAM-SHA-256", "x") .. "\nb:" .. doveadm_pw("CRAM-MD5", "y") .. "\n")
      store = assert(credentials.passwd_file(path))
      assert.same({ plaintext = true, cram_md5 = true,
                    scram = { ["SCRAM-SHA-1"] = false, ["SCRAM-SHA-256"] = true } },
        store:capabilities())
      write(path, "# nobody\n")
      store = assert(credentials.passwd_file(path))
      assert.is_false(store:capabilities().plaintext)
      assert.is_false(store:verify_password("a", "x"))
    end)

    it("derives SCRAM keys with scram_iterations", function()
      local path = DIR .. "/iter"
      write(path, "a:{PLAIN}pw\n")
      local store = assert(credentials.passwd_file(path, { scram_iterations = 8192 }))
      local k = store:scram_keys("a", "SCRAM-SHA-256")
      assert.equal(8192, k.iterations)
      assert_scram_keys(k, "sha256", "pw")
      assert.has_error(function() credentials.passwd_file(path, { scram_iterations = 0 }) end)
    end)

    it("fails with nil, \"io\" for a missing file and \"limit\" for a huge one", function()
      local s, err, detail = credentials.passwd_file(DIR .. "/does-not-exist")
      assert.is_nil(s)
      assert.equal("io", err)
      assert.matches("does%-not%-exist", detail)
      local path = DIR .. "/big"
      write(path, string.rep("x:{PLAIN}y\n", 1000))
      s, err = credentials.passwd_file(path, { max_size = 1000 })
      assert.is_nil(s)
      assert.equal("limit", err)
    end)
  end)

  describe("hostile passwd-files", function()
    it("skips malformed lines, keeps the good ones and never crashes", function()
      local path = DIR .. "/hostile"
      local junk = {}
      for i = 0, 255 do junk[#junk + 1] = string.char(i) end
      local lines = {
        "good1:{PLAIN}one",
        string.rep("A", 200000) .. ":{PLAIN}long",  -- very long line
        "justaname",                                 -- no password field
        ":{PLAIN}nouser",                            -- empty user
        "empty:",                                    -- empty password
        "sp ace:{PLAIN}x",                           -- white space in the name
        "nul\0user:{PLAIN}x",                        -- binary junk
        table.concat(junk),
        "s1:{SCRAM-SHA-256}abc",
        "s2:{SCRAM-SHA-256}99999999999,AAAA,AAAA,AAAA",
        "s3:{SCRAM-SHA-256}4096,!!!!,AAAA,AAAA",
        "s4:{SCRAM-SHA-1}4096,QUFBQQ==,QUFBQQ==,QUFBQQ==", -- keys of the wrong size
        "c1:{CRAM-MD5}zz",
        "c2:{CRAM-MD5}" .. string.rep("g", 64),
        "h1:{SHA256}not base64!",
        "h2:{SSHA}QQ==",
        "h3:{PLAIN.b64}%%%",
        "k1:{SHA512-CRYPT}",
        "k2:{SHA512-CRYPT}$6$x\1y",
        "k3:{BLF-CRYPT}garbage",
        "b1:{unterminated",
        "b2:{}",
        "b3:{{X}}y",
        "good1:{PLAIN}duplicate",
        "crlf:{PLAIN}crlfpw\r",
        string.rep(":", 5000),
        "good2:{PLAIN}two:::::::" .. string.rep("k=v ", 1000),
        "good3:{PLAIN.b64}" .. b64("three"),
        "good4:{SHA256.hex}" .. hex(crypto.digest("sha256", "four")),
      }
      write(path, table.concat(lines, "\n"))   -- no final newline
      local store = assert(credentials.passwd_file(path))
      assert.is_true(store:verify_password("good1", "one"))
      assert.is_false(store:verify_password("good1", "duplicate"))
      assert.is_true(store:verify_password("good2", "two"))
      assert.is_true(store:verify_password("good3", "three"))
      assert.is_true(store:verify_password("good4", "four"))
      assert.is_true(store:verify_password("crlf", "crlfpw"))
      assert.equal("v", store:lookup("good2").extra.k)
      for _, user in ipairs { "empty", "s1", "s2", "s3", "s4", "c1", "c2", "h1", "h2", "h3",
                              "k1", "k2", "k3", "b1", "b2", "b3", "justaname", "" } do
        assert.is_false(store:verify_password(user, ""), user)
        assert.is_false(store:verify_password(user, "x"), user)
        assert.is_nil(store:scram_keys(user, "SCRAM-SHA-256"), user)
        assert.is_nil(store:cram_md5(user), user)
      end
      assert.is_false(store:verify_password(string.rep("A", 200000), "long"))
      -- one warning per bad line, each naming its line, none with a secret
      assert.is_true(#store.warnings >= 20, table.concat(store.warnings, "\n"))
      for _, w in ipairs(store.warnings) do
        assert.matches("^" .. path:gsub("%p", "%%%0") .. ":%d+: ", w)
        assert.is_nil(w:find("duplicate", 1, true) and w:find("{PLAIN}", 1, true))
        assert.is_true(#w < 300)
      end
    end)

    it("survives a file of random bytes and bounds its warnings", function()
      local path = DIR .. "/random"
      local parts = {}
      for i = 1, 256 do parts[i] = crypto.random(4096) end
      write(path, table.concat(parts))
      local store = assert(credentials.passwd_file(path))
      assert.is_true(#store.warnings <= 101)
      assert.is_false(store:verify_password("x", "y"))
      -- many bad lines: the warnings stop at 100 plus a summary
      local lines = {}
      for i = 1, 500 do lines[i] = "bad" .. i end
      write(path, table.concat(lines, "\n"))
      store = assert(credentials.passwd_file(path))
      assert.equal(101, #store.warnings)
      assert.matches("400 more warnings", store.warnings[101])
    end)
  end)

  describe("reloading", function()
    it("reloads a changed file, keeps the old data when the file goes away", function()
      local path = DIR .. "/reload"
      write(path, "a:{PLAIN}old1\n")
      local store = assert(credentials.passwd_file(path, { check_interval = 0 }))
      assert.is_true(store:verify_password("a", "old1"))
      -- same size, rewritten in place
      write(path, "a:{PLAIN}new1\n")
      assert.is_true(store:verify_password("a", "new1"))
      assert.is_false(store:verify_password("a", "old1"))
      -- replaced by rename (a new inode), with a new user
      write(path .. ".new", "a:{PLAIN}new2\nb:" .. doveadm_pw("SCRAM-SHA-1", "bpw") .. "\n")
      assert(os.rename(path .. ".new", path))
      assert.is_true(store:verify_password("a", "new2"))
      assert.is_true(store:verify_password("b", "bpw"))
      assert.is_true(store:capabilities().scram["SCRAM-SHA-1"])
      -- gone: the previous data stays, with one warning
      os.remove(path)
      assert.is_true(store:verify_password("a", "new2"))
      assert.is_true(store:verify_password("b", "bpw"))
      local n = #store.warnings
      assert.matches("reload failed", store.warnings[n])
      assert.is_true(store:verify_password("a", "new2"))
      assert.equal(n, #store.warnings)
      -- back again
      write(path, "c:{PLAIN}cpw\n")
      assert.is_true(store:verify_password("c", "cpw"))
      assert.is_nil(store:lookup("a"))
      assert.same({}, store.warnings)
    end)

    it("forgets SCRAM keys derived from a password that changed", function()
      local path = DIR .. "/reload2"
      write(path, "a:{PLAIN}pw-one\n")
      local store = assert(credentials.passwd_file(path, { check_interval = 0 }))
      local k1 = store:scram_keys("a", "SCRAM-SHA-256")
      write(path, "a:{PLAIN}pw-two\n")
      local k2 = store:scram_keys("a", "SCRAM-SHA-256")
      assert_scram_keys(k2, "sha256", "pw-two")
      assert.are_not.equal(k1.stored_key, k2.stored_key)
    end)

    it("checks at most once per check_interval", function()
      local path = DIR .. "/reload3"
      write(path, "a:{PLAIN}one\n")
      local store = assert(credentials.passwd_file(path, { check_interval = 3600 }))
      write(path, "a:{PLAIN}two\n")
      assert.is_true(store:verify_password("a", "one"))
      assert.is_false(store:verify_password("a", "two"))
    end)

    it("notices a change by default within a second or so", function()
      local path = DIR .. "/reload4"
      write(path, "a:{PLAIN}one\n")
      local store = assert(credentials.passwd_file(path))
      write(path, "a:{PLAIN}two\n")
      H.run(function()
        local deadline = luasmtp.time() + 3
        while not store:verify_password("a", "two") and luasmtp.time() < deadline do
          luasmtp.sleep(0.1)
        end
      end)
      assert.is_true(store:verify_password("a", "two"))
    end)
  end)

  describe("timing", function()
    it("spends comparable time on unknown and known users", function()
      local path = DIR .. "/timing"
      local lines = {}
      for i = 1, 3 do
        lines[i] = "user" .. i .. ":" .. credentials.hash("pw" .. i, "BLF-CRYPT", { rounds = 8 })
      end
      lines[4] = "plain:{PLAIN}x"
      write(path, table.concat(lines, "\n"))
      local store = assert(credentials.passwd_file(path))
      local function cpu(user, n)
        local t0 = os.clock()
        for _ = 1, n do store:verify_password(user, "wrong") end
        return os.clock() - t0
      end
      cpu("user1", 1) -- warm up
      local known, unknown = cpu("user1", 5), cpu("nobody", 5)
      assert.is_true(unknown > known * 0.5, ("known %.3f s, unknown %.3f s"):format(known, unknown))
    end)
  end)

  describe("table store", function()
    it("accepts plaintext, {SCHEME} strings and tables", function()
      local store = credentials.table {
        alice = "alicepw",
        bob = credentials.hash("bobpw", "SHA512-CRYPT"),
        carol = { password = "{not-a-scheme}" },
        dave = { secret = doveadm_pw("SCRAM-SHA-256", "davepw"), extra = { quota = "1G" } },
      }
      assert.is_true(store:verify_password("alice", "alicepw"))
      assert.is_false(store:verify_password("alice", "bobpw"))
      assert.is_true(store:verify_password("bob", "bobpw"))
      assert.is_true(store:verify_password("carol", "{not-a-scheme}"))
      assert.is_true(store:verify_password("dave", "davepw"))
      assert.is_false(store:verify_password("eve", "alicepw"))
      assert.equal("1G", store:lookup("dave").extra.quota)
      assert.equal("PLAIN", store:lookup("alice").scheme)
      assert_scram_keys(store:scram_keys("alice", "SCRAM-SHA-1"), "sha1", "alicepw")
      assert_scram_keys(store:scram_keys("dave", "SCRAM-SHA-256"), "sha256", "davepw")
      assert.equal(hex(crypto.hmac("md5", "alicepw", "<c>")), store:cram_md5("alice")("<c>"))
      assert.is_nil(store:cram_md5("bob"))
      assert.is_true(store:capabilities().cram_md5)
    end)

    it("raises on bad entries", function()
      assert.has_error(function() credentials.table { alice = 42 } end)
      assert.has_error(function() credentials.table { [1] = "x" } end)
      assert.has_error(function() credentials.table { alice = {} } end)
      assert.has_error(function() credentials.table "alice" end)
    end)
  end)

  describe("hook store", function()
    it("verifies from the entries lookup returns, inside a task that waits", function()
      local users = { alice = { secret = doveadm_pw("SHA256-CRYPT", "alicepw") }, bob = { password = "bobpw" } }
      local calls = 0
      local store = credentials.hook {
        lookup = function(user)
          calls = calls + 1
          luasmtp.sleep(0.01) -- a backend that does I/O
          return users[user]
        end,
      }
      H.run(function()
        assert.is_true(store:verify_password("alice", "alicepw"))
        assert.is_false(store:verify_password("alice", "bobpw"))
        assert.is_true(store:verify_password("bob", "bobpw"))
        assert.is_false(store:verify_password("nobody", "x"))
        assert.equal("SHA256-CRYPT", store:lookup("alice").scheme)
        assert.is_nil(store:lookup("nobody"))
        local k = store:scram_keys("bob", "SCRAM-SHA-256")
        assert_scram_keys(k, "sha256", "bobpw")
        assert.same(k, store:scram_keys("bob", "SCRAM-SHA-256")) -- cached
        assert.is_nil(store:scram_keys("alice", "SCRAM-SHA-256"))
        assert.equal(hex(crypto.hmac("md5", "bobpw", "<c>")), store:cram_md5("bob")("<c>"))
      end)
      assert.is_true(calls >= 9)
      -- nothing declared: only plaintext mechanisms are offered
      assert.same({ plaintext = true, cram_md5 = false,
                    scram = { ["SCRAM-SHA-1"] = false, ["SCRAM-SHA-256"] = false } },
        store:capabilities())
    end)

    it("uses the hooks given and passes backend failures through", function()
      local keys = { salt = "s", iterations = 4096, stored_key = "k", server_key = "v" }
      local store = credentials.hook {
        verify_password = function(user, password)
          if user == "down" then return nil, "io", "ldap server unreachable" end
          return user == "alice" and password == "pw"
        end,
        scram_keys = function(user, alg)
          assert.equal("SCRAM-SHA-256", alg)
          if user == "down" then return nil, "io", "ldap server unreachable" end
          return user == "alice" and keys or nil
        end,
        capabilities = { scram = { ["SCRAM-SHA-256"] = true } },
      }
      assert.is_true(store:verify_password("alice", "pw"))
      assert.is_false(store:verify_password("alice", "x"))
      local ok, err, detail = store:verify_password("down", "pw")
      assert.is_nil(ok)
      assert.equal("io", err)
      assert.equal("ldap server unreachable", detail)
      assert.equal(keys, store:scram_keys("alice", "sha256"))
      assert.is_nil(store:scram_keys("bob", "SCRAM-SHA-256"))
      local k
      k, err = store:scram_keys("down", "SCRAM-SHA-256")
      assert.is_nil(k)
      assert.equal("io", err)
      assert.is_nil(store:lookup("alice")) -- no lookup hook
      assert.same({ plaintext = true, cram_md5 = false,
                    scram = { ["SCRAM-SHA-1"] = false, ["SCRAM-SHA-256"] = true } },
        store:capabilities())
    end)

    it("passes lookup failures through", function()
      local store = credentials.hook { lookup = function() return nil, "io", "sql down" end }
      local ok, err, detail = store:verify_password("a", "b")
      assert.is_nil(ok)
      assert.equal("io", err)
      assert.equal("sql down", detail)
      ok, err = store:lookup("a")
      assert.is_nil(ok)
      assert.equal("io", err)
    end)

    it("raises on bad hook tables", function()
      assert.has_error(function() credentials.hook {} end)
      assert.has_error(function() credentials.hook { lookup = "x" } end)
      assert.has_error(function() credentials.hook() end)
    end)
  end)

  describe("hash", function()
    it("makes entries that doveadm and the stores verify", function()
      for _, scheme in ipairs { "SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "CRYPT", "SCRAM-SHA-1",
                                "SCRAM-SHA-256", "CRAM-MD5", "PLAIN" } do
        local pw = "h\195\164sh " .. scheme
        local h = credentials.hash(pw, scheme)
        assert.equal("{" .. scheme .. "}", h:sub(1, #scheme + 2))
        assert.is_true(doveadm_verifies(h, pw), h)
        assert.is_false(doveadm_verifies(h, pw .. "!"), h)
        local store = credentials.table { u = h }
        assert.is_true(store:verify_password("u", pw), scheme)
        assert.is_false(store:verify_password("u", pw .. "!"), scheme)
      end
    end)

    it("honours rounds and iterations, raises on unknown schemes", function()
      assert.matches("^{BLF%-CRYPT}%$2y%$04%$", credentials.hash("x", "BLF-CRYPT", { rounds = 4 }))
      assert.matches("^{SHA512%-CRYPT}%$6%$rounds=6000%$", credentials.hash("x", "SHA512-CRYPT", { rounds = 6000 }))
      assert.matches("^{SCRAM%-SHA%-256}5000,", credentials.hash("x", "SCRAM-SHA-256", { iterations = 5000 }))
      assert.has_error(function() credentials.hash("x", "ARGON2I") end)
      assert.has_error(function() credentials.hash("x\0y", "SHA512-CRYPT") end)
    end)
  end)

  describe("fake_scram_keys", function()
    it("gives a stable salt per user and keys that never verify", function()
      local a1 = credentials.fake_scram_keys("ghost", "SCRAM-SHA-256")
      local a2 = credentials.fake_scram_keys("ghost", "SCRAM-SHA-256")
      local b = credentials.fake_scram_keys("phantom", "SCRAM-SHA-256")
      assert.equal(a1.salt, a2.salt)
      assert.are_not.equal(a1.salt, b.salt)
      assert.are_not.equal(a1.stored_key, a2.stored_key)
      assert.equal(4096, a1.iterations)
      assert.equal(32, #a1.stored_key)
      assert.equal(20, #credentials.fake_scram_keys("ghost", "SCRAM-SHA-1").server_key)
    end)
  end)
end)
