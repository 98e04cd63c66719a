--- luasmtp.mailauth.ar: the Authentication-Results header field
-- (RFC 8601).
--
--   local ar = require "luasmtp.mailauth.ar"
--   local value = ar.format("mx.example.org", {
--     ar.spf("pass", { mailfrom = "alice@example.org", helo = "mail.example.org" }),
--     ar.dkim({ result = "pass", domain = "example.org", selector = "s1", header_b = "dGhpcyBp..." }),
--     ar.dmarc({ result = "pass", from_domain = "example.org", policy = "reject" }),
--   })
--   message.header:prepend("Authentication-Results", value)
--
-- Values are written as RFC 8601 section 2.2 allows: a token, an
-- address or domain (local-part "@" domain), or else a quoted-string;
-- comments have their parentheses and backslashes escaped. ours()
-- tells a field claiming our authserv-id, which a receiver removes
-- from incoming mail (section 5).
local M = {}

-- RFC 2045 token: printable ASCII without SP and tspecials.
local function is_token(s)
  return #s > 0 and not s:find("[^!#$%%&'*+%-.0-9A-Z^_`a-z{|}~]")
end

-- RFC 5322 dot-atom-text: atext runs joined by single dots.
local function is_dot_atom(s)
  return #s > 0 and not s:find("[^%w!#$%%&'*+%-/=?^_`{|}~.]") and not s:find("^%.") and not s:find("%.$")
    and not s:find("%.%.")
end

local function is_domain(s)
  return #s > 0 and #s <= 253 and not s:find("[^%w%-%.]") and not s:find("^%.") and not s:find("%.%.")
end

local function quoted(s)
  return '"' .. s:gsub("[%c]", ""):gsub('(["\\])', "\\%1") .. '"'
end

--- value(s) -> the text of a pvalue: as is when RFC 8601 allows it
-- bare, else a quoted-string.
function M.value(s)
  s = tostring(s)
  if is_token(s) then
    return s
  end
  local lp, domain = s:match("^(.*)@([^@]*)$")
  if lp and is_domain(domain) and (lp == "" or is_dot_atom(lp)) then
    return s
  end
  return quoted(s)
end

--- comment(s) -> "(s)" with ( ) \ escaped and controls dropped.
function M.comment(s)
  return "(" .. tostring(s):gsub("[%c]", " "):gsub("([()\\])", "\\%1") .. ")"
end

--- format(authserv_id, results) -> field value. results: a list of
-- { method =, result =, reason =, comment =, props = { {"ptype.property", value}, ... } };
-- an empty list is "authserv-id; none".
function M.format(authserv_id, results)
  assert(type(authserv_id) == "string" and authserv_id ~= "", "format: authserv_id must be a string")
  local parts = { M.value(authserv_id) }
  if #results == 0 then
    parts[2] = "none"
  end
  for _, r in ipairs(results) do
    assert(type(r.method) == "string" and is_token(r.method), "format: method must be a token")
    assert(type(r.result) == "string" and is_token(r.result), "format: result must be a token")
    local words = { r.method .. "=" .. r.result }
    if r.comment then
      words[#words + 1] = M.comment(r.comment)
    end
    if r.reason then
      words[#words + 1] = "reason=" .. quoted(tostring(r.reason))
    end
    for _, p in ipairs(r.props or {}) do
      if p[2] ~= nil then
        assert(p[1]:match("^%a[%w%-]*%.[%a][%w%-]*$"), "format: property must be ptype.property")
        words[#words + 1] = p[1] .. "=" .. M.value(p[2])
      end
    end
    parts[#parts + 1] = table.concat(words, " ")
  end
  -- one result per line, folded: header.view values may contain folding
  return table.concat(parts, ";\r\n\t")
end

--- spf(result, { mailfrom =, helo =, detail = }) -> result entry.
-- With a MAIL FROM address smtp.mailfrom names it; for the HELO
-- identity (null sender) smtp.helo.
function M.spf(result, info)
  info = info or {}
  local props = {}
  if info.mailfrom and info.mailfrom ~= "" then
    props[#props + 1] = { "smtp.mailfrom", info.mailfrom }
  elseif info.helo then
    props[#props + 1] = { "smtp.helo", info.helo }
  end
  return { method = "spf", result = result, reason = info.detail, props = props }
end

--- dkim(sig) -> result entry; sig as luasmtp.dkim verifier results give
-- it: { result, reason, domain, selector, header_b, identity }.
-- header.b is the first 8 characters of b= (RFC 6008).
function M.dkim(sig)
  local b = sig.header_b and sig.header_b:gsub("%s", ""):sub(1, 8) or nil
  return { method = "dkim", result = sig.result, reason = sig.reason, props = {
    { "header.d", sig.domain }, { "header.i", sig.identity }, { "header.s", sig.selector }, { "header.b", b },
  } }
end

--- dmarc(verdict) -> result entry from luasmtp.mailauth.dmarc.evaluate.
function M.dmarc(verdict)
  local comment
  if verdict.policy then
    comment = ("p=%s dis=%s"):format(verdict.policy, verdict.disposition or "none"):upper()
  end
  return { method = "dmarc", result = verdict.result, comment = comment,
           props = { { "header.from", verdict.from_domain } } }
end

-- Skip CFWS (comments may nest) from pos; returns the next position.
local function skip_cfws(s, pos)
  while pos <= #s do
    local c = s:sub(pos, pos)
    if c:match("[ \t\r\n]") then
      pos = pos + 1
    elseif c == "(" then
      local depth = 0
      repeat
        c = s:sub(pos, pos)
        if c == "\\" then
          pos = pos + 1
        elseif c == "(" then
          depth = depth + 1
        elseif c == ")" then
          depth = depth - 1
        end
        pos = pos + 1
      until depth == 0 or pos > #s
    else
      break
    end
  end
  return pos
end

--- authserv_id(field_value) -> the authserv-id of an
-- Authentication-Results field, or nil when it has none.
function M.authserv_id(value)
  local pos = skip_cfws(value, 1)
  if value:sub(pos, pos) == '"' then
    local out = {}
    pos = pos + 1
    while pos <= #value do
      local c = value:sub(pos, pos)
      if c == "\\" then
        out[#out + 1] = value:sub(pos + 1, pos + 1)
        pos = pos + 2
      elseif c == '"' then
        return table.concat(out)
      else
        out[#out + 1] = c
        pos = pos + 1
      end
    end
    return nil
  end
  local id = value:match("^[^%s;()\"]+", pos)
  return id
end

--- ours(field_value, authserv_id) -> boolean: does the field claim to
-- come from us? (compared without regard to case, as a domain would be)
function M.ours(value, authserv_id)
  local id = M.authserv_id(value)
  return id ~= nil and id:lower() == authserv_id:lower()
end

--- remove_forged(header, authserv_id) -> number removed: every
-- Authentication-Results field of a header view (luasmtp.server's
-- message.header) that claims our authserv-id.
function M.remove_forged(header, authserv_id)
  local removed = 0
  local n = 1
  while true do
    local value = header:get("Authentication-Results", n)
    if value == nil then
      break
    end
    if M.ours(value, authserv_id) then
      header:remove("Authentication-Results", n)
      removed = removed + 1
    else
      n = n + 1
    end
  end
  return removed
end

return M
