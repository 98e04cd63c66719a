--- luasmtp.queue.dsn: delivery status notifications (RFC 3464, RFC 3461,
-- RFC 6533 for SMTPUTF8 mail) and the rules for when to send one.
--
--   local dsn = require "luasmtp.queue.dsn"
--   if dsn.should_notify(rcpt, "failed", envelope.from) then
--     local notice = assert(dsn.build {
--       original = message_text, reporting_mta = "mx.example.org",
--       envelope = { from = envelope.from, envid = envid, ret = "hdrs" },
--       recipients = { { address = rcpt.address, action = "failed", status = "5.1.1",
--                        remote_mta = "mx.example.net",
--                        diagnostic = "smtp; 550 5.1.1 No such user" } },
--     })
--     -- notice.from == "", notice.to == { envelope.from }, notice.message
--   end
--
-- A notice always goes from the null sender and never answers a message
-- from the null sender (a bounce is never bounced). Every text that came
-- from a peer (diagnostics, host names, addresses) is made one line,
-- stripped of controls and capped before it goes into a header field.
local core = require "luasmtp.core"

local M = {}

--- The largest original returned in full (RET=FULL): above it only the
-- header block is returned (RFC 3461 section 4.3 allows that).
M.MAX_ORIGINAL = 10 * 1024 * 1024

