--- The suite's own guard: peer programs that are present but cannot do
-- what a test needs make the test fail with a message naming the
-- Debian package, and every package named is one scripts/deps.sh installs.
local H = require "spec.helper"

--- The packages scripts/deps.sh installs, as a set.
local function deps_packages()
  local deps = H.readfile(H.root .. "/scripts/deps.sh")
  local listed = {}
  for _, var in ipairs { "BUILD", "SUITE", "PEERS", "EXTRA" } do
    local words = assert(deps:match("\n" .. var .. '="([^"]*)"'), var .. " in scripts/deps.sh")
    for p in words:gmatch("%S+") do listed[p] = true end
  end
  return listed
end

local function with_peer(name, peer, fn)
  H.peers[name] = peer
  local ok, err = pcall(fn)
  H.peers[name] = nil
  assert(ok, err)
end

describe("peer capabilities", function()
  it("fail a test with the peer's own reason and the package to install", function()
    with_peer("fake FOO", {
      command = "echo '=== BAR supported'; echo '*** FOO not available: requires Foo::Bar'",
      expect = "=== FOO supported", why = "FOO", packages = "libfoo-bar-perl",
    }, function()
      local ok, err = pcall(H.need, "fake FOO")
      assert.is_false(ok)
      assert.matches("needs fake FOO", err, 1, true)
      -- the line that says why, not the rest of the output
      assert.matches("`: *** FOO not available: requires Foo::Bar);", err, 1, true)
      assert.matches("install the Debian package(s) libfoo-bar-perl", err, 1, true)
    end)
  end)

  it("check what a capability builds on first, and a failing command without expect", function()
    with_peer("fake base", { command = "echo 'fake-base: not found'; exit 127", packages = "fake-base" }, function()
      with_peer("fake base TLS", { needs = "fake base", command = "true", packages = "fake-tls" }, function()
        local ok, err = pcall(H.need, "fake base TLS")
        assert.is_false(ok)
        assert.matches("fake-base: not found", err, 1, true)
        assert.matches("package(s) fake-base ", err, 1, true)
      end)
    end)
  end)

  it("refuse a capability nobody described", function()
    assert.has_error(function() H.need("no such peer") end,
      "spec/helper.lua: no peer capability named no such peer")
  end)

  it("name only packages that scripts/deps.sh installs", function()
    local listed = deps_packages()
    for name, peer in pairs(H.peers) do
      for p in peer.packages:gmatch("%S+") do
        assert(listed[p], ("%s: package %s is not in scripts/deps.sh"):format(name, p))
      end
    end
  end)

  it("are all there on this machine", function()
    local missing = {}
    local names = {}
    for name in pairs(H.peers) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
      local ok, err = pcall(H.need, name)
      if not ok then missing[#missing + 1] = err end
    end
    assert(#missing == 0, table.concat(missing, "\n"))
  end)
end)

describe("scripts/deps.sh", function()
  it("installs what the README dependency table lists, no more, no less", function()
    local readme = H.readfile(H.root .. "/README.md")
    local section = assert(readme:match("\n### Dependencies\n(.-)\n#"), "README: ### Dependencies")
    local in_readme = {}
    for row in section:gmatch("\n(|[^\n]*)") do
      local last = row:match("|%s*([^|]-)%s*|%s*$") -- the packages column
      for p in last:gmatch("`([^`]+)`") do in_readme[p] = true end
    end
    local listed = deps_packages()
    for p in pairs(listed) do assert(in_readme[p], p .. " is not in the README table") end
    for p in pairs(in_readme) do assert(listed[p], p .. " is not in scripts/deps.sh") end
  end)
end)
