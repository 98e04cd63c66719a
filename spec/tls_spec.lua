local luasmtp = require "luasmtp"
local H = require "spec.helper"

-- Handshake both ends of a fresh TCP pair; returns client, server and
-- the results of both starttls calls.
local function handshake(server_ctx, client_ctx, copts)
  local c, s = H.tcp_pair()
  local st = luasmtp.spawn(function() return s:starttls(server_ctx, { timeout = 5 }) end)
  copts = copts or { servername = "localhost" }
  copts.timeout = copts.timeout or 5
  local cres = { c:starttls(client_ctx, copts) }
  local sres = { select(2, st:join(5)) }
  return c, s, cres, sres
end

describe("TLS", function()
  after_each(H.assert_no_leaks)

  it("upgrades a connection in place and reports the session", function()
    H.run(function()
      local sctx, cctx = H.tls_contexts()
      local c, s, cres, sres = handshake(sctx, cctx)
      local _ <close> = c
      local _ <close> = s
      assert.same({ true }, cres)
      assert.same({ true }, sres)
      assert.is_true(c:istls())
      c:send("over tls\r\n")
      assert.equal("over tls", s:receiveline())
      s:send("back\r\n")
      assert.equal("back", c:receiveline())
      local info = c:tlsinfo()
      assert.equal("TLSv1.3", info.version)
      assert.is_string(info.cipher)
      assert.is_true(info.verified)
      assert.matches("CN=localhost", info.peer.subject)
      assert.truthy(info.peer.sans.dns[1] == "localhost")
      assert.matches("^sha256:%x%x:", info.peer.fingerprint)
      local sinfo = s:tlsinfo()
      assert.equal("localhost", sinfo.servername)
      assert.is_nil(sinfo.peer)
    end)
  end)

  it("gives matching channel bindings: tls-exporter on TLS 1.3", function()
    H.run(function()
      local sctx, cctx = H.tls_contexts()
      local c, s = handshake(sctx, cctx)
      local cb1 = assert(c:channel_binding("tls-exporter"))
      local cb2 = assert(s:channel_binding("tls-exporter"))
      assert.equal(32, #cb1)
      assert.equal(cb1, cb2)
      assert.equal(cb1, c:channel_binding())
      local r, err = c:channel_binding("tls-unique")
      assert.is_nil(r)
      assert.equal("tls", err)
      c:close()
      s:close()
    end)
  end)

  it("gives matching channel bindings: tls-unique on TLS 1.2", function()
    H.run(function()
      local sctx, cctx = H.tls_contexts({ max_version = "tls1.2" })
      local c, s = handshake(sctx, cctx)
      assert.equal("TLSv1.2", c:tlsinfo().version)
      local cb1 = assert(c:channel_binding("tls-unique"))
      assert.equal(cb1, assert(s:channel_binding("tls-unique")))
      assert.equal(cb1, c:channel_binding())
      assert.is_nil((c:channel_binding("tls-exporter")))
      c:close()
      s:close()
    end)
  end)

  local function expect_verify_failure(certname, servername, pattern)
    H.run(function()
      local d = H.certs()
      local sctx = luasmtp.tls.context { mode = "server", certificate = d .. "/" .. certname .. ".pem",
        key = d .. "/" .. certname .. ".key" }
      local cctx = luasmtp.tls.context { mode = "client", cafile = d .. "/ca.pem" }
      local c, s, cres = handshake(sctx, cctx, { servername = servername })
      assert.is_nil(cres[1])
      assert.equal("tls", cres[2])
      assert.matches(pattern, cres[3])
      assert.same({ nil, "closed" }, { c:receiveline() }) -- a failed handshake closes
      s:close()
    end)
  end

  it("refuses a certificate for another host", function()
    expect_verify_failure("wronghost", "localhost", "hostname mismatch")
  end)

  it("refuses an expired certificate", function()
    expect_verify_failure("expired", "localhost", "expired")
  end)

  it("refuses a certificate from an unknown CA", function()
    expect_verify_failure("untrusted", "localhost", "local issuer")
  end)

  it("accepts anything when verification is turned off", function()
    H.run(function()
      local d = H.certs()
      local sctx = luasmtp.tls.context { mode = "server", certificate = d .. "/untrusted.pem",
        key = d .. "/untrusted.key" }
      local cctx = luasmtp.tls.context { mode = "client", verify = false }
      local c, s, cres = handshake(sctx, cctx, { servername = "wrong.name" })
      assert.same({ true }, cres)
      assert.is_false(c:tlsinfo().verified)
      c:close()
      s:close()
    end)
  end)

  it("chooses the server certificate by SNI", function()
    H.run(function()
      local d = H.certs()
      local sctx, cctx = H.tls_contexts({
        certificates = { { certificate = d .. "/sni2.pem", key = d .. "/sni2.key" } },
      })
      local c, s, cres = handshake(sctx, cctx, { servername = "mail.example.test" })
      assert.same({ true }, cres)
      assert.matches("mail.example.test", c:tlsinfo().peer.subject)
      c:close()
      s:close()
      c, s, cres = handshake(sctx, cctx, { servername = "localhost" })
      assert.same({ true }, cres)
      assert.matches("CN=localhost", c:tlsinfo().peer.subject)
      c:close()
      s:close()
    end)
  end)

  it("takes PEM strings as well as files", function()
    H.run(function()
      local d = H.certs()
      local sctx = luasmtp.tls.context { mode = "server", certificate_pem = H.readfile(d .. "/server.pem"),
        key_pem = H.readfile(d .. "/server.key") }
      local cctx = luasmtp.tls.context { mode = "client", cafile = d .. "/ca.pem" }
      local c, s, cres = handshake(sctx, cctx)
      assert.same({ true }, cres)
      c:close()
      s:close()
    end)
  end)

  it("raises on bad parameters", function()
    assert.has_error(function() luasmtp.tls.context { mode = "server" } end)
    assert.has_error(function() luasmtp.tls.context { mode = "sideways" } end)
    assert.has_error(function()
      luasmtp.tls.context { mode = "server", certificate = "/nonexistent.pem", key = "/nonexistent.key" }
    end)
    local d = H.certs()
    assert.has_error(function() -- key of another certificate
      luasmtp.tls.context { mode = "server", certificate = d .. "/server.pem", key = d .. "/sni2.key" }
    end)
  end)

  it("server STARTTLS discards plaintext pipelined after the command", function()
    H.run(function()
      local sctx, cctx = H.tls_contexts()
      local c, s = H.tcp_pair()
      local server = luasmtp.spawn(function()
        assert.equal("STARTTLS", s:receiveline())
        s:send("220 ready\r\n")
        assert(s:starttls(sctx))
        return s:receiveline()
      end)
      -- The injected command travels in the same packet as STARTTLS.
      c:send("STARTTLS\r\nMAIL FROM:<injected@evil>\r\n")
      assert.equal("220 ready", c:receiveline())
      assert(c:starttls(cctx, { servername = "localhost" }))
      c:send("NOOP\r\n")
      assert.same({ true, "NOOP" }, { server:join(5) })
      c:close()
      s:close()
    end)
  end)

  it("client STARTTLS refuses responses injected before the handshake", function()
    H.run(function()
      local _, cctx = H.tls_contexts()
      local c, s = H.tcp_pair()
      s:send("220 go ahead\r\n250 injected reply\r\n")
      assert.equal("220 go ahead", c:receiveline())
      local ok, err, detail = c:starttls(cctx, { servername = "localhost" })
      assert.is_nil(ok)
      assert.equal("tls", err)
      assert.matches("before the TLS handshake", detail)
      s:close()
    end)
  end)

  it("implicit TLS through serve and connect, with large transfers both ways", function()
    H.run(function()
      local sctx, cctx = H.tls_contexts()
      local size = 2 * 1024 * 1024
      local server = assert(luasmtp.serve {
        listen = "127.0.0.1:0",
        tls = sctx,
        handler = function(sock)
          -- write and read at once: exercises WANT_READ/WANT_WRITE crossings
          local writer = luasmtp.spawn(function()
            local chunk = string.rep("s", 65536)
            for _ = 1, size // #chunk do assert(sock:send(chunk)) end
            assert(sock:flush())
          end)
          local got = assert(sock:receive(size, 10))
          assert(writer:join(10))
          assert.equal(string.rep("c", size), got)
          sock:send("done\r\n")
          sock:flush()
        end,
      })
      local c <close> = assert(luasmtp.connect("127.0.0.1", server.addresses[1].port,
        { tls = cctx, servername = "localhost", timeout = 5 }))
      assert.is_true(c:istls())
      local reader = luasmtp.spawn(function() return c:receive(size, 10) end)
      local chunk = string.rep("c", 65536)
      for _ = 1, size // #chunk do assert(c:send(chunk)) end
      local ok, data = reader:join(10)
      assert.is_true(ok)
      assert.equal(size, #data)
      assert.equal("done", c:receiveline(nil, 5))
      server:close()
    end, 30)
  end)

  it("requires a server name when a client verifies", function()
    H.run(function()
      local _, cctx = H.tls_contexts()
      local c, s = H.tcp_pair()
      assert.has_error(function() c:starttls(cctx) end)
      c:close()
      s:close()
    end)
  end)

  it("times out a handshake with a silent peer", function()
    H.run(function()
      local _, cctx = H.tls_contexts()
      local c, s = H.tcp_pair()
      local ok, err = c:starttls(cctx, { servername = "localhost", timeout = 0.1 })
      assert.is_nil(ok)
      assert.equal("timeout", err)
      s:close()
    end)
  end)

  it("times out a stalled server handshake while the loop is otherwise idle", function()
    -- The reply before the handshake is queued, so the flush before the
    -- poll finishes it while the handshake already waits: that must
    -- neither cancel the handshake's deadline nor leave a task ready
    -- while the loop blocks. Nothing else happens meanwhile: the client
    -- reads only once the server has given up.
    local sctx = H.tls_contexts()
    local t0 = luasmtp.update_now()
    H.run_blocking(function()
      local c, s = H.tcp_pair()
      local st = luasmtp.spawn(function()
        s:send("220 ready\r\n")
        return s:starttls(sctx, { timeout = 1 })
      end)
      local joined, ok, err = st:join(10)
      assert.is_true(joined, "the handshake was not timed out")
      assert.is_nil(ok)
      assert.equal("timeout", err)
      assert.equal("220 ready", (c:receiveline(nil, 10)))
      local line, cerr = c:receiveline(nil, 10)
      assert.is_nil(line)
      assert.equal("closed", cerr)
      c:close()
    end)
    assert.is_true(luasmtp.update_now() - t0 < 10)
  end)

  it("keeps other writers and readers out while a handshake waits", function()
    H.run(function()
      local sctx = H.tls_contexts()
      local c, s = H.tcp_pair()
      local st = luasmtp.spawn(function() return s:starttls(sctx, { timeout = 5 }) end)
      luasmtp.sleep(0.05) -- the handshake now waits for the client
      local ok, err = pcall(s.send, s, "plaintext")
      assert.is_false(ok)
      assert.matches("busy", err)
      ok, err = pcall(s.receiveline, s)
      assert.is_false(ok)
      assert.matches("busy", err)
      c:close()
      local _, hok = st:join(5)
      assert.is_nil(hok)
    end)
  end)

  describe("with openssl as the peer", function()
    it("our client talks to openssl s_server", function()
      H.need("openssl")
      H.run(function()
        local d = H.certs()
        local port = H.free_port()
        local log = H.tmp .. "/s_server.log"
        local pid = H.start(("sleep 5 | timeout 10 openssl s_server -accept 127.0.0.1:%d -cert %s/server.pem "
          .. "-key %s/server.key -naccept 1 -quiet"):format(port, d, d), log)
        local _, cctx = H.tls_contexts()
        -- s_server accepts one connection only: retry until it listens
        local c, err, detail
        for _ = 1, 100 do
          c, err, detail = luasmtp.connect("127.0.0.1", port, { tls = cctx, servername = "localhost", timeout = 5 })
          if c or err ~= "refused" then break end
          luasmtp.sleep(0.05)
        end
        assert(c, detail)
        assert.equal("TLSv1.3", c:tlsinfo().version)
        c:send("hello from luasmtp\n")
        assert(c:flush())
        luasmtp.sleep(0.2)
        c:close()
        H.wait_pid(pid, 5)
        assert.matches("hello from luasmtp", H.readfile(log))
      end, 20)
    end)

    it("openssl s_client -starttls smtp talks to our STARTTLS server", function()
      H.need("openssl")
      H.run(function()
        local d = H.certs()
        local sctx = H.tls_contexts()
        local seen = {}
        local server = assert(luasmtp.serve {
          listen = "127.0.0.1:0",
          handler = function(sock)
            sock:send("220 localhost ESMTP\r\n")
            while true do
              local line = sock:receiveline(512, 5)
              if not line then return end
              seen[#seen + 1] = line
              local verb = line:upper():match("^(%a+)")
              if verb == "EHLO" then
                sock:send("250-localhost\r\n250 STARTTLS\r\n")
              elseif verb == "STARTTLS" then
                sock:send("220 2.0.0 go ahead\r\n")
                assert(sock:starttls(sctx))
              elseif verb == "QUIT" then
                sock:send("221 bye\r\n")
                return
              else
                sock:send("250 ok\r\n")
              end
            end
          end,
        })
        local port = server.addresses[1].port
        local log = H.tmp .. "/s_client.log"
        local pid = H.start(("(sleep 0.3; echo NOOP; sleep 0.3; echo QUIT; sleep 0.5) | "
          .. "exec timeout 10 openssl s_client -connect 127.0.0.1:%d -starttls smtp "
          .. "-CAfile %s/ca.pem -verify_return_error -verify_hostname localhost "
          .. "-crlf -nocommands -ign_eof"):format(port, d), log)
        assert.is_true(H.wait_pid(pid, 10))
        server:close()
        local out = H.readfile(log)
        assert.matches("Verify return code: 0", out)
        assert.matches("221 bye", out)
        assert.equal("STARTTLS", seen[2])
        assert.equal("NOOP", seen[3])
        assert.equal("QUIT", seen[4])
      end, 20)
    end)
  end)
end)
