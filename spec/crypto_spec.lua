--- Crypto primitives (src/crypto.c): known-answer tests from the RFCs,
-- strict base64, constant-time compare, crypt(3) against the openssl CLI,
-- the CRAM-MD5 context.
local luasmtp = require "luasmtp"
local H = require "spec.helper"

local crypto = luasmtp.crypto

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

local function unhex(s)
  return (s:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end))
end

local shquote = H.shquote

local function command_output(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("a")
  local ok = p:close()
  assert(ok, "command failed: " .. cmd)
  return (out:gsub("%s+$", ""))
end

describe("crypto", function()
  it("is exported as luasmtp.crypto", function()
    local core = require "luasmtp.core"
    for _, name in ipairs { "digest", "hmac", "pbkdf2", "random", "equal", "xor", "b64encode",
                            "b64decode", "crypt", "crypt_gensalt", "cram_md5_context",
                            "cram_md5_response" } do
      assert.is_function(crypto[name], name)
      assert.equal(core[name], crypto[name])
    end
  end)

  describe("digest", function()
    it("computes the FIPS 180 / RFC 1321 'abc' vectors", function()
      assert.equal("900150983cd24fb0d6963f7d28e17f72", hex(crypto.digest("md5", "abc")))
      assert.equal("a9993e364706816aba3e25717850c26c9cd0d89d", hex(crypto.digest("sha1", "abc")))
      assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        hex(crypto.digest("sha256", "abc")))
      assert.equal("ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        .. "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        hex(crypto.digest("sha512", "abc")))
      assert.equal("d41d8cd98f00b204e9800998ecf8427e", hex(crypto.digest("md5", "")))
    end)

    it("hashes binary data with NUL bytes", function()
      assert.are_not.equal(crypto.digest("sha256", "a\0b"), crypto.digest("sha256", "a"))
    end)

    it("raises on an unknown algorithm or a non-string", function()
      assert.has_error(function() crypto.digest("sha3", "x") end)
      assert.has_error(function() crypto.digest("md4", "x") end)
      assert.has_error(function() crypto.digest("sha256", {}) end)
    end)
  end)

  describe("hmac", function()
    it("passes RFC 4231 test cases 1, 2 and 6 (SHA-256, SHA-512)", function()
      local k1 = string.rep("\x0b", 20)
      assert.equal("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        hex(crypto.hmac("sha256", k1, "Hi There")))
      assert.equal("87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
        .. "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
        hex(crypto.hmac("sha512", k1, "Hi There")))
      assert.equal("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        hex(crypto.hmac("sha256", "Jefe", "what do ya want for nothing?")))
      assert.equal("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
        hex(crypto.hmac("sha256", string.rep("\xaa", 131),
          "Test Using Larger Than Block-Size Key - Hash Key First")))
    end)

    it("passes RFC 2202 HMAC-MD5 and HMAC-SHA1 test cases", function()
      assert.equal("9294727a3638bb1c13f48ef8158bfc9d",
        hex(crypto.hmac("md5", string.rep("\x0b", 16), "Hi There")))
      assert.equal("750c783e6ab0b503eaa86e310a5db738",
        hex(crypto.hmac("md5", "Jefe", "what do ya want for nothing?")))
      assert.equal("6b1ab7fe4bd7bf8f0b62e6ce61b9d0cd",
        hex(crypto.hmac("md5", string.rep("\xaa", 80),
          "Test Using Larger Than Block-Size Key - Hash Key First")))
      assert.equal("b617318655057264e28bc0b6fb378c8ef146be00",
        hex(crypto.hmac("sha1", string.rep("\x0b", 20), "Hi There")))
    end)

    it("accepts an empty key and empty data", function()
      assert.equal(32, #crypto.hmac("sha256", "", ""))
    end)
  end)

  describe("pbkdf2", function()
    it("passes the RFC 6070 PBKDF2-HMAC-SHA1 vectors", function()
      assert.equal("0c60c80f961f0e71f3a9b524af6012062fe037a6",
        hex(crypto.pbkdf2("sha1", "password", "salt", 1, 20)))
      assert.equal("ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957",
        hex(crypto.pbkdf2("sha1", "password", "salt", 2, 20)))
      assert.equal("4b007901b765489abead49d926f721d065a429c1",
        hex(crypto.pbkdf2("sha1", "password", "salt", 4096, 20)))
      assert.equal("3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038",
        hex(crypto.pbkdf2("sha1", "passwordPASSWORDpassword",
          "saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096, 25)))
      assert.equal("56fa6aa75548099dcc37d7f03425e0c3",
        hex(crypto.pbkdf2("sha1", "pass\0word", "sa\0lt", 4096, 16)))
    end)

    it("raises on iteration counts and lengths out of range", function()
      -- RFC 6070's 16777216-iteration vector is above the cap
      assert.has_error(function() crypto.pbkdf2("sha1", "password", "salt", 16777216, 20) end)
      assert.has_error(function() crypto.pbkdf2("sha1", "p", "s", 0, 20) end)
      assert.has_error(function() crypto.pbkdf2("sha1", "p", "s", -1, 20) end)
      assert.has_error(function() crypto.pbkdf2("sha1", "p", "s", 10000001, 20) end)
      assert.has_error(function() crypto.pbkdf2("sha1", "p", "s", 1, 0) end)
      assert.has_error(function() crypto.pbkdf2("sha1", "p", "s", 1, 1025) end)
      assert.has_error(function() crypto.pbkdf2("sha1", "p", "s", 1.5, 20) end)
      assert.equal(1024, #crypto.pbkdf2("sha256", "p", "s", 1, 1024))
    end)
  end)

  describe("SCRAM building blocks", function()
    -- The full client proof and server signature of the RFC examples,
    -- computed from digest, hmac, pbkdf2, xor and base64.
    local function scram(alg, hashlen, password, salt_b64, iterations, auth_message)
      local salted = crypto.pbkdf2(alg, password, crypto.b64decode(salt_b64), iterations, hashlen)
      local client_key = crypto.hmac(alg, salted, "Client Key")
      local stored_key = crypto.digest(alg, client_key)
      local proof = crypto.xor(client_key, crypto.hmac(alg, stored_key, auth_message))
      local server_key = crypto.hmac(alg, salted, "Server Key")
      return crypto.b64encode(proof), crypto.b64encode(crypto.hmac(alg, server_key, auth_message))
    end

    it("reproduces the RFC 5802 SCRAM-SHA-1 example", function()
      local cnonce = "fyko+d2lbbFgONRv9qkxdawL"
      local nonce = cnonce .. "3rfcNHYJY1ZVvWVs7j"
      local am = "n=user,r=" .. cnonce .. ",r=" .. nonce .. ",s=QSXCR+Q6sek8bf92,i=4096,c=biws,r=" .. nonce
      local proof, sig = scram("sha1", 20, "pencil", "QSXCR+Q6sek8bf92", 4096, am)
      assert.equal("v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=", proof)
      assert.equal("rmF9pqV8S7suAoZWja4dJRkFsKQ=", sig)
    end)

    it("reproduces the RFC 7677 SCRAM-SHA-256 example", function()
      local cnonce = "rOprNGfwEbeRWgbNEkqO"
      local nonce = cnonce .. "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
      local am = "n=user,r=" .. cnonce .. ",r=" .. nonce .. ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=" .. nonce
      local proof, sig = scram("sha256", 32, "pencil", "W22ZaJ0SNY7soEsUEjb6gQ==", 4096, am)
      assert.equal("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=", proof)
      assert.equal("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=", sig)
    end)
  end)

  describe("random", function()
    it("returns n bytes, different each time", function()
      assert.equal(1, #crypto.random(1))
      assert.equal(4096, #crypto.random(4096))
      assert.are_not.equal(crypto.random(16), crypto.random(16))
    end)

    it("raises outside 1..4096", function()
      assert.has_error(function() crypto.random(0) end)
      assert.has_error(function() crypto.random(4097) end)
      assert.has_error(function() crypto.random(-5) end)
      assert.has_error(function() crypto.random("x") end)
    end)
  end)

  describe("equal", function()
    it("compares strings", function()
      assert.is_true(crypto.equal("", ""))
      assert.is_true(crypto.equal("abc", "abc"))
      assert.is_true(crypto.equal("a\0b", "a\0b"))
      assert.is_false(crypto.equal("abc", "abd"))
      assert.is_false(crypto.equal("a\0b", "a\0c"))
      assert.is_false(crypto.equal("abc", "ab"))
      assert.is_false(crypto.equal("", "a"))
      assert.is_false(crypto.equal("xbc", "abc"))
    end)

    it("raises on non-strings", function()
      assert.has_error(function() crypto.equal("a", nil) end)
    end)
  end)

  describe("xor", function()
    it("xors strings of equal length", function()
      assert.equal("\0\0\0", crypto.xor("abc", "abc"))
      assert.equal("\x20\x20", crypto.xor("ab", "AB"))
      assert.equal("", crypto.xor("", ""))
      local a, b = crypto.random(64), crypto.random(64)
      assert.equal(a, crypto.xor(crypto.xor(a, b), b))
    end)

    it("raises on different lengths", function()
      assert.has_error(function() crypto.xor("abc", "ab") end)
    end)
  end)

  describe("base64", function()
    local vectors = { -- RFC 4648 section 10
      { "", "" }, { "f", "Zg==" }, { "fo", "Zm8=" }, { "foo", "Zm9v" },
      { "foob", "Zm9vYg==" }, { "fooba", "Zm9vYmE=" }, { "foobar", "Zm9vYmFy" },
    }

    it("encodes and decodes the RFC 4648 vectors", function()
      for _, v in ipairs(vectors) do
        assert.equal(v[2], crypto.b64encode(v[1]))
        assert.equal(v[1], crypto.b64decode(v[2]))
      end
    end)

    it("round-trips random binary data and matches openssl base64", function()
      H.need("openssl")
      for n = 0, 200 do
        local s = n == 0 and "" or crypto.random(n)
        local e = crypto.b64encode(s)
        assert.is_nil(e:find("[\r\n]"))
        assert.equal(s, crypto.b64decode(e))
      end
      local all = {}
      for i = 0, 255 do all[#all + 1] = string.char(i) end
      all = table.concat(all)
      os.execute("mkdir -p " .. shquote(H.tmp))
      local path = H.tmp .. "/b64-all.bin"
      local f = assert(io.open(path, "wb"))
      f:write(all)
      f:close()
      assert.equal(command_output("openssl base64 -A -in " .. shquote(path)), crypto.b64encode(all))
      os.remove(path)
    end)

    it("rejects anything that is not strict, canonical base64", function()
      local bad = {
        "Zm9v YmFy", "Zm9vYmFy\n", " Zm9v", "Zm9v\r\n", "Zm9v\tYmFy",
        "Zm9=",      -- non-zero bits in the padding
        "Zh==",      -- idem
        "Zm9vY", "Zm9vYm", "Zg", "Zg=", "Z", "===", "=", "====",
        "Zm9v====", "=Zm9", "Zm=v", "Zg==Zg==", "Zm9vYg=", "Z===",
        "Zm9v-_8=", "Zm9v*A==", "Zm9v\0AAA", "Zm9vYmE\xff", "\xc3\xa9AAA",
      }
      for _, s in ipairs(bad) do
        assert.is_nil(crypto.b64decode(s), ("%q"):format(s))
      end
    end)

    it("decodes the empty string to the empty string", function()
      assert.equal("", crypto.b64decode(""))
    end)
  end)

  describe("crypt", function()
    it("matches openssl passwd for SHA512-CRYPT, SHA256-CRYPT and MD5-CRYPT", function()
      H.need("openssl")
      for _, m in ipairs { { "-6", "$6$" }, { "-5", "$5$" }, { "-1", "$1$" } } do
        local expected = command_output("openssl passwd " .. m[1] .. " -salt saltsalt 'pass word'")
        assert.equal(expected, crypto.crypt("pass word", m[2] .. "saltsalt"))
        -- verifying: the whole hash is a valid setting
        assert.equal(expected, crypto.crypt("pass word", expected))
        assert.are_not.equal(expected, crypto.crypt("pass wore", expected))
      end
    end)

    it("makes settings with crypt_gensalt", function()
      for _, prefix in ipairs { "$6$", "$5$", "$2b$", "$2y$", "$y$" } do
        local setting = crypto.crypt_gensalt(prefix)
        assert.equal(prefix, setting:sub(1, #prefix))
        local h = assert(crypto.crypt("secret", setting))
        assert.equal(h, crypto.crypt("secret", h))
        assert.are_not.equal(h, crypto.crypt("secreT", h))
        assert.are_not.equal(setting, crypto.crypt_gensalt(prefix)) -- random salt
      end
      assert.matches("^%$6%$rounds=10000%$", crypto.crypt_gensalt("$6$", 10000))
      assert.matches("^%$2b%$04%$", crypto.crypt_gensalt("$2b$", 4))
    end)

    it("raises on an unsupported prefix or rounds", function()
      assert.has_error(function() crypto.crypt_gensalt("$Q$") end)
      assert.has_error(function() crypto.crypt_gensalt("$2b$", 99) end)
      assert.has_error(function() crypto.crypt_gensalt("$6$", -1) end)
    end)

    it("returns nil, \"invalid\" for bad settings and passwords", function()
      for _, setting in ipairs { "$9$junk", "$6", "", "*", "$2b$99$abcdefghijklmnopqrstuv", "\xff\xfe" } do
        local h, err, detail = crypto.crypt("secret", setting)
        assert.is_nil(h, setting)
        assert.equal("invalid", err)
        assert.is_string(detail)
      end
      local h, err = crypto.crypt("sec\0ret", "$6$saltsalt")
      assert.is_nil(h)
      assert.equal("invalid", err)
      h, err = crypto.crypt(string.rep("x", 600), "$6$saltsalt")
      assert.is_nil(h)
      assert.equal("invalid", err)
    end)
  end)

  describe("CRAM-MD5 context", function()
    it("computes the RFC 2195 example response", function()
      local ctx = crypto.cram_md5_context("tanstaaftanstaaf")
      assert.matches("^%x+$", ctx)
      assert.equal(64, #ctx)
      assert.equal("b913a602c7eda7a495b4e6e7334d3890",
        crypto.cram_md5_response(ctx, "<1896.697170952@postoffice.reston.mci.net>"))
    end)

    it("agrees with HMAC-MD5 for any key length and challenge", function()
      for _, n in ipairs { 0, 1, 16, 63, 64, 65, 200 } do
        local key = n == 0 and "" or crypto.random(n)
        local chal = "<" .. hex(crypto.random(8)) .. "@test>"
        assert.equal(hex(crypto.hmac("md5", key, chal)),
          crypto.cram_md5_response(crypto.cram_md5_context(key), chal))
      end
      local long = string.rep("c", 1000)
      assert.equal(hex(crypto.hmac("md5", "k", long)),
        crypto.cram_md5_response(crypto.cram_md5_context("k"), long))
    end)

    it("accepts upper-case hex and raises on a malformed context", function()
      local ctx = crypto.cram_md5_context("secret")
      assert.equal(crypto.cram_md5_response(ctx, "x"), crypto.cram_md5_response(ctx:upper(), "x"))
      assert.has_error(function() crypto.cram_md5_response(ctx:sub(2), "x") end)
      assert.has_error(function() crypto.cram_md5_response("zz" .. ctx:sub(3), "x") end)
    end)

    it("is the 32-byte context Dovecot stores", function()
      -- cd3b... is `doveadm pw -s CRAM-MD5 -p secret` (outer state first)
      assert.equal("cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56",
        crypto.cram_md5_context("secret"))
      assert.equal(32, #unhex(crypto.cram_md5_context("secret")))
    end)
  end)

  describe("file_signature", function()
    it("changes when a file is rewritten, and fails for a missing file", function()
      local core = require "luasmtp.core"
      os.execute("mkdir -p " .. shquote(H.tmp))
      local path = H.tmp .. "/sig.txt"
      local f = assert(io.open(path, "wb"))
      f:write("one")
      f:close()
      local s1 = assert(core.file_signature(path))
      assert.equal(s1, core.file_signature(path))
      f = assert(io.open(path, "wb"))
      f:write("two!")
      f:close()
      assert.are_not.equal(s1, core.file_signature(path))
      os.remove(path)
      local s, err, detail = core.file_signature(path)
      assert.is_nil(s)
      assert.equal("io", err)
      assert.matches("No such file", detail)
    end)
  end)
end)
