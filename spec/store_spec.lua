local store = require "luasmtp.store"
local server = require "luasmtp.server"
local luasmtp = require "luasmtp"
local H = require "spec.helper"

local function ls(dir)
  local p = assert(io.popen("ls -A '" .. dir .. "' 2>/dev/null"))
  local names = {}
  for name in p:lines() do names[#names + 1] = name end
  p:close()
  return names
end

describe("mail storage", function()
  local base = H.tmp .. "/store"
  before_each(function() os.execute("rm -rf '" .. base .. "' && mkdir -p '" .. base .. "'") end)

  it("delivers to a Maildir through tmp/ into new/", function()
    local md = store.maildir(base .. "/md")
    local path = assert(md:deliver("Subject: x\r\n\r\nbody\r\n"))
    assert.matches("/new/", path)
    assert.equal("Subject: x\r\n\r\nbody\r\n", H.readfile(path))
    assert.same({}, ls(base .. "/md/tmp"))
    assert.equal(1, #ls(base .. "/md/new"))
    assert(md:deliver("second"))
    assert.equal(2, #ls(base .. "/md/new")) -- unique names
  end)

  it("appends to an mbox with From_ quoting", function()
    local mb = store.mbox(base .. "/mbox")
    assert(mb:deliver("Subject: a\r\n\r\nFrom here\r\n>From there\r\n", "a@x.test"))
    assert(mb:deliver("two\r\n"))
    local data = H.readfile(base .. "/mbox")
    assert.matches("^From a@x%.test ", data)
    assert.matches("\n>From here\n>>From there\n", data)
    assert.matches("\nFrom MAILER%-DAEMON ", data)
  end)

  it("streams a message object: quoting and line endings hold across chunk boundaries", function()
    local text = "Subject: a\r\n\r\nFrom here\r\n>From there\r\nlast line without end"
    -- a message-like object whose chunks cut lines (and CRLFs) anywhere
    local function message_of(n)
      return { from = "s@x.test", chunks = function()
        local pos = 1
        return function()
          if pos > #text then return nil end
          local piece = text:sub(pos, pos + n - 1)
          pos = pos + n
          return piece
        end
      end }
    end
    local whole = store.mbox(base .. "/whole")
    assert(whole:deliver(text, "s@x.test"))
    local expected = H.readfile(base .. "/whole"):gsub("^From [^\n]*\n", "")
    assert.matches("\n>From here\n>>From there\nlast line without end\n\n$", expected)
    for _, n in ipairs { 1, 2, 3, 5, 11, 4096 } do
      local path = ("%s/mbox-%d"):format(base, n)
      assert(store.mbox(path):deliver(message_of(n)))
      assert.equal(expected, (H.readfile(path):gsub("^From [^\n]*\n", "")), "chunks of " .. n)
      local md = store.maildir(("%s/md-%d"):format(base, n))
      local file = assert(md:deliver(message_of(n)))
      assert.equal(text, H.readfile(file))
    end
  end)

  it("answers 452 on a full disk and leaves nothing half-written", function()
    local dir = base .. "/full"
    local undo, why = H.mount_tmpfs(dir, "16k") -- a tiny file system to fill up
    if not undo then
      pending(why)
      return
    end
    local ok, err = pcall(function()
      local md = store.maildir(dir .. "/md")
      local res, reply = md:deliver(string.rep("x", 64 * 1024))
      assert.is_nil(res)
      assert.equal(452, reply.code)
      assert.equal("4.3.1", reply.enhanced)
      assert.same({}, ls(dir .. "/md/tmp"))
      assert.same({}, ls(dir .. "/md/new"))
      -- and through the server: the client sees 452
      H.run(function()
        local srv = assert(server.new { listen = "127.0.0.1:0", logger = function() end, hooks = {
          on_data = function(_, msg) local okd, r = md:deliver(msg) if not okd then return r end end,
        } })
        local c <close> = assert(luasmtp.connect("127.0.0.1", srv:addresses()[1].port, { timeout = 5 }))
        local _ <close> = setmetatable({}, { __close = function() srv:close() end })
        c:settimeout(5)
        c:receiveline()
        c:send("HELO x.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        for _ = 1, 4 do c:receiveline() end
        c:send(string.rep(string.rep("y", 78) .. "\r\n", 500) .. ".\r\n")
        assert.matches("^452 4%.3%.1", c:receiveline())
        c:close()
        srv:close()
      end)
    end)
    undo()
    assert(ok, err)
  end)
end)
