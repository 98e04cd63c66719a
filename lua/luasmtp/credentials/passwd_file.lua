--- luasmtp.credentials.passwd_file: a store over a Dovecot passwd-file,
-- reloaded when the file changes.
local core = require "luasmtp.core"
local schemes = require "luasmtp.credentials.schemes"

local SCRAM_DEFAULT_ITERATIONS, SCRAM_MAX_ITERATIONS = schemes.SCRAM_DEFAULT_ITERATIONS, schemes.SCRAM_MAX_ITERATIONS
local check_string, make_record = schemes.check_string, schemes.make_record
local record_store = require "luasmtp.credentials.store"
local Store, finish_data = record_store.Store, record_store.finish_data

local options = require "luasmtp.options"

local M = {}

local MAX_FILE_SIZE = 64 * 1024 * 1024
local MAX_LINE = 64 * 1024
local MAX_WARNINGS = 100

M.schema = options.schema("passwd_file", {
  { "default_scheme", "string", "CRYPT", "the scheme of entries without `{SCHEME}`" },
  { "lowercase", "boolean", false, "fold user names to lower case" },
  { "check_interval", "number", 1, "seconds between checks for a changed file" },
  { "max_size", "integer", MAX_FILE_SIZE, "bytes of the file at most" },
  { "scram_iterations", "integer", SCRAM_DEFAULT_ITERATIONS, "for SCRAM keys derived from `{PLAIN}` entries" },
})

-- ---------------------------------------------------------------------
-- passwd-file

--- Parse the extra fields (field 8): space-separated key=value; a bare key
-- is true.
local function parse_extra(s)
  local extra = {}
  for field in s:gmatch("[^ \t]+") do
    local k, v = field:match("^([^=]+)=(.*)$")
    if k then extra[k] = v else extra[field] = true end
  end
  return extra
end