--- A header block read from a file or a stream is cut at this size (the
-- server's own header-block cap).
M.MAX_HEADER_BLOCK = 256 * 1024

--- Default for too_many_hops: Postfix's hopcount_limit (50).
M.MAX_HOPS = 50

-- Longest value of a generated header field, in bytes (well inside the
-- 998-octet line limit of RFC 5322 once folded).
local MAX_FIELD = 900

local ACTIONS = { failed = "5", delayed = "4", delivered = "2", relayed = "2", expanded = "2" }

local DAYS = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" }
local MONTHS = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" }

--- date(t) -> RFC 5322 date-time in UTC (independent of the C locale)
function M.date(t)
  local d = os.date("!*t", math.floor(t))
  return ("%s, %02d %s %04d %02d:%02d:%02d +0000"):format(DAYS[d.wday], d.day, MONTHS[d.month], d.year,
    d.hour, d.min, d.sec)
end

-- One line of text from a peer: line breaks and other controls become
-- spaces, runs of space one, non-ASCII is kept only in global (UTF-8)
-- notices and only when it is valid UTF-8; capped at MAX_FIELD bytes.
local function clean(s, global)
  s = tostring(s):gsub("[%z\1-\31\127]", " "):gsub("  +", " "):gsub("^ ", ""):gsub(" $", "")
  if not global or not utf8.len(s) then
    s = s:gsub("[\128-\255]", "?")
  end
  if #s > MAX_FIELD then
    s = s:sub(1, MAX_FIELD)
    if global then -- do not cut a UTF-8 sequence in two
      while #s > 0 and not utf8.len(s) do s = s:sub(1, -2) end
    end
  end
  return s
end

-- "Name: value" folded at spaces to lines of about 78 characters.
local function field(name, value)
  local line = name .. ": " .. value
  if #line <= 78 then return line end
  local out, cur, empty = {}, name .. ":", true
  for word in value:gmatch("%S+") do
    if not empty and #cur + 1 + #word > 78 then
      out[#out + 1] = cur
      cur = " " .. word
    else
      cur = cur .. " " .. word
    end
    empty = false
  end
  out[#out + 1] = cur
  return table.concat(out, "\r\n")
end

local function is_ascii(s) return not s:find("[\128-\255]") end

-- RFC 6533 utf-8-addr-xtext: non-ASCII, controls, "+", "=" and "\" as \x{HEX}
local function utf8_xtext(s)
  local out = {}
  for _, c in utf8.codes(s) do
    if c < 0x21 or c > 0x7e or c == 0x2b or c == 0x3d or c == 0x5c then
      out[#out + 1] = ("\\x{%X}"):format(c)
    else
      out[#out + 1] = utf8.char(c)
    end
  end
  return table.concat(out)
end

--- address_field(addr, global [, addr_type]) -> "type; address"
-- The value of Final-Recipient and Original-Recipient: rfc822 for ASCII
-- addresses, utf-8 (RFC 6533) for the others: the address itself in a
-- global notice, its utf-8-addr-xtext form in a plain one.
local function address_field(addr, global, addr_type)
  addr_type = (addr_type or "rfc822"):lower()
  if addr_type == "rfc822" and is_ascii(addr) then
    return "rfc822; " .. clean(addr, false)
  end
  if not utf8.len(addr) then
    return "rfc822; " .. clean(addr, false)
  end
  if addr_type == "rfc822" then addr_type = "utf-8" end
  if global then
    return clean(addr_type, false) .. "; " .. clean(addr, true)
  end
  if addr_type ~= "utf-8" then
    return clean(addr_type, false) .. "; " .. clean(addr, false)
  end
  return "utf-8; " .. clean(utf8_xtext(addr), false)
end

--- orcpt(value) -> addr_type, address | nil, "invalid orcpt"
-- The ORCPT parameter decoded: a table {type=, addr=} as the server's
-- RCPT parser gives it (already decoded), or the raw parameter
-- "addr-type;xtext" (xtext decoded with the protocol codec; for the
-- utf-8 type also the \x{HEX} escapes of RFC 6533).
function M.orcpt(value)
  if value == nil then return nil end
  if type(value) == "table" then
    local addr = value.addr or value.address
    assert(type(addr) == "string", "orcpt table needs addr")
    return value.type or "rfc822", addr
  end
  local addr_type, x = tostring(value):match("^([%w%-]+);(.*)$")
  if not addr_type then return nil, "invalid orcpt" end
  local addr = core.xtext_decode(x)
  if not addr then return nil, "invalid orcpt" end
  if addr_type:lower() == "utf-8" then
    local bad = false
    addr = addr:gsub("\\x{(%x+)}", function(h)
      local c = tonumber(h, 16)
      if c > 0x10FFFF or (c >= 0xD800 and c <= 0xDFFF) then bad = true return "" end
      return utf8.char(c)
    end)
    if bad or not utf8.len(addr) then return nil, "invalid orcpt" end
  end
  return addr_type, addr
end

-- NOTIFY as a set: a table {success=true, ...} (the server's parser), a
-- string "SUCCESS,FAILURE" (the parameter) or a list {"SUCCESS", ...}.
local function notify_set(notify)
  if notify == nil then return nil end
  local set = {}
  if type(notify) == "string" then
    for word in notify:gmatch("[^,%s]+") do set[word:lower()] = true end
  else
    for k, v in pairs(notify) do
      if type(k) == "number" then set[tostring(v):lower()] = true
      elseif v then set[tostring(k):lower()] = true end
    end
  end
  return set
end

--- should_notify(rcpt, action [, sender]) -> boolean
-- rcpt.notify as given with RCPT (nil: not given). NEVER: no notice;
-- "failed" needs FAILURE, "delayed" DELAY (without NOTIFY both are
-- sent, RFC 3461 section 4.1); "delivered", "relayed" and "expanded"
-- need SUCCESS. With the envelope sender given, a message from the null
-- sender never gets a notice.
function M.should_notify(rcpt, action, sender)
  assert(ACTIONS[action], "action must be failed, delayed, delivered, relayed or expanded")
  if sender ~= nil and (sender == "" or sender == "<>") then return false end
  local set = notify_set(type(rcpt) == "table" and rcpt.notify or nil)
  if set == nil or next(set) == nil then
    return action == "failed" or action == "delayed"
  end
  if set.never then return false end
  if action == "failed" then return set.failure == true end
  if action == "delayed" then return set.delay == true end
  return set.success == true
end

--- too_many_hops(header_block [, max]) -> boolean, count
-- Counts the Received fields of a header block (a string, or a header
-- view with get_all): more than max (default 50, as Postfix's
-- hopcount_limit) means the message loops; the queue bounces it with
-- 5.4.6 (Routing loop detected).
function M.too_many_hops(header_block, max)
  max = max or M.MAX_HOPS
  local count = 0
  if type(header_block) == "table" or type(header_block) == "userdata" then
    count = #header_block:get_all("Received")
  else
    local block = tostring(header_block)
    local stop = block:find("\r?\n\r?\n")
    if stop then block = block:sub(1, stop) end
    block = "\n" .. block
    for _ in block:gmatch("\n[Rr][Ee][Cc][Ee][Ii][Vv][Ee][Dd][ \t]*:") do count = count + 1 end
  end
  return count > max, count
end

-- Status for an attempt that got no SMTP reply, by the client's token.
local NO_REPLY_STATUS = {
  refused = "4.4.1", timeout = "4.4.1", closed = "4.4.1", reset = "4.4.1", -- no answer from host
  dns = "4.4.3", -- directory server failure
  tls = "4.7.5", -- cryptographic failure (RFC 7672)
}

--- recipient(address, reply [, opts]) -> a recipient entry for build
-- reply: an SMTP reply or the client's error ({code, enhanced, text} or
-- {token, message} when there was no reply). The action follows the
-- reply's class (5xx failed, 4xx delayed, 2xx relayed) unless
-- opts.action says otherwise; the status is the reply's enhanced code
-- when it fits that class, else the class with .0.0 (for an attempt
-- without a reply, by the token: 4.4.1 no answer, 4.4.3 DNS, 4.7.5 TLS).
-- opts: action, remote_mta, orcpt, last_attempt, will_retry_until.
function M.recipient(address, reply, opts)
  opts = opts or {}
  assert(type(reply) == "table", "reply must be a table")
  local entry = { address = address, orcpt = opts.orcpt, remote_mta = opts.remote_mta,
                  last_attempt = opts.last_attempt, will_retry_until = opts.will_retry_until }
  local code = math.tointeger(reply.code)
  if code and code >= 200 and code <= 599 then
    local class = tostring(code // 100)
    entry.action = opts.action or ({ ["5"] = "failed", ["4"] = "delayed", ["2"] = "relayed" })[class]
    assert(entry.action, "reply code " .. code .. " is no final or temporary reply")
    class = ACTIONS[entry.action]
    local enh = reply.enhanced
    entry.status = (type(enh) == "string" and enh:sub(1, 1) == class and enh:match("^%d%.%d+%.%d+$"))
      and enh or (class .. ".0.0")
    local text = reply.text or (reply.lines and table.concat(reply.lines, " ")) or ""
    entry.diagnostic = ("smtp; %d %s%s"):format(code, reply.enhanced and (reply.enhanced .. " ") or "", text)
  else
    entry.action = opts.action or "delayed"
    local class = assert(ACTIONS[entry.action], "unknown action")
    local status = NO_REPLY_STATUS[reply.token] or "4.0.0"
    entry.status = class .. status:sub(2)
    entry.diagnostic = "X-luasmtp; " .. tostring(reply.message or reply.token or "delivery failed")
  end
  return entry
end

---------------------------------------------------------------------------
-- The original message

-- The header block of a string: up to the first empty line (a string
-- without one is all header), with CRLF line ends.
local function header_of_string(s)
  local stop = s:find("\r?\n\r?\n")
  local head
  if s:find("^\r?\n") then
    head = ""
  elseif stop then
    head = s:sub(1, stop - 1) .. "\n"
  else
    head = s
  end
  head = head:gsub("\r?\n", "\r\n")
  if head ~= "" and head:sub(-2) ~= "\r\n" then head = head .. "\r\n" end
  return head
end

-- A source for the original: {kind, size(), header(), chunks()}.
-- original: a string, an open file (read from its current position), or
-- an object with chunks([size]) (the server's message) and optional
-- size() and header (a header view with bytes()).
local function original_source(original)
  if type(original) == "string" then
    local text = original:gsub("\r?\n", "\r\n")
    return {
      size = function() return #text end,
      header = function() return header_of_string(text) end,
      chunks = function()
        local done = false
        return function()
          if done then return nil end
          done = true
          return text
        end
      end,
      eightbit = function() return not is_ascii(text) end,
      text = text,
    }
  end
  if io.type(original) == "file" then
    local start = assert(original:seek("cur"))
    local size = assert(original:seek("end")) - start
    assert(original:seek("set", start))
    local src = { size = function() return size end }
    function src.chunks()
      assert(original:seek("set", start))
      return function()
        return original:read(65536)
      end
    end
    function src.header()
      assert(original:seek("set", start))
      local buf = {}
      local n = 0
      for line in original:lines("L") do
        if line == "\n" or line == "\r\n" then break end
        n = n + #line
        if n > M.MAX_HEADER_BLOCK then break end
        buf[#buf + 1] = line
      end
      assert(original:seek("set", start))
      return header_of_string(table.concat(buf))
    end
    return src
  end
  assert(type(original) == "table" or type(original) == "userdata", "original must be a string, file or message")
  local src = {}
  function src.chunks() return original:chunks(65536) end
  function src.size()
    if type(original.size) == "number" then return original.size end
    if original.size then return original:size() end
    local n = 0
    for piece in original:chunks(65536) do n = n + #piece end
    return n
  end
  function src.header()
    if original.header and original.header.bytes then
      return header_of_string(original.header:bytes())
    end
    local buf, n = {}, 0
    for piece in original:chunks(65536) do
      buf[#buf + 1] = piece
      n = n + #piece
      local joined = table.concat(buf)
      if joined:find("\r?\n\r?\n") or n > M.MAX_HEADER_BLOCK then
        return header_of_string(joined:sub(1, M.MAX_HEADER_BLOCK))
      end
    end
    return header_of_string(table.concat(buf))
  end
  return src
end

---------------------------------------------------------------------------
-- Building a notice

local function boundary()
  return "dsn=" .. core.b64encode(core.random(18)):gsub("[+/=]", "_")
end

local function message_id(host, now)
  return ("<%s.%s@%s>"):format(os.date("!%Y%m%d%H%M%S", math.floor(now)),
    core.b64encode(core.random(12)):gsub("[+/=]", ""), host)
end

local SUMMARY = {
  failed = "could not be delivered",
  delayed = "has not been delivered yet; delivery is still being attempted",
  delivered = "was delivered",
  relayed = "was relayed to a system that sends no delivery notifications",
  expanded = "was delivered and forwarded on",
}

local function human_text(o, recipients, global)
  local lines = {
    "This is the mail system at " .. clean(o.reporting_mta, global) .. ".",
    "",
  }
  local any = {}
  for _, r in ipairs(recipients) do any[r.action] = true end
  if any.failed then
    lines[#lines + 1] = "Your message could not be delivered to one or more recipients."
    lines[#lines + 1] = "It is attached below."
  elseif any.delayed then
    lines[#lines + 1] = "Your message has not been delivered yet to one or more recipients."
    lines[#lines + 1] = "This is a warning only: no action is needed on your part."
  else
    lines[#lines + 1] = "Your message was delivered as you asked to be told."
  end
  lines[#lines + 1] = ""
  for _, r in ipairs(recipients) do
    lines[#lines + 1] = ("<%s>: %s"):format(clean(r.address, global), SUMMARY[r.action])
    if r.remote_mta then lines[#lines + 1] = "    host " .. clean(r.remote_mta, global) end
    if r.diagnostic then lines[#lines + 1] = "    said: " .. clean(r.diagnostic, global) end
    if r.will_retry_until then
      lines[#lines + 1] = "    delivery will be retried until " .. M.date(r.will_retry_until)
    end
  end
  lines[#lines + 1] = ""
  return table.concat(lines, "\r\n")
end

local function status_fields(o, recipients, global)
  local env = o.envelope
  local out = { field("Reporting-MTA", "dns; " .. clean(o.reporting_mta, global)) }
  if env.envid then out[#out + 1] = field("Original-Envelope-Id", clean(env.envid, global)) end
  local arrival = o.arrival_date or env.received_at
  if arrival then out[#out + 1] = field("Arrival-Date", M.date(arrival)) end
  out[#out + 1] = ""
  for _, r in ipairs(recipients) do
    if r.orcpt then
      local addr_type, addr = M.orcpt(r.orcpt)
      if addr_type then out[#out + 1] = field("Original-Recipient", address_field(addr, global, addr_type)) end
    end
    out[#out + 1] = field("Final-Recipient", address_field(r.address, global))
    out[#out + 1] = "Action: " .. r.action
    out[#out + 1] = "Status: " .. r.status
    if r.remote_mta then out[#out + 1] = field("Remote-MTA", "dns; " .. clean(r.remote_mta, global)) end
    if r.diagnostic then
      local diag = clean(r.diagnostic, global)
      if not diag:find("^[%w%-]+ *;") then diag = "smtp; " .. diag end
      out[#out + 1] = field("Diagnostic-Code", diag)
    end
    if r.last_attempt then out[#out + 1] = field("Last-Attempt-Date", M.date(r.last_attempt)) end
    if r.will_retry_until then out[#out + 1] = field("Will-Retry-Until", M.date(r.will_retry_until)) end
    out[#out + 1] = ""
  end
  return table.concat(out, "\r\n")
end

local function check_recipient(r, i)
  assert(type(r) == "table", "recipients[" .. i .. "] must be a table")
  assert(type(r.address) == "string" and r.address ~= "", "recipients[" .. i .. "].address missing")
  local class = ACTIONS[r.action]
  assert(class, "recipients[" .. i .. "].action must be failed, delayed, delivered, relayed or expanded")
  local status = r.status or (class .. ".0.0")
  assert(type(status) == "string" and status:match("^[245]%.%d%d?%d?%.%d%d?%d?$"),
    "recipients[" .. i .. "].status must be an enhanced status code")
  -- a recipient that failed after its last temporary error (the queue's
  -- lifetime ran out) keeps that 4.x.x status, as Postfix does
  local fits = status:sub(1, 1) == class or (r.action == "failed" and status:sub(1, 1) == "4")
  assert(fits, "recipients[" .. i .. "]: status " .. status .. " does not fit " .. r.action)
  local copy = {}
  for k, v in pairs(r) do copy[k] = v end
  copy.status = status
  return copy
end

--- build(opts) -> notice | nil, "null sender"
-- opts: original (the message: a string, or the header block alone; an
-- open file; or the server's message object), envelope = {from, envid,
-- ret = "full"|"hdrs", smtputf8, received_at (when arrival_date is not
-- given)}, recipients = {{address, orcpt,
-- action, status, remote_mta, diagnostic, last_attempt,
-- will_retry_until}} (times in seconds since the epoch), reporting_mta
-- (our host name), arrival_date, now (default os.time()),
-- max_original (default M.MAX_ORIGINAL).
--
-- notice: { from = "", to = { sender }, message = string or a function
-- returning chunks (when the original is a file or a message object and
-- is returned in full: it is streamed, never one string), size,
-- body_type = "7bit" | "8bitmime", message_id }.
function M.build(o)
  assert(type(o) == "table", "dsn.build needs a table")
  local env = assert(o.envelope, "dsn.build needs envelope")
  assert(type(env.from) == "string", "envelope.from must be a string")
  if env.from == "" or env.from == "<>" then return nil, "null sender" end
  assert(type(o.reporting_mta) == "string" and o.reporting_mta ~= "", "dsn.build needs reporting_mta")
  assert(type(o.recipients) == "table" and #o.recipients > 0, "dsn.build needs recipients")
  assert(o.original ~= nil, "dsn.build needs original")
  local recipients = {}
  local any_failed = false
  for i, r in ipairs(o.recipients) do
    recipients[i] = check_recipient(r, i)
    any_failed = any_failed or recipients[i].action == "failed"
  end
  local global = env.smtputf8 == true
  local now = o.now or os.time()
  local host = clean(o.reporting_mta, false)
  local src = original_source(o.original)
  local max_original = o.max_original or M.MAX_ORIGINAL

  -- RET=FULL is honoured only when something failed (RFC 3461 section
  -- 4.3) and the original is not too large; then the whole message.
  local ret = env.ret and env.ret:lower() or "hdrs"
  local full = ret == "full" and any_failed and src.size() <= max_original
  local head = not full and src.header() or nil

  local subject
  if any_failed then subject = "Undelivered Mail Returned to Sender"
  else
    local delayed = false
    for _, r in ipairs(recipients) do delayed = delayed or r.action == "delayed" end
    subject = delayed and "Delayed Mail (still being retried)" or "Successful Mail Delivery Report"
  end

  local b = boundary()
  local id = message_id(host, now)
  local to = clean(env.from, global)
  local human = human_text(o, recipients, global)
  local status = status_fields(o, recipients, global)
  local eightbit = global and (not is_ascii(human) or not is_ascii(status))
  local attached_type, attached_8bit
  if full then
    attached_type = global and "message/global" or "message/rfc822"
    attached_8bit = src.eightbit == nil or src.eightbit()
  else
    attached_type = global and "message/global-headers" or "text/rfc822-headers"
    attached_8bit = not is_ascii(head)
  end
  eightbit = eightbit or attached_8bit

  local top = table.concat({
    "From: Mail Delivery System <MAILER-DAEMON@" .. host .. ">",
    "To: <" .. to .. ">",
    "Subject: " .. subject,
    "Date: " .. M.date(now),
    "Message-ID: " .. id,
    "Auto-Submitted: auto-replied",
    "MIME-Version: 1.0",
    "Content-Type: multipart/report; report-type=delivery-status;",
    "\tboundary=\"" .. b .. "\"",
    "Content-Transfer-Encoding: " .. (eightbit and "8bit" or "7bit"),
    "",
    "This is a MIME-encapsulated message.",
    "",
    "--" .. b,
    "Content-Description: Notification",
    "Content-Type: text/plain; charset=" .. (global and "utf-8" or "us-ascii"),
    "Content-Transfer-Encoding: " .. ((global and not is_ascii(human)) and "8bit" or "7bit"),
    "",
    human,
    "--" .. b,
    "Content-Description: Delivery report",
    "Content-Type: " .. (global and "message/global-delivery-status" or "message/delivery-status"),
    "Content-Transfer-Encoding: " .. ((global and not is_ascii(status)) and "8bit" or "7bit"),
    "",
    status,
    "--" .. b,
    "Content-Description: " .. (full and "Undelivered Message" or "Message Headers"),
    "Content-Type: " .. attached_type,
    "Content-Transfer-Encoding: " .. (attached_8bit and "8bit" or "7bit"),
    "",
    "",
  }, "\r\n")
  local tail = "\r\n--" .. b .. "--\r\n"

  local notice = { from = "", to = { env.from }, message_id = id,
                   body_type = eightbit and "8bitmime" or "7bit" }
  if not full then
    notice.message = top .. head .. tail
  elseif src.text then
    notice.message = top .. src.text .. tail
  else
    -- streamed: the top, the original's chunks, the end
    notice.size = #top + src.size() + #tail
    local stage, nextchunk = 0, nil
    notice.message = function()
      if stage == 0 then
        stage, nextchunk = 1, src.chunks()
        return top
      end
      while stage == 1 do
        local piece = nextchunk()
        if piece == nil then
          stage = 2
          return tail
        end
        if piece ~= "" then return piece end
      end
      return nil
    end
  end
  return notice
end

---------------------------------------------------------------------------
-- Success notices for final delivery (RFC 3461 section 6.2)

-- The recipients of the envelope that asked NOTIFY=SUCCESS.
local function success_recipients(envelope)
  local list = {}
  for i, addr in ipairs(envelope.rcpt or {}) do
    local p = envelope.rcpt_params and envelope.rcpt_params[i] or {}
    if M.should_notify({ notify = p.notify }, "delivered", envelope.from) then
      list[#list + 1] = { address = addr, orcpt = p.orcpt }
    end
  end
  return list
end

--- success_notices(opts) -> plugin for the server's deliver phase
-- Put it after the store plugins (maildir, mbox, LMTP): it runs only
-- when they have stored the message, and sends one "delivered" notice
-- (status 2.0.0) to the sender for the recipients that asked
-- NOTIFY=SUCCESS. The server needs `dsn = true` to take the parameters.
-- opts: reporting_mta (host name; default the server's hostname),
-- queue (a luasmtp.queue: the notice is enqueued from the null sender)
-- or send (function(notice) that sends it, for a script without a
-- queue), action ("delivered", default; "relayed" for a store that is
-- a hand-over to a system without DSN).
function M.success_notices(opts)
  opts = opts or {}
  assert(opts.queue or opts.send, "success_notices needs queue or send")
  local action = opts.action or "delivered"
  assert(action == "delivered" or action == "relayed" or action == "expanded", "action must be a success action")
  local function send(session, notice)
    if opts.queue then
      return opts.queue:enqueue { from = "", rcpt = { { address = notice.to[1], notify = "NEVER" } },
                                  body = notice.message }
    end
    return opts.send(notice, session)
  end
  return {
    name = "dsn-success",
    deliver = function(session, message)
      local env = session.envelope or message.envelope
      if not env then return nil end
      local list = success_recipients(env)
      if #list == 0 then return nil end
      for _, r in ipairs(list) do
        r.action, r.status = action, "2.0.0"
      end
      local params = env.params or {}
      local notice = M.build {
        original = message,
        envelope = { from = env.from, envid = params.envid, ret = "hdrs", smtputf8 = params.smtputf8 },
        recipients = list,
        reporting_mta = opts.reporting_mta or (session.config and session.config.hostname) or "localhost",
        arrival_date = os.time(), -- stored as it arrived
      }
      if notice then
        local ok, err = send(session, notice)
        if not ok and session.log then
          -- the message is stored: a lost notice is logged, not a reason to refuse it
          session:log("warning", "success notice to <%s> not sent: %s", env.from, tostring(err))
        end
      end
      return nil
    end,
  }
end

return M
