--- luasmtp.json: a small JSON encoder (RFC 8259) for reports.
--
--   json.encode { name = "x", list = json.array { 1, 2 } }
--
-- Tables whose keys are 1..n are arrays, other tables objects with their
-- keys sorted (so the output is stable); json.array(t) marks a table as
-- an array even when it is empty. Strings that are not valid UTF-8 have
-- their bytes >= 0x80 written as \u00XX (read as Latin-1), so the output
-- is always valid JSON. Numbers must be finite; integers stay integers.
local M = {}

local ARRAY = setmetatable({}, { __mode = "k" })

--- array(t) -> t, marked as a JSON array.
function M.array(t)
  t = t or {}
  ARRAY[t] = true
  return t
end

local ESCAPES = {
  ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
}

local function escape_char(c)
  return ESCAPES[c] or ("\\u%04x"):format(c:byte())
end

local function encode_string(s, out)
  local body = s:gsub('[%c"\\]', escape_char)
  if not utf8.len(body) then
    body = body:gsub("[\128-\255]", escape_char)
  end
  out[#out + 1] = '"' .. body .. '"'
end

local function is_array(t)
  if ARRAY[t] then
    return true
  end
  local n = #t
  if n == 0 then
    return false
  end
  local count = 0
  for _ in pairs(t) do
    count = count + 1
  end
  return count == n
end

local function encode_value(v, out, depth)
  local ty = type(v)
  if ty == "string" then
    encode_string(v, out)
  elseif ty == "number" then
    if v ~= v or v == math.huge or v == -math.huge then
      error("json: cannot encode " .. tostring(v), 0)
    end
    out[#out + 1] = math.type(v) == "integer" and tostring(v) or ("%.17g"):format(v)
  elseif ty == "boolean" then
    out[#out + 1] = tostring(v)
  elseif v == nil or v == M.null then
    out[#out + 1] = "null"
  elseif ty == "table" then
    if depth > 64 then
      error("json: nesting too deep", 0)
    end
    if is_array(v) then
      out[#out + 1] = "["
      for i = 1, #v do
        if i > 1 then out[#out + 1] = "," end
        encode_value(v[i], out, depth + 1)
      end
      out[#out + 1] = "]"
    else
      local keys = {}
      for k in pairs(v) do
        if type(k) ~= "string" then
          error("json: object keys must be strings", 0)
        end
        keys[#keys + 1] = k
      end
      table.sort(keys)
      out[#out + 1] = "{"
      for i, k in ipairs(keys) do
        if i > 1 then out[#out + 1] = "," end
        encode_string(k, out)
        out[#out + 1] = ":"
        encode_value(v[k], out, depth + 1)
      end
      out[#out + 1] = "}"
    end
  else
    error("json: cannot encode a " .. ty, 0)
  end
end

--- null: a value that encodes as null (nil cannot be an array element).
M.null = setmetatable({}, { __tostring = function() return "null" end })

--- encode(value) -> string (raises on values JSON cannot hold)
function M.encode(value)
  local out = {}
  encode_value(value, out, 0)
  return table.concat(out)
end

return M
