--- luasmtp.options: one option schema for every constructor.
--
-- A schema is a list of options, each { name, type, default, doc } (a
-- group of options has `fields` instead of a default). apply() merges a
-- caller's table over the defaults, refuses unknown names and values of
-- the wrong type, and returns a fresh table; the README's option tables
-- are checked against the same schemas (spec/options_spec.lua), so the
-- documented defaults are the ones in the code.
local M = {}

local Schema = {}
Schema.__index = Schema

-- Types: a Lua type name, "integer", "any", "userdata", or several joined
-- with "|" ("string|table").
local function type_ok(expected, v)
  for t in expected:gmatch("[^|]+") do
    if t == "any" then return true end
    if t == "integer" then
      if math.type(v) == "integer" then return true end
    elseif type(v) == t then
      return true
    end
  end
  return false
end

local function copy(v)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do out[k] = copy(x) end
  return out
end

--- options.schema(name, entries) -> schema
-- entries: { {name, type, default, doc}, ... } or { name=, type=, default=,
-- doc=, fields = {entries} } for a group (a table option with its own
-- named fields, merged field by field).
function M.schema(name, entries)
  local s = setmetatable({ name = name, entries = {}, by_name = {} }, Schema)
  for _, e in ipairs(entries) do
    local entry = {
      name = e.name or e[1],
      type = e.type or e[2],
      default = e.default,
      doc = e.doc or e[4],
    }
    if entry.default == nil then entry.default = e[3] end
    if e.fields then
      entry.type = "table"
      entry.group = M.schema(name .. "." .. entry.name, e.fields)
    end
    assert(type(entry.name) == "string" and type(entry.type) == "string", "bad schema entry")
    s.entries[#s.entries + 1] = entry
    s.by_name[entry.name] = entry
  end
  return s
end

--- schema:apply(opts [, level]) -> config
-- Raises (at the caller's caller) for an unknown option or a wrong type.
function Schema:apply(opts, level)
  level = (level or 1) + 1
  if opts ~= nil and type(opts) ~= "table" then
    error(("%s: options must be a table"):format(self.name), level)
  end
  opts = opts or {}
  for k, v in pairs(opts) do
    local e = self.by_name[k]
    if not e then
      error(("%s: unknown option '%s'"):format(self.name, tostring(k)), level)
    end
    if not e.group and not type_ok(e.type, v) then
      error(("%s: option '%s' must be %s, got %s"):format(self.name, k, e.type, type(v)), level)
    end
    if e.group and type(v) ~= "table" then
      error(("%s: option '%s' must be a table"):format(self.name, k), level)
    end
  end
  local out = {}
  for _, e in ipairs(self.entries) do
    local v = opts[e.name]
    if e.group then
      out[e.name] = e.group:apply(v, level)
    elseif v ~= nil then
      out[e.name] = v
    else
      out[e.name] = copy(e.default)
    end
  end
  return out
end

--- schema:defaults() -> config with every default.
function Schema:defaults()
  return self:apply({})
end

--- options.show(v) -> how a default is written in the README tables.
function M.show(v)
  if v == nil then return "nil" end
  if type(v) == "string" then return ('"%s"'):format(v) end
  if type(v) == "table" then
    if next(v) == nil then return "{}" end
    local parts = {}
    for _, x in ipairs(v) do parts[#parts + 1] = M.show(x) end
    return "{ " .. table.concat(parts, ", ") .. " }"
  end
  if math.type(v) == "float" and v == math.floor(v) and math.abs(v) < 2 ^ 53 then
    return ("%.1f"):format(v)
  end
  return tostring(v)
end

--- schema:rows() -> { {name = "limits.max_recipients", type, default, doc}, ... }
-- in order, groups flattened with dotted names.
function Schema:rows(prefix, out)
  out = out or {}
  prefix = prefix or ""
  for _, e in ipairs(self.entries) do
    if e.group then
      e.group:rows(prefix .. e.name .. ".", out)
    else
      out[#out + 1] = { name = prefix .. e.name, type = e.type, default = M.show(e.default), doc = e.doc }
    end
  end
  return out
end

--- schema:markdown() -> the README table for this schema.
function Schema:markdown()
  local lines = { "| option | type | default | meaning |", "|---|---|---|---|" }
  for _, r in ipairs(self:rows()) do
    lines[#lines + 1] = ("| `%s` | %s | `%s` | %s |"):format(r.name, r.type:gsub("|", " or "), r.default, r.doc or "")
  end
  return table.concat(lines, "\n")
end

return M
