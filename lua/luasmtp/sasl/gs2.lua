--- luasmtp.sasl.gs2: the GS2 header (RFC 5801 section 4) that starts
-- SCRAM (RFC 5802) and OAUTHBEARER (RFC 7628) client messages, and the
-- `saslname` escaping of names in it (`,` as `=2C`, `=` as `=3D`).
--
--   gs2-header     = gs2-cbind-flag "," [ "a=" saslname ] ","
--   gs2-cbind-flag = "p=" cb-name / "n" / "y"
local M = {}

--- encode_name(name) -> saslname
function M.encode_name(name)
  return (name:gsub("[=,]", { ["="] = "=3D", [","] = "=2C" }))
end

--- decode_name(saslname) -> name | nil
-- nil when the name holds a `=` not followed by 2C or 3D, or a `,`, or
-- is empty or not UTF-8.
function M.decode_name(s)
  if s == "" or s:find(",", 1, true) or not utf8.len(s) then
    return nil
  end
  local bad = false
  local name = s:gsub("=(..)", function(code)
    if code == "2C" then return "," end
    if code == "3D" then return "=" end
    bad = true
  end)
  -- a "=" left over is an escape cut short (or a bad one gsub skipped)
  if bad or s:gsub("=2C", ""):gsub("=3D", ""):find("=", 1, true) then
    return nil
  end
  return name
end

--- header(flag, cb_type, authzid) -> "n,," / "y,," / "p=tls-exporter,a=x,"
function M.header(flag, cb_type, authzid)
  local f = flag == "p" and ("p=" .. cb_type) or flag
  local a = authzid and authzid ~= "" and ("a=" .. M.encode_name(authzid)) or ""
  return f .. "," .. a .. ","
end

--- parse(message) -> header, rest | nil, detail
-- header = { flag = "n" | "y" | "p", cb_type = name | nil,
--            authzid = name | nil, text = the header as sent }
function M.parse(msg)
  local flag, cb_type, pos
  if msg:sub(1, 2) == "n," or msg:sub(1, 2) == "y," then
    flag, pos = msg:sub(1, 1), 3
  else
    local name, after = msg:match("^p=([%w%.%-]+),()")
    if not name then
      return nil, "bad GS2 channel binding flag"
    end
    flag, cb_type, pos = "p", name, after
  end
  local authzid
  local rest_start
  if msg:sub(pos, pos) == "," then
    rest_start = pos + 1
  else
    local raw, after = msg:match("^a=([^,]*),()", pos)
    if not raw then
      return nil, "bad GS2 authorization identity"
    end
    authzid = M.decode_name(raw)
    if not authzid then
      return nil, "bad encoding of the authorization identity"
    end
    rest_start = after
  end
  return { flag = flag, cb_type = cb_type, authzid = authzid, text = msg:sub(1, rest_start - 1) },
    msg:sub(rest_start)
end

return M
