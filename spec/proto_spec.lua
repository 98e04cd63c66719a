--- Protocol codecs (src/proto.c through src/proto_lua.c): commands, DATA
-- decoding and encoding, replies, PROXY headers, xtext, EHLO.
local core = require "luasmtp.core"

-- Reference models, written the simple way, for the streaming codecs.

--- The message the decoder must find in `data` (the bytes after DATA's
-- CRLF): content up to the terminator, and bytes consumed; nil if none.
local function reference_end(data)
  local pos = ("\r\n" .. data):find("\r\n.\r\n", 1, true)
  if not pos then return nil end
  return data:sub(1, pos - 1), pos + 2
end

local function unstuff(content)
  return (("\r\n" .. content):gsub("\r\n%.", "\r\n"):sub(3))
end

--- Bare CR and bare LF made CRLF.
local function normalise(s)
  return (s:gsub("\r\n", "\n"):gsub("\r", "\n"):gsub("\n", "\r\n"))
end

--- Feed `data` to a decoder in pieces cut at `cuts` (sorted positions).
local function feed_split(dec, data, cuts)
  local out, consumed, done, from = {}, 0, false, 1
  local points = {}
  for _, c in ipairs(cuts) do points[#points + 1] = c end
  points[#points + 1] = #data
  for _, to in ipairs(points) do
    if to >= from then
      local piece = data:sub(from, to)
      local o, n, d = dec:feed(piece)
      out[#out + 1] = o
      consumed = consumed + n
      if d then
        done = true
        assert(n <= #piece)
        break
      end
      assert.equal(#piece, n)
      from = to + 1
    end
  end
  return table.concat(out), consumed, done
end

local function random_cuts(n, count)
  local cuts = {}
  for i = 1, count do cuts[i] = math.random(0, n) end
  table.sort(cuts)
  return cuts
end

local function random_string(len, alphabet)
  local t = {}
  for i = 1, len do
    local k = math.random(1, #alphabet)
    t[i] = alphabet:sub(k, k)
  end
  return table.concat(t)
end

describe("command parser", function()
  local parse = core.parse_command

  --- The failure of parse(line, opts): {code, enhanced}; asserts it failed.
  local function refused(line, opts)
    local cmd, code, enhanced, why = parse(line, opts)
    assert.is_nil(cmd, line)
    assert.is_string(why, line)
    return { code, enhanced }
  end

  it("recognises every verb, in any case", function()
    local cases = {
      { "EHLO mx.example.org", "EHLO" }, { "helo host", "HELO" }, { "LhLo lmtp.example", "LHLO" },
      { "MAIL FROM:<>", "MAIL" }, { "rcpt to:<a@b.example>", "RCPT" }, { "DATA", "DATA" },
      { "BDAT 0 LAST", "BDAT" }, { "RSET", "RSET" }, { "NOOP", "NOOP" }, { "noop some text", "NOOP" },
      { "QUIT", "QUIT" }, { "VRFY joe", "VRFY" }, { "EXPN staff", "EXPN" }, { "HELP", "HELP" },
      { "HELP MAIL", "HELP" }, { "STARTTLS", "STARTTLS" }, { "AUTH PLAIN", "AUTH" },
    }
    for _, c in ipairs(cases) do
      local cmd, code, _, why = parse(c[1])
      assert(cmd, c[1] .. ": " .. tostring(code) .. " " .. tostring(why))
      assert.equal(c[2], cmd.verb, c[1])
    end
  end)

  it("reports unknown verbs with the word and argument", function()
    local cmd = assert(parse("XYZZY plugh"))
    assert.same({ "UNKNOWN", "XYZZY", "plugh" }, { cmd.verb, cmd.word, cmd.arg })
    assert.equal("UNKNOWN", parse("MAILFROM:<a@b>").verb)
    assert.equal("UNKNOWN", parse("GET / HTTP/1.1").verb)
  end)

  it("refuses lines with control characters, NUL, leading spaces, or too long", function()
    local bad = {
      "", " MAIL FROM:<>", "NOOP\0", "MAIL FROM:<a@b>\r", "MAIL FROM:<a@b>\n", "MAIL\tFROM:<>",
      "RCPT TO:<a\0@b>", "QUIT\127", "\0", ("NOOP " .. ("x"):rep(16380)),
    }
    for _, line in ipairs(bad) do
      local cmd, code, enhanced = parse(line)
      assert.is_nil(cmd, line)
      assert.same({ 500, "5.5.2" }, { code, enhanced }, line)
    end
  end)

  it("refuses arguments where none are allowed and requires them elsewhere", function()
    for _, line in ipairs { "DATA x", "RSET ", "QUIT now", "STARTTLS x", "DATA ", "VRFY", "VRFY ",
      "EXPN", "EHLO", "EHLO ", "HELO", "MAIL", "RCPT", "BDAT", "AUTH", "MAIL TO:<a@b>",
      "RCPT FROM:<a@b>", "MAIL  FROM:<a@b>", "MAIL FROM <a@b>" } do
      local cmd, code, enhanced = parse(line)
      assert.is_nil(cmd, line)
      assert.equal(501, code, line)
      assert.equal("5.5.4", enhanced, line)
    end
  end)

  describe("MAIL and RCPT paths", function()
    it("parses valid paths", function()
      local cases = {
        { "MAIL FROM:<user@example.org>", { path = "user@example.org", local_part = "user",
          domain = "example.org", utf8 = false } },
        { "MAIL FROM:<>", { path = "", null = true } },
        { "MAIL FROM: <a@b.example>", { path = "a@b.example" } },   -- accepted space variant
        { "MAIL FROM:   <a@b.example>", { path = "a@b.example" } },
        { "RCPT TO:<Postmaster>", { path = "Postmaster", postmaster = true } },
        { "RCPT TO:<postmaster@example.org>", { path = "postmaster@example.org" } },
        { "RCPT TO:<@relay1.example,@relay2.example:joe@c.example>",
          { path = "joe@c.example", route = true } },
        { 'RCPT TO:<"john doe"@example.org>', { path = '"john doe"@example.org', quoted = true,
          local_part = '"john doe"' } },
        { 'RCPT TO:<"a\\"b\\\\c"@example.org>', { path = '"a\\"b\\\\c"@example.org' } },
        { "RCPT TO:<a@[192.0.2.1]>", { domain = "[192.0.2.1]", literal = true } },
        { "RCPT TO:<a@[IPv6:2001:db8::1]>", { domain = "[IPv6:2001:db8::1]", literal = true } },
        { "RCPT TO:<a@[IPv6:::ffff:192.0.2.1]>", { literal = true } },
        { "RCPT TO:<first.last+tag@sub.example-host.org>", { local_part = "first.last+tag" } },
        { "RCPT TO:<!#$%&'*+-/=?^_`{|}~@x.example>", { local_part = "!#$%&'*+-/=?^_`{|}~" } },
        { "RCPT TO:<a@xn--bcher-kva.example>", { domain = "xn--bcher-kva.example" } },
        { "mail from:<A@B.EXAMPLE>", { path = "A@B.EXAMPLE" } },
        { "RCPT TO:<a@localhost>", { domain = "localhost" } },
        { "RCPT TO:<a@123.example>", { domain = "123.example" } },
      }
      for _, c in ipairs(cases) do
        local cmd, code, _, why = parse(c[1])
        assert(cmd, c[1] .. ": " .. tostring(code) .. " " .. tostring(why))
        for k, v in pairs(c[2]) do assert.equal(v, cmd[k], c[1] .. " " .. k) end
      end
    end)

    it("refuses malformed paths with 501 5.1.7 (MAIL) or 5.1.3 (RCPT)", function()
      local bad = {
        "FROM:a@b.example", "FROM:<a@b.example", "FROM:a@b.example>", "FROM:<<a@b.example>",
        "FROM:<a@b.example>>", "FROM:<a@>", "FROM:<@b.example>", "FROM:<a>", "FROM:<a@b..example>",
        "FROM:<a@.b.example>", "FROM:<a@b.example.>", "FROM:<a@-b.example>", "FROM:<a@b-.example>",
        "FROM:<a@b_c.example>", "FROM:<a..b@c.example>", "FROM:<.a@c.example>", "FROM:<a.@c.example>",
        'FROM:<"unterminated@c.example>', "FROM:<a b@c.example>", "FROM:<a@b c.example>",
        "FROM:<a@[1.2.3]>", "FROM:<a@[1.2.3.256]>", "FROM:<a@[1.2.3.4.5]>", "FROM:<a@[IPv6:zz::1]>",
        "FROM:<a@[tag:stuff]>", "FROM:<a@[1.2.3.4>", "FROM:<a@1.2.3.4]>", "FROM:<a@[[1.2.3.4]]>",
        "FROM:<@a.example:b@c.example", "FROM:<@a.example,b@c.example>", "FROM:<@:b@c.example>",
        "FROM:<a@b@c.example>", "FROM:<a(comment)@c.example>", "FROM:<a@c.example> ",
        "FROM:<", "FROM:<>x", "FROM:<a@\255.example>", 'FROM:<"a\\"@c.example>',
      }
      for _, arg in ipairs(bad) do
        local cmd, code, enhanced, why = parse("MAIL " .. arg)
        assert.is_nil(cmd, arg)
        assert.equal(501, code, arg)
        assert.is_string(why)
        assert.truthy(enhanced == "5.1.7" or enhanced == "5.5.4", arg .. " " .. tostring(enhanced))
        local rcmd, rcode, renhanced = parse("RCPT " .. arg:gsub("^FROM:", "TO:"))
        assert.is_nil(rcmd, arg)
        assert.equal(501, rcode, arg)
        assert.truthy(renhanced == "5.1.3" or renhanced == "5.5.4", arg)
      end
      assert.same({ 501, "5.1.3" }, refused("RCPT TO:<>"))
      assert.same({ 501, "5.1.3" }, refused('RCPT TO:<"Postmaster">'))
      assert.same({ 501, "5.1.7" }, refused("MAIL FROM:<Postmaster>"))
    end)

    it("refuses spaces after the colon in strict mode", function()
      assert.is_nil(parse("MAIL FROM: <a@b.example>", { strict_space = true }))
      assert.truthy(parse("MAIL FROM:<a@b.example>", { strict_space = true }))
    end)

    it("enforces the length limits on local part, labels, domain and path", function()
      local function mail(addr) return parse("MAIL FROM:<" .. addr .. ">") end
      assert.truthy(mail(("l"):rep(64) .. "@x.example"))
      assert.is_nil(mail(("l"):rep(65) .. "@x.example"))
      assert.truthy(mail("a@" .. ("d"):rep(63) .. ".example"))
      assert.is_nil(mail("a@" .. ("d"):rep(64) .. ".example"))
      local d255 = ("x"):rep(63) .. "." .. ("y"):rep(63) .. "." .. ("z"):rep(63) .. "." .. ("w"):rep(63)
      assert.equal(255, #d255)
      -- path: "<" + local + "@" + domain + ">" <= 256
      local d191 = d255:sub(1, 191)
      assert.truthy(mail(("a"):rep(62) .. "@" .. d191))
      assert.same({ 501, "5.1.7" }, refused("MAIL FROM:<" .. ("a"):rep(63) .. "@" .. d191 .. ">"))
      local _, code, _, why = mail("a@" .. d255)
      assert.equal(501, code)
      assert.equal("path too long", why)
      assert.is_nil(mail("a@" .. d255 .. "x"))
    end)

    it("accepts UTF-8 addresses only with SMTPUTF8", function()
      local cmd, code, enhanced, why = parse("MAIL FROM:<jürgen@bücher.example>")
      assert.same({ nil, 553, "5.6.7" }, { cmd, code, enhanced })
      assert.matches("SMTPUTF8", why)
      cmd = assert(parse("MAIL FROM:<jürgen@bücher.example> SMTPUTF8"))
      assert.is_true(cmd.utf8)
      assert.is_true(cmd.smtputf8)
      assert.same({ 553, "5.6.7" }, refused("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>"))
      cmd = assert(parse("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>", { utf8 = true }))
      assert.equal("δοκιμή", cmd.local_part)
      assert.is_true(cmd.utf8)
      assert.is_false(assert(parse("RCPT TO:<a@b.example>")).utf8)
      cmd = assert(parse('RCPT TO:<"ü x"@b.example>', { utf8 = true }))
      assert.is_true(cmd.quoted)
      -- malformed UTF-8 is refused even when allowed
      for _, bad in ipairs { "\192\175", "\237\160\128", "\244\144\128\128", "\255", "\195", "\128" } do
        assert.is_nil(parse("RCPT TO:<a" .. bad .. "@b.example>", { utf8 = true }), bad)
        assert.is_nil(parse("RCPT TO:<a@b" .. bad .. ".example>", { utf8 = true }), bad)
      end
      -- a non-ASCII parameter value needs SMTPUTF8 too
      assert.same({ 553, "5.6.7" }, refused("MAIL FROM:<a@b.example> X-NOTE=é"))
      assert.truthy(parse("MAIL FROM:<a@b.example> X-NOTE=é SMTPUTF8"))
      -- MAIL starts the transaction: only its own parameter counts
      assert.same({ 553, "5.6.7" }, refused("MAIL FROM:<ü@b.example>", { utf8 = true }))
      assert.same({ 553, "5.6.7" }, refused("RCPT TO:<a@b.example> X=é"))
      assert.truthy(parse("RCPT TO:<a@b.example> X=é", { utf8 = true }))
    end)
  end)

  describe("ESMTP parameters", function()
    it("decodes the known MAIL parameters", function()
      local cmd = assert(parse("MAIL FROM:<a@b.example> SIZE=1048576 BODY=8BITMIME SMTPUTF8 RET=HDRS "
        .. "ENVID=QQ314159+2Bx AUTH=joe+2Bx@b.example REQUIRETLS"))
      assert.equal(1048576, cmd.size)
      assert.equal("8BITMIME", cmd.body)
      assert.is_true(cmd.smtputf8)
      assert.equal("HDRS", cmd.ret)
      assert.equal("QQ314159+x", cmd.envid)
      assert.equal("joe+x@b.example", cmd.auth)
      assert.is_true(cmd.requiretls)
      assert.is_nil(cmd.unknown)
      assert.equal(7, #cmd.params)
      assert.same({ name = "SIZE", value = "1048576", known = true }, cmd.params[1])
      assert.same({ name = "SMTPUTF8", known = true }, cmd.params[3])
      assert.equal("<>", parse("MAIL FROM:<> AUTH=<>").auth)
      assert.equal("7BIT", parse("MAIL FROM:<> body=7bit").body)
      assert.equal("BINARYMIME", parse("MAIL FROM:<> BODY=BINARYMIME").body)
      assert.equal("FULL", parse("MAIL FROM:<> RET=full").ret)
      assert.equal(math.maxinteger, parse("MAIL FROM:<> SIZE=99999999999999999999").size)
    end)

    it("decodes the known RCPT parameters", function()
      local cmd = assert(parse("RCPT TO:<a@b.example> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;a+2Bb@b.example"))
      assert.same({ success = true, failure = true, delay = true }, cmd.notify)
      assert.same({ type = "rfc822", addr = "a+b@b.example" }, cmd.orcpt)
      assert.same({ never = true }, parse("RCPT TO:<a@b.example> NOTIFY=never").notify)
      assert.same({ delay = true }, parse("RCPT TO:<a@b.example> NOTIFY=DELAY").notify)
    end)

    it("flags unknown parameters, and parameters of the other command, for 555", function()
      local cmd = assert(parse("MAIL FROM:<a@b.example> X-FOO=bar NOTIFY=NEVER XYZ"))
      assert.same({ "X-FOO", "NOTIFY", "XYZ" }, cmd.unknown)
      assert.is_false(cmd.params[1].known)
      cmd = assert(parse("RCPT TO:<a@b.example> SIZE=10 BODY=8BITMIME"))
      assert.same({ "SIZE", "BODY" }, cmd.unknown)
      assert.is_nil(cmd.size)
    end)

    it("takes a keyword repeated with the same value, or a repeated flag, as one", function()
      -- what Python's smtplib sends for send_message(msg, mail_options = {"SMTPUTF8"})
      local cmd = assert(parse("MAIL FROM:<a@b.example> SMTPUTF8 SMTPUTF8 BODY=8BITMIME"))
      assert.is_true(cmd.smtputf8)
      assert.same({ { name = "SMTPUTF8", known = true }, { name = "BODY", value = "8BITMIME", known = true } },
        cmd.params)
      cmd = assert(parse("MAIL FROM:<> SIZE=10 BODY=7BIT size=10 body=7bit RET=HDRS RET=hdrs ENVID=x+2B ENVID=x+2B"))
      assert.equal(4, #cmd.params)
      assert.equal(10, cmd.size)
      assert.equal("x+", cmd.envid)
      cmd = assert(parse("RCPT TO:<a@b.example> NOTIFY=SUCCESS notify=success ORCPT=rfc822;a@b ORCPT=rfc822;a@b"))
      assert.equal(2, #cmd.params)
      assert.same({ success = true }, cmd.notify)
      cmd = assert(parse("MAIL FROM:<> X-A=1 XYZ X-A=1 xyz"))
      assert.same({ "X-A", "XYZ" }, cmd.unknown)
      -- repeats take no slot of the parameter limit
      assert.equal(2, #assert(parse("MAIL FROM:<> A=1 B=2 A=1 B=2 A=1", { max_params = 2 })).params)
    end)

    it("refuses a keyword repeated with another value", function()
      for _, line in ipairs {
        "MAIL FROM:<> SIZE=1 SIZE=2", "MAIL FROM:<> BODY=7BIT BODY=8BITMIME", "MAIL FROM:<> X-A=1 X-A",
        "MAIL FROM:<> XYZ XYZ=1", "MAIL FROM:<> ENVID=a ENVID=A", "MAIL FROM:<> X-A=v x-a=V",
        "RCPT TO:<a@b.example> NOTIFY=NEVER NOTIFY=SUCCESS",
      } do
        local cmd, code, enhanced, why = parse(line)
        assert.is_nil(cmd, line)
        assert.same({ 501, "5.5.4", "duplicate parameter with a different value" }, { code, enhanced, why }, line)
      end
    end)

    it("refuses invalid, conflicting, empty and excess parameters with 501 5.5.4", function()
      local bad = {
        "MAIL FROM:<> SIZE", "MAIL FROM:<> SIZE=", "MAIL FROM:<> SIZE=12a", "MAIL FROM:<> SIZE=-1",
        "MAIL FROM:<> SIZE=" .. ("9"):rep(21), "MAIL FROM:<> BODY=9BIT", "MAIL FROM:<> BODY",
        "MAIL FROM:<> SMTPUTF8=yes", "MAIL FROM:<> REQUIRETLS=1", "MAIL FROM:<> RET=ALL",
        "MAIL FROM:<> ENVID=" .. ("x"):rep(101), "MAIL FROM:<> ENVID=a+zz", "MAIL FROM:<> ENVID=a+2",
        "MAIL FROM:<> AUTH=", "MAIL FROM:<> AUTH=a+", "MAIL FROM:<> SIZE=1 SIZE=2",
        "MAIL FROM:<> size=1 SIZE=2", "MAIL FROM:<> X-A=1 x-a=2", "MAIL FROM:<>  SIZE=1",
        "MAIL FROM:<> SIZE=1 ", "MAIL FROM:<> =1", "MAIL FROM:<> -X=1", "MAIL FROM:<> A=b=c",
        "MAIL FROM:<> A_B=1", "MAIL FROM:<> " .. ("K"):rep(65) .. "=1",
        "MAIL FROM:<> X=" .. ("v"):rep(1601),
        "RCPT TO:<a@b.example> NOTIFY=NEVER,SUCCESS", "RCPT TO:<a@b.example> NOTIFY=",
        "RCPT TO:<a@b.example> NOTIFY=SUCCESS,SUCCESS", "RCPT TO:<a@b.example> NOTIFY=SUCCESS,",
        "RCPT TO:<a@b.example> NOTIFY=LATER", "RCPT TO:<a@b.example> ORCPT=rfc822",
        "RCPT TO:<a@b.example> ORCPT=;a@b", "RCPT TO:<a@b.example> ORCPT=rfc822;",
        "RCPT TO:<a@b.example> ORCPT=rfc822;a+g0", "RCPT TO:<a@b.example> ORCPT=rf(c;a",
        "RCPT TO:<a@b.example> ORCPT=rfc822;" .. ("a"):rep(501),
      }
      for _, line in ipairs(bad) do
        local cmd, code, enhanced, why = parse(line)
        assert.is_nil(cmd, line)
        assert.same({ 501, "5.5.4" }, { code, enhanced }, line)
        assert.is_string(why)
      end
    end)

    it("caps the number of parameters, even with 10,000 of them", function()
      local sixteen = {}
      for i = 1, 16 do sixteen[i] = "X" .. i .. "=1" end
      assert.equal(16, #assert(parse("MAIL FROM:<> " .. table.concat(sixteen, " "))).params)
      local many = {}
      for i = 1, 10000 do many[i] = "P" .. i .. "=v" end
      local line = "MAIL FROM:<> " .. table.concat(many, " ")
      local cmd, code, _, why = parse(line:sub(1, 16384))
      assert.is_nil(cmd)
      assert.equal(501, code)
      assert.equal("too many parameters", why)
      assert.same({ 500, "5.5.2" }, refused(line)) -- longer than any command
      assert.is_nil(parse("MAIL FROM:<> A=1 B=2 C=3", { max_params = 2 }))
    end)

    it("takes ENVID and ORCPT at their maximum sizes", function()
      local cmd = assert(parse("MAIL FROM:<> ENVID=" .. ("e"):rep(100)))
      assert.equal(100, #cmd.envid)
      cmd = assert(parse("RCPT TO:<a@b.example> ORCPT=rfc822;" .. ("+41"):rep(500)))
      assert.equal(("A"):rep(500), cmd.orcpt.addr)
    end)
  end)

  describe("EHLO, BDAT and AUTH arguments", function()
    it("validates the EHLO/HELO domain or address literal", function()
      for _, good in ipairs { "mx.example.org", "localhost", "[192.0.2.1]", "[IPv6:2001:db8::1]", "a-b.c" } do
        local cmd = assert(parse("EHLO " .. good), good)
        assert.equal(good, cmd.domain)
        assert.equal(good:sub(1, 1) == "[", cmd.literal)
      end
      for _, bad in ipairs { "a..b", "-a.b", "a_b.example", "[1.2.3.256]", "[IPv6:zz]", "a b", "[foo:bar]",
        "mx.example.", ".mx", "[192.0.2.1", "ü.example", ("a"):rep(64) .. ".b" } do
        local cmd, code = parse("EHLO " .. bad)
        assert.is_nil(cmd, bad)
        assert.equal(501, code, bad)
      end
      assert.truthy(parse("EHLO ü.example", { utf8 = true }))
      assert.same({ true, true }, { core.check_domain("[10.0.0.1]") })
      assert.same({ false }, { core.check_domain("bad_name") })
    end)

    it("parses BDAT sizes up to 2^53-1 and LAST", function()
      local cmd = assert(parse("BDAT 1000"))
      assert.same({ 1000, false }, { cmd.chunk_size, cmd.last })
      assert.same({ 0, true }, { parse("bdat 0 last").chunk_size, parse("bdat 0 last").last })
      assert.equal(9007199254740991, parse("BDAT 9007199254740991").chunk_size)
      assert.equal(5, parse("BDAT 0000000000000000005").chunk_size)
      for _, bad in ipairs { "BDAT 9007199254740992", "BDAT " .. ("1"):rep(30), "BDAT x", "BDAT -1",
        "BDAT 10 FIRST", "BDAT 10  LAST", "BDAT 10 LAST ", "BDAT  10", "BDAT 1e3", "BDAT 000000000000000000001" } do
        assert.same({ 501, "5.5.4" }, refused(bad))
      end
    end)

    it("parses AUTH mechanism and initial response", function()
      local cmd = assert(parse("AUTH plain AGpvZQBzZWNyZXQ="))
      assert.same({ "PLAIN", "AGpvZQBzZWNyZXQ=" }, { cmd.mechanism, cmd.initial })
      assert.equal("=", parse("AUTH EXTERNAL =").initial)
      assert.equal("SCRAM-SHA-256", parse("AUTH SCRAM-SHA-256").mechanism)
      assert.is_nil(parse("AUTH LOGIN").initial)
      for _, bad in ipairs { "AUTH PLAIN ", "AUTH PLAIN a*b", "AUTH PLAIN a b", "AUTH " .. ("X"):rep(21),
        "AUTH PL@IN", "AUTH  PLAIN" } do
        assert.same({ 501, "5.5.4" }, refused(bad))
      end
    end)
  end)
end)

describe("DATA decoder", function()
  local function decode(data, opts)
    local dec = core.data_decoder(opts)
    local out, consumed, done = dec:feed(data)
    return out, consumed, done, dec:result()
  end

  it("finds the end, un-stuffs dots and leaves the pipelined rest", function()
    local data = "Subject: x\r\n\r\n..leading dot\r\n...two\r\n.\r\nQUIT\r\n"
    local out, consumed, done, r = decode(data)
    assert.equal("Subject: x\r\n\r\n.leading dot\r\n..two\r\n", out)
    assert.is_true(done)
    assert.equal("QUIT\r\n", data:sub(consumed + 1))
    assert.same({ size = #out, too_big = false, bare_lf = false, bare_cr = false, long_line = false,
      rejected = false, done = true }, r)
  end)

  it("ends at once on an empty message", function()
    local out, consumed, done = decode(".\r\nMAIL FROM:<>\r\n")
    assert.same({ "", 3, true }, { out, consumed, done })
    out, consumed, done = decode("\r\n.\r\n")
    assert.same({ "\r\n", 5, true }, { out, consumed, done })
  end)

  it("never ends on a smuggling sequence, and rejects it in strict mode", function()
    local seqs = { "\n.\n", "\r.\r", "\r\n.\n", "\n.\r\n", "\n.\r", "\r.\n", "\r\n.\r", "\r\n.\r\r\n",
      "\n..\n", "\r\r\n.\n" }
    for _, seq in ipairs(seqs) do
      local data = "a" .. seq .. "MAIL FROM:<evil@x>\r\n\r\n.\r\nNEXT"
      local out, consumed, done, r = decode(data)
      assert.is_true(done, ("%q"):format(seq))
      assert.equal("NEXT", data:sub(consumed + 1), ("%q"):format(seq))
      assert.is_true(r.rejected, ("%q"):format(seq))
      assert.is_true(r.bare_lf or r.bare_cr)
      local content = reference_end(data)
      assert.equal(unstuff(content), out)
      -- normalise mode: same end, bare line ends written as CRLF
      out, consumed, done, r = decode(data, { bare = "normalise" })
      assert.is_true(done)
      assert.equal("NEXT", data:sub(consumed + 1))
      assert.is_false(r.rejected)
      assert.equal(normalise(unstuff(content)), out)
      assert.is_nil(out:find("[^\r]\n"), ("%q"):format(seq))
    end
  end)

  it("flags bare LF and bare CR separately", function()
    local _, _, _, r = decode("a\nb\r\n.\r\n")
    assert.same({ true, false }, { r.bare_lf, r.bare_cr })
    _, _, _, r = decode("a\rb\r\n.\r\n")
    assert.same({ false, true }, { r.bare_lf, r.bare_cr })
    assert.equal("a\r\nb\r\n", (decode("a\rb\r\n.\r\n", { bare = "normalize" })))
    assert.equal("a\r\r\n", (decode("a\r\r\n.\r\n")))
    assert.equal("a\r\n\r\n", (decode("a\r\r\n.\r\n", { bare = "normalise" })))
  end)

  it("finds the same end and output for every split into two chunks", function()
    local data = "x\r\n..y\r\n.\r.\n\r\n.z\r\n\r\n.\r\nRSET\r\n"
    local content, consumed = reference_end(data)
    for cut = 0, #data do
      local dec = core.data_decoder()
      local out, n, done = feed_split(dec, data, { cut })
      assert.is_true(done, "cut " .. cut)
      assert.equal(consumed, n, "cut " .. cut)
      assert.equal(unstuff(content), out, "cut " .. cut)
    end
  end)

  it("matches the reference model on random input in random chunks", function()
    math.randomseed(20240229)
    for round = 1, 3000 do
      local data = random_string(math.random(0, 40), "\r\n.\r\n.a\r\nb")
      local mode = round % 2 == 0 and "normalise" or "reject"
      local dec = core.data_decoder { bare = mode }
      local out, n, done = feed_split(dec, data, random_cuts(#data, math.random(0, 6)))
      local content, consumed = reference_end(data)
      if content then
        assert.is_true(done, ("%q"):format(data))
        assert.equal(consumed, n, ("%q"):format(data))
        local expect = unstuff(content)
        if mode == "normalise" then expect = normalise(expect) end
        assert.equal(expect, out, ("%q"):format(data))
      else
        assert.is_false(done, ("%q"):format(data))
        assert.equal(#data, n)
      end
    end
  end)

  it("enforces the size limit while streaming and still finds the end", function()
    local dec = core.data_decoder { max_size = 100 }
    local line = ("x"):rep(48) .. "\r\n" -- 50 bytes
    local total = {}
    for _ = 1, 10 do
      local out, n, done = dec:feed(line)
      assert.equal(50, n)
      assert.is_false(done)
      total[#total + 1] = out
    end
    assert.equal(100, #table.concat(total))
    local out, n, done = dec:feed(".\r\nQUIT\r\n")
    assert.same({ "", 3, true }, { out, n, done })
    local r = dec:result()
    assert.is_true(r.too_big)
    assert.equal(500, r.size)
    -- exactly at the limit is fine
    local _, _, _, r2 = decode(("y"):rep(98) .. "\r\n.\r\n", { max_size = 100 })
    assert.is_false(r2.too_big)
    _, _, _, r2 = decode(("y"):rep(99) .. "\r\n.\r\n", { max_size = 100 })
    assert.is_true(r2.too_big)
  end)

  it("flags lines longer than max_line", function()
    local _, _, _, r = decode(("a"):rep(998) .. "\r\n.\r\n")
    assert.is_false(r.long_line)
    _, _, _, r = decode(("a"):rep(999) .. "\r\n.\r\n")
    assert.is_true(r.long_line)
    _, _, _, r = decode("." .. ("a"):rep(998) .. "\r\n.\r\n") -- the stuffing dot does not count
    assert.is_false(r.long_line)
    _, _, _, r = decode(("a"):rep(20) .. "\r\n.\r\n", { max_line = 10 })
    assert.is_true(r.long_line)
    _, _, _, r = decode(("a"):rep(5000) .. "\r\n.\r\n", { max_line = 0 })
    assert.is_false(r.long_line)
  end)

  it("consumes nothing after the end, resets, and closes", function()
    local dec = core.data_decoder()
    assert.same({ "", 3, true }, { dec:feed(".\r\nabc") })
    assert.same({ "", 0, true }, { dec:feed("more") })
    assert.equal(dec, dec:reset())
    assert.same({ "m\r\n", 6, true }, { dec:feed("m\r\n.\r\n") })
    do
      local closing <close> = core.data_decoder()
      assert.truthy(closing:feed("a"))
    end
    assert.is_true(dec:close())
    assert.is_true(dec:close())
    assert.same({ nil, "closed" }, { dec:feed("x") })
    assert.same({ nil, "closed" }, { dec:result() })
    assert.has_error(function() core.data_decoder { bare = "sometimes" } end)
    assert.has_error(function() core.data_decoder { max_size = -1 } end)
  end)
end)

describe("DATA encoder", function()
  local function encode(chunks)
    local enc = core.data_encoder()
    local out = {}
    for _, c in ipairs(chunks) do out[#out + 1] = enc:feed(c) end
    out[#out + 1] = enc:finish()
    return table.concat(out)
  end

  it("dot-stuffs, normalises line ends and terminates", function()
    assert.equal(".\r\n", encode {})
    assert.equal(".\r\n", encode { "" })
    assert.equal("a\r\n.\r\n", encode { "a" })
    assert.equal("a\r\n.\r\n", encode { "a\r\n" })
    assert.equal("..a\r\nb\r\n..\r\n.\r\n", encode { ".a\nb\r." })
    assert.equal("a\r\nb\r\n\r\n.\r\n", encode { "a\rb\n\r" })
    assert.equal("a\r\n..\r\n.\r\n", encode { "a\r", "\n.", "\r", "\n" })
    assert.equal("\r\n..x\r\n.\r\n", encode { "\n.x" })
  end)

  it("round-trips through the decoder for random input and random chunking", function()
    math.randomseed(7)
    for _ = 1, 2000 do
      local msg = random_string(math.random(0, 60), "\r\n.ab\r\n.")
      local pieces, from = {}, 1
      for _, cut in ipairs(random_cuts(#msg, math.random(0, 5))) do
        pieces[#pieces + 1] = msg:sub(from, cut)
        from = cut + 1
      end
      pieces[#pieces + 1] = msg:sub(from)
      local wire = encode(pieces)
      local dec = core.data_decoder()
      local out, n, done = feed_split(dec, wire .. "NEXT", random_cuts(#wire + 4, math.random(0, 5)))
      assert.is_true(done, ("%q"):format(msg))
      assert.equal(#wire, n)
      local expect = normalise(msg)
      if #expect > 0 and expect:sub(-2) ~= "\r\n" then expect = expect .. "\r\n" end
      assert.equal(expect, out, ("%q"):format(msg))
      assert.is_false(dec:result().rejected)
    end
  end)

  it("is reusable after finish and closes", function()
    local enc = core.data_encoder()
    assert.equal("a", enc:feed("a"))
    assert.equal("\r\n.\r\n", enc:finish())
    assert.equal("..b", enc:feed(".b"))
    assert.equal(enc, enc:reset())
    assert.equal("..c", enc:feed(".c"))
    assert.is_true(enc:close())
    assert.same({ nil, "closed" }, { enc:feed("x") })
    assert.same({ nil, "closed" }, { enc:finish() })
  end)
end)

describe("replies", function()
  it("parses reply lines", function()
    local cases = {
      { "250 OK", { code = 250, text = "OK", last = true } },
      { "250-mx.example", { code = 250, text = "mx.example", last = false } },
      { "250", { code = 250, text = "", last = true } },
      { "250 ", { code = 250, text = "", last = true } },
      { "250-", { code = 250, text = "", last = false } },
      { "250 2.1.0 Sender ok", { code = 250, enhanced = "2.1.0", text = "Sender ok", last = true } },
      { "550-5.7.1 no", { code = 550, enhanced = "5.7.1", text = "no", last = false } },
      { "451 4.3.0", { code = 451, enhanced = "4.3.0", text = "", last = true } },
      { "250 5.1.0 wrong class", { code = 250, text = "5.1.0 wrong class", last = true } },
      { "250 2.1.0x", { code = 250, text = "2.1.0x", last = true } },
      { "250 2.1000.0 x", { code = 250, text = "2.1000.0 x", last = true } },
      { "554 5.7.999 x", { code = 554, enhanced = "5.7.999", text = "x", last = true } },
      { "220 h\tê", { code = 220, text = "h\tê", last = true } },
    }
    for _, c in ipairs(cases) do
      assert.same(c[2], core.parse_reply_line(c[1]), c[1])
    end
    for _, bad in ipairs { "", "25", "2500 x", "250x", "abc def", "150 x", "650 x", "260 x", "25a x",
      "250 a\0b", "250 a\rb", "250 a\nb", "250 \27[31m", " 250 x" } do
      local r, why = core.parse_reply_line(bad)
      assert.is_nil(r, bad)
      assert.is_string(why)
    end
  end)

  it("accumulates multi-line replies", function()
    local p = core.reply_parser()
    assert.is_nil(p:feed("250-mx.example greets you"))
    assert.is_nil(p:feed("250-SIZE 1000"))
    local r = assert(p:feed("250 2.0.0 HELP"))
    assert.same({ code = 250, enhanced = "2.0.0", lines = { "mx.example greets you", "SIZE 1000", "HELP" },
      text = "mx.example greets you\nSIZE 1000\nHELP", permanent = false, transient = false }, r)
    r = assert(p:feed("452 4.5.3 too many recipients"))
    assert.same({ 452, "4.5.3", true, false }, { r.code, r.enhanced, r.transient, r.permanent })
    assert.same({ "too many recipients" }, r.lines)
    r = assert(p:feed("554 no"))
    assert.is_nil(r.enhanced)
    assert.is_true(r.permanent)
  end)

  it("refuses inconsistent, malformed and oversized replies", function()
    local p = core.reply_parser { max_lines = 3, max_line = 20 }
    assert.is_nil(p:feed("250-a"))
    local r, why = p:feed("251 b")
    assert.is_nil(r)
    assert.matches("code", why)
    assert.truthy(p:feed("250 fine"))
    assert.is_nil(p:feed("250-a"))
    r, why = p:feed("250-" .. ("x"):rep(20))
    assert.is_nil(r)
    assert.matches("too long", why)
    assert.is_nil(p:feed("250-a"))
    assert.is_nil(p:feed("250-b"))
    r, why = p:feed("250-c")
    assert.is_nil(r)
    assert.matches("too many", why)
    r, why = p:feed("hello")
    assert.is_nil(r)
    assert.is_string(why)
    assert.equal(p, p:reset())
    assert.is_true(p:close())
    assert.same({ nil, "closed" }, { p:feed("250 x") })
  end)

  it("formats replies without letting text inject protocol", function()
    local f = core.format_reply
    assert.equal("250 2.0.0 ok\r\n", f(250, "2.0.0", "ok"))
    assert.equal("250 ok\r\n", f(250, nil, "ok"))
    assert.equal("250 ok\r\n", f(250, false, "ok"))
    assert.equal("221\r\n", f(221))
    assert.equal("221 2.0.0\r\n", f(221, "2.0.0", ""))
    assert.equal("250-a\r\n250-b\r\n250 c\r\n", f(250, "", "a\r\nb\nc\r\n"))
    assert.equal("250-a\r\n250-\r\n250 b\r\n", f(250, nil, "a\r\rb"))
    assert.equal("250-a\r\n250\r\n", f(250, nil, "a\n\n"))
    assert.equal("550-5.7.1 no\r\n550-5.7.1\r\n550 5.7.1 way\r\n", f(550, "5.7.1", "no\n\nway"))
    -- a hook's text trying to smuggle a reply or a command
    local out = f(550, "5.7.1", "denied\r\n250 2.0.0 ok\r\nDATA")
    assert.equal("550-5.7.1 denied\r\n550-5.7.1 250 2.0.0 ok\r\n550 5.7.1 DATA\r\n", out)
    assert.equal("250 abc\tz\r\n", f(250, nil, "a\0b\27c\t\127z"))
    -- every line starts with the code and ends with CRLF, at most 512 octets
    local long = f(250, "2.0.0", ("w"):rep(2000) .. "\n" .. ("é"):rep(600))
    local n = 0
    for line in long:gmatch("(.-)\r\n") do
      n = n + 1
      assert.matches("^250[- ]2%.0%.0 ", line)
      assert.is_true(#line + 2 <= 512)
      assert.is_nil(line:find("[\r\n]"))
    end
    assert.is_true(n >= 7)
    assert.equal(#long, #long:gsub("\r\n", "\r\n"))
    for line in f(250, nil, ("é"):rep(600)):gmatch("(.-)\r\n") do
      assert.truthy(utf8.len(line:sub(5)), "a UTF-8 sequence was cut")
    end
    assert.has_error(function() f(199, nil, "x") end)
    assert.has_error(function() f(600, nil, "x") end)
    assert.has_error(function() f(260, nil, "x") end)
    assert.has_error(function() f(250, "5.0.0", "x") end)
    assert.has_error(function() f(250, "2.0", "x") end)
    assert.has_error(function() f(250, "2.0.0 ", "x") end)
    assert.has_error(function() f(250, "2.0.0\r\n", "x") end)
  end)
end)

describe("PROXY protocol", function()
  local function v2(cmd, fam, payload)
    return "\r\n\r\n\0\r\nQUIT\n" .. string.char(0x20 | cmd, fam) .. string.pack(">I2", #payload) .. payload
  end
  local v4payload = string.pack(">BBBBBBBBI2I2", 192, 0, 2, 1, 198, 51, 100, 7, 40000, 25)
  local v6payload = ("\32\1\13\184" .. ("\0"):rep(11) .. "\1") .. ("\32\1\13\184" .. ("\0"):rep(11) .. "\2")
    .. string.pack(">I2I2", 1234, 587)

  it("parses v1 headers", function()
    local info, consumed = core.parse_proxy("PROXY TCP4 192.0.2.1 198.51.100.7 40000 25\r\nEHLO x\r\n")
    assert.equal(44, consumed)
    assert.same({ version = 1, command = "proxy", family = "inet", transport = "stream", src_address = "192.0.2.1",
      src_port = 40000, dst_address = "198.51.100.7", dst_port = 25, tlvs = 0, consumed = 44 }, info)
    info = assert(core.parse_proxy("PROXY TCP6 2001:DB8:0:0::1 2001:db8::2 65535 0\r\n"))
    assert.same({ "inet6", "2001:db8::1", "2001:db8::2", 65535, 0 },
      { info.family, info.src_address, info.dst_address, info.src_port, info.dst_port })
    info = assert(core.parse_proxy("PROXY UNKNOWN\r\n"))
    assert.same({ "local", "unspec" }, { info.command, info.family })
    assert.is_nil(info.src_address)
    info = assert(core.parse_proxy("PROXY UNKNOWN ffff:f...f:ffff 1 2\r\n"))
    assert.equal("local", info.command)
    local longest = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
      .. " 65535 65535\r\n"
    assert.equal(104, #longest)
    assert.truthy(core.parse_proxy(longest))
  end)

  it("refuses malformed v1 headers", function()
    local bad = {
      "PROXY TCP4 192.0.2.1 198.51.100.7 40000 25\n", "PROXY TCP4 192.0.2.1 198.51.100.7 40000 25\rX",
      "PROXY TCP4 192.0.2.1 198.51.100.7 40000 65536\r\n", "PROXY TCP4 192.0.2.1 198.51.100.7 040000 25\r\n",
      "PROXY TCP4 192.0.2.1  198.51.100.7 40000 25\r\n", "PROXY TCP4 192.0.2.1 198.51.100.7 40000 25 \r\n",
      "PROXY TCP4 192.0.2.1 198.51.100.7 40000\r\n", "PROXY TCP4 2001:db8::1 198.51.100.7 1 2\r\n",
      "PROXY TCP6 192.0.2.1 2001:db8::1 1 2\r\n", "PROXY TCP5 192.0.2.1 198.51.100.7 1 2\r\n",
      "PROXY tcp4 192.0.2.1 198.51.100.7 1 2\r\n", "PROXY TCP4 192.0.2.256 198.51.100.7 1 2\r\n",
      "PROXY TCP4 192.0.2.1 198.51.100.7 1 2 3\r\n", "PROXY \r\n", "PROXY\r\n", "proxy UNKNOWN\r\n",
      "PROXY UNKNOWNX\r\n", "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\0\r\n", "GET / HTTP/1.0\r\n", "EHLO x\r\n",
      "PROXY UNKNOWN " .. ("x"):rep(100) .. "\r\n", "PROXY " .. ("A"):rep(200),
      "PROXY TCP4 192.0.2.1 198.51.100.7 +1 2\r\n", "PROXY TCP4 192.0.2.1 198.51.100.7 1 -2\r\n",
    }
    for _, h in ipairs(bad) do
      local info, err, why = core.parse_proxy(h)
      assert.is_nil(info, ("%q"):format(h))
      assert.equal("invalid", err, ("%q"):format(h))
      assert.is_string(why)
    end
  end)

  it("parses v2 headers and skips TLVs", function()
    local info, consumed = core.parse_proxy(v2(1, 0x11, v4payload) .. "EHLO")
    assert.equal(28, consumed)
    assert.same({ version = 2, command = "proxy", family = "inet", transport = "stream", src_address = "192.0.2.1",
      src_port = 40000, dst_address = "198.51.100.7", dst_port = 25, tlvs = 0, consumed = 28 }, info)
    info = assert(core.parse_proxy(v2(1, 0x21, v6payload)))
    assert.same({ "inet6", "2001:db8::1", "2001:db8::2", 1234, 587 },
      { info.family, info.src_address, info.dst_address, info.src_port, info.dst_port })
    local tlvs = "\1" .. string.pack(">s2", "h2") .. "\4" .. string.pack(">s2", "") .. "\32"
      .. string.pack(">s2", ("x"):rep(300))
    info = assert(core.parse_proxy(v2(1, 0x11, v4payload .. tlvs)))
    assert.same({ 3, 16 + 12 + #tlvs }, { info.tlvs, info.consumed })
    info = assert(core.parse_proxy(v2(0, 0x00, "")))
    assert.same({ "local", 16 }, { info.command, info.consumed })
    info = assert(core.parse_proxy(v2(0, 0x11, "junk that is ignored")))
    assert.equal("local", info.command)
    info = assert(core.parse_proxy(v2(1, 0x00, "")))
    assert.equal("local", info.command)
    info = assert(core.parse_proxy(v2(1, 0x12, v4payload)))
    assert.equal("dgram", info.transport)
    info = assert(core.parse_proxy(v2(1, 0x31, ("\0"):rep(216))))
    assert.same({ "unix", "proxy" }, { info.family, info.command })
    assert.is_nil(info.src_address)
    assert.truthy(core.parse_proxy(v2(1, 0x11, v4payload .. "\0\15\241" .. ("\0"):rep(4096 - 15))))
  end)

  it("refuses malformed v2 headers", function()
    local bad = {
      v2(2, 0x11, v4payload), v2(1, 0x41, v4payload), v2(1, 0x13, v4payload), v2(1, 0x11, v4payload:sub(1, 11)),
      v2(1, 0x21, v4payload), v2(1, 0x31, ("\0"):rep(100)), v2(1, 0x11, v4payload .. "\1\0"),
      v2(1, 0x11, v4payload .. "\1\0\5abcd"), v2(1, 0x11, v4payload .. "\1\255\255"),
      v2(1, 0x11, v4payload .. ("\0"):rep(4096 - 11)),
      "\r\n\r\n\0\r\nQUIT\n" .. "\x11\x11\0\12" .. v4payload, "\r\n\r\n\0\r\nQUIT!" .. "\x21\x11\0\12",
      "\r\n\r\n\1", "\r\nEHLO",
    }
    for i, h in ipairs(bad) do
      local info, err = core.parse_proxy(h)
      assert.is_nil(info, i)
      assert.equal("invalid", err, i)
    end
  end)

  it("asks for more at every truncation of valid headers", function()
    local headers = {
      "PROXY TCP4 192.0.2.1 198.51.100.7 40000 25\r\n", "PROXY UNKNOWN\r\n",
      "PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n",
      v2(1, 0x11, v4payload), v2(1, 0x21, v6payload .. "\3\0\4abcd"), v2(0, 0x00, ""),
    }
    for _, h in ipairs(headers) do
      for n = 0, #h - 1 do
        local info, err = core.parse_proxy(h:sub(1, n))
        assert.is_nil(info, n)
        assert.equal("need-more", err, ("%q at %d"):format(h, n))
      end
      assert.equal(#h, select(2, core.parse_proxy(h)))
    end
  end)
end)

describe("xtext", function()
  it("round-trips every byte", function()
    local all = {}
    for b = 0, 255 do all[#all + 1] = string.char(b) end
    local s = table.concat(all)
    local x = core.xtext_encode(s)
    assert.is_nil(x:find("[^!-~]"))
    assert.equal(s, core.xtext_decode(x))
    assert.equal("a+2Bb+3Dc+20d", core.xtext_encode("a+b=c d"))
    assert.equal("", core.xtext_encode(""))
    assert.equal("+", core.xtext_decode("+2b"))
  end)

  it("refuses what is not xtext", function()
    for _, bad in ipairs { "a b", "a=b", "+", "+2", "+zz", "é", "a\0", "+2G" } do
      assert.same({ nil, "invalid xtext" }, { core.xtext_decode(bad) }, bad)
    end
  end)
end)

describe("EHLO replies", function()
  it("collects keywords and parameters", function()
    local caps = core.parse_ehlo { "mx.example.org at your service", "PIPELINING", "SIZE 10240000",
      "auth PLAIN LOGIN  SCRAM-SHA-256", "LIMITS RCPTMAX=100 MAILMAX=10", "8BITMIME", "AUTH=LOGIN",
      "SIZE 1", "bad\1line", "" }
    assert.equal("mx.example.org", caps.domain)
    assert.equal("at your service", caps.greeting)
    assert.same({ "PIPELINING", "SIZE", "AUTH", "LIMITS", "8BITMIME" }, caps.keywords)
    assert.same({}, caps.ext.PIPELINING)
    assert.same({ "10240000" }, caps.ext.SIZE)
    assert.same({ "PLAIN", "LOGIN", "SCRAM-SHA-256" }, caps.ext.AUTH)
    assert.same({ "RCPTMAX=100", "MAILMAX=10" }, caps.ext.LIMITS)
    assert.same({ "AUTH=LOGIN", "bad\1line", "" }, caps.invalid)
    assert.same({ domain = "mx", greeting = "", ext = {}, keywords = {}, invalid = {} }, core.parse_ehlo { "mx" })
  end)
end)