--- Parse passwd-file text. Returns records and warnings; never raises on
-- any content.
local function parse_passwd(text, name, opts)
  local records, warnings, dropped = {}, {}, 0
  local function warn(lineno, msg)
    if #warnings < MAX_WARNINGS then
      warnings[#warnings + 1] = ("%s:%d: %s"):format(name, lineno, msg)
    else
      dropped = dropped + 1
    end
  end
  local lineno = 0
  local pos = 1
  local len = #text
  while pos <= len do
    local nl = text:find("\n", pos, true)
    local line = text:sub(pos, (nl or len + 1) - 1)
    pos = (nl or len) + 1
    lineno = lineno + 1
    if line:sub(-1) == "\r" then line = line:sub(1, -2) end
    if #line > MAX_LINE then
      warn(lineno, "line too long, skipped")
    elseif line:find("^%s*$") or line:find("^%s*#") then -- luacheck: ignore 542
      -- blank or comment
    elseif line:find("[%z\1-\8\10-\31\127]") then
      warn(lineno, "control characters, skipped")
    else
      local fields = {}
      for f in (line .. ":"):gmatch("([^:]*):") do fields[#fields + 1] = f end
      local user, secret = fields[1], fields[2]
      if #fields < 2 or user == "" then
        warn(lineno, "malformed line (expected user:password), skipped")
      elseif user:find("[%s]") then
        warn(lineno, "white space in user name, skipped")
      else
        if opts.lowercase then user = user:lower() end
        if records[user] then
          warn(lineno, "duplicate user " .. user .. ", kept the first")
        else
          local rec
          if secret == "" then
            rec = { user = user, scheme = "", secret = "", kind = "invalid", problem = "empty password" }
          else
            rec = make_record(user, secret, opts.default_scheme)
          end
          if rec.kind == "invalid" then
            warn(lineno, ("user %s: %s"):format(user, rec.problem))
          end
          local function field(i)
            local v = fields[i]
            return v ~= nil and v ~= "" and v or nil
          end
          rec.uid, rec.gid, rec.gecos = field(3), field(4), field(5)
          rec.home, rec.shell = field(6), field(7)
          -- field 8 onwards: extra fields (they may contain ':')
          rec.extra = parse_extra(#fields >= 8 and table.concat(fields, ":", 8) or "")
          records[user] = rec
        end
      end
    end
  end
  if dropped > 0 then
    warnings[#warnings + 1] = ("%s: %d more warnings"):format(name, dropped)
  end
  return records, warnings
end

local function read_file(path, max_size)
  local f, err = io.open(path, "rb")
  if not f then return nil, "io", err end
  local size = f:seek("end")
  if size and size > max_size then
    f:close()
    return nil, "limit", ("%s: larger than %d bytes"):format(path, max_size)
  end
  f:seek("set")
  local text = f:read(max_size + 1)
  f:close()
  text = text or ""
  if #text > max_size then
    return nil, "limit", ("%s: larger than %d bytes"):format(path, max_size)
  end
  return text
end

local PasswdStore = setmetatable({}, { __index = Store })
PasswdStore.__index = PasswdStore

--- Load the file; on success install the new data. Returns true or
-- nil, token, detail (the old data stays).
function PasswdStore:_load()
  local sig, err, detail = core.file_signature(self.path)
  if not sig then return nil, err, detail end
  local text
  text, err, detail = read_file(self.path, self._max_size)
  if not text then return nil, err, detail end
  local records, warnings = parse_passwd(text, self.path, self._opts)
  self._current = finish_data(records)
  self.warnings = warnings
  -- A file rewritten while it was read: keep the old signature so the
  -- next check reads it again.
  local after = core.file_signature(self.path)
  self._signature = after == sig and sig or nil
  self._load_error = nil
  return true
end

--- The current data, reloading the file first when it has changed (at
-- most once per check_interval seconds).
function PasswdStore:_data()
  local now = core.time()
  if now - self._checked >= self._interval or now < self._checked then
    self._checked = now
    local sig, err, detail = core.file_signature(self.path)
    if sig ~= self._signature then
      local ok
      if sig then ok, err, detail = self:_load() end
      if not ok then
        local msg = ("%s: reload failed, keeping the previous data: %s"):format(self.path, detail or err)
        if msg ~= self._load_error then
          self._load_error = msg
          if #self.warnings < MAX_WARNINGS + 1 then self.warnings[#self.warnings + 1] = msg end
        end
      end
    end
  end
  return self._current
end

--- credentials.passwd_file(path [, opts]) -> store | nil, token, detail
-- opts: default_scheme ("CRYPT": the scheme of entries without {SCHEME}),
-- lowercase (fold user names to lower case), check_interval (seconds
-- between checks for a changed file, default 1), max_size (bytes, default
-- 64 MiB), scram_iterations (for keys derived from {PLAIN}, default 4096).
-- store.warnings lists the lines skipped or unusable ("path:line: why").
function M.passwd_file(path, opts)
  check_string(path, 1, "path")
  opts = M.schema:apply(opts, 2)
  local iterations = opts.scram_iterations
  assert(math.type(iterations) == "integer" and iterations >= 1 and iterations <= SCRAM_MAX_ITERATIONS,
    "opts.scram_iterations must be an integer in [1, 10000000]")
  local interval = opts.check_interval or 1
  assert(type(interval) == "number" and interval >= 0, "opts.check_interval must be seconds >= 0")
  local store = setmetatable({
    path = path,
    warnings = {},
    _opts = { default_scheme = opts.default_scheme or "CRYPT", lowercase = opts.lowercase and true or false },
    _lowercase = opts.lowercase and true or false,
    _interval = interval,
    _max_size = opts.max_size or MAX_FILE_SIZE,
    _scram_iterations = iterations,
    _checked = core.time(),
  }, PasswdStore)
  local ok, err, detail = store:_load()
  if not ok then return nil, err, detail end
  return store
end


return M
