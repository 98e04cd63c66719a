--- luasmtp.sasl.saslprep: SASLprep (RFC 4013) for user names and
-- passwords, as SCRAM requires.
--
-- What is implemented of the stringprep profile (RFC 3454):
--   * the input must be valid UTF-8 (no surrogates, nothing above U+10FFFF);
--   * mapping: non-ASCII space characters (table C.1.2) become U+0020,
--     the "commonly mapped to nothing" characters (table B.1) are removed;
--   * prohibited output (tables C.1.2 to C.9): ASCII and non-ASCII control
--     characters, private use, non-characters, surrogates, characters
--     inappropriate for plain text or canonical representation, characters
--     that change display properties, tagging characters.
-- Not implemented (documented limitation): NFKC normalisation, the
-- unassigned code point check (table A.1) and the bidirectional text
-- rule. ASCII strings, the common case, are exactly what full SASLprep
-- gives; other strings pass through the mapping and the checks above
-- unnormalised, so a password typed in a decomposed form does not match
-- the same password typed composed.
local M = {}

-- Table C.1.2: non-ASCII space characters, mapped to U+0020.
local NON_ASCII_SPACE = {
  [0x00A0] = true, [0x1680] = true, [0x202F] = true, [0x205F] = true, [0x3000] = true,
}
for cp = 0x2000, 0x200A do NON_ASCII_SPACE[cp] = true end

-- Table B.1: commonly mapped to nothing.
local MAPPED_TO_NOTHING = {
  [0x00AD] = true, [0x034F] = true, [0x1806] = true, [0x180B] = true, [0x180C] = true,
  [0x180D] = true, [0x200B] = true, [0x200C] = true, [0x200D] = true, [0x2060] = true,
  [0xFEFF] = true,
}
for cp = 0xFE00, 0xFE0F do MAPPED_TO_NOTHING[cp] = true end

-- Prohibited code point ranges (tables C.2.1 to C.9), inclusive.
local PROHIBITED = {
  { 0x0000, 0x001F }, { 0x007F, 0x009F },            -- C.2.1, C.2.2 controls
  { 0x0340, 0x0341 },                                -- C.8
  { 0x06DD, 0x06DD }, { 0x070F, 0x070F },            -- C.2.2
  { 0x180E, 0x180E },                                -- C.2.2
  { 0x200E, 0x200F },                                -- C.8
  { 0x2028, 0x2029 },                                -- C.2.2
  { 0x202A, 0x202E },                                -- C.8
  { 0x2060, 0x2063 }, { 0x206A, 0x206F },            -- C.2.2, C.8
  { 0x2FF0, 0x2FFB },                                -- C.7
  { 0xD800, 0xDFFF },                                -- C.5
  { 0xE000, 0xF8FF },                                -- C.3
  { 0xFDD0, 0xFDEF },                                -- C.4
  { 0xFFF9, 0xFFFD },                                -- C.2.2, C.6
  { 0x1D173, 0x1D17A },                              -- C.2.2
  { 0xE0001, 0xE0001 }, { 0xE0020, 0xE007F },        -- C.9
  { 0xF0000, 0xFFFFD }, { 0x100000, 0x10FFFD },      -- C.3
}

local function prohibited(cp)
  -- C.4: the last two code points of every plane
  if cp & 0xFFFE == 0xFFFE then
    return true
  end
  for _, r in ipairs(PROHIBITED) do
    if cp >= r[1] and cp <= r[2] then
      return true
    end
  end
  return false
end

--- saslprep(s) -> prepared | nil, detail
-- Returns nil and a reason for invalid UTF-8, a prohibited character or
-- a string that is empty after mapping.
function M.prepare(s)
  assert(type(s) == "string", "saslprep: string expected")
  -- fast path: printable ASCII is left as it is
  if not s:find("[^\32-\126]") then
    if s == "" then
      return nil, "empty string"
    end
    return s
  end
  if not utf8.len(s) then
    return nil, "invalid UTF-8"
  end
  local out = {}
  for _, cp in utf8.codes(s) do
    if NON_ASCII_SPACE[cp] then
      out[#out + 1] = " "
    elseif not MAPPED_TO_NOTHING[cp] then
      if prohibited(cp) then
        return nil, ("prohibited character U+%04X"):format(cp)
      end
      out[#out + 1] = utf8.char(cp)
    end
  end
  if #out == 0 then
    return nil, "empty string"
  end
  return table.concat(out)
end

return M
