--- luasmtp send [OPTIONS] [RECIPIENT...] < message
--
-- A sendmail-compatible submission command on luasmtp.client: the
-- message comes on standard input, recipients as arguments and/or (-t)
-- from its To, Cc and Bcc headers (the Bcc header is removed).
--
-- Exit status (sysexits.h): 0 every recipient accepted; 64 usage error;
-- 65 bad message or address; 69 permanent failure (5xx, a needed
-- extension missing); 75 temporary failure (4xx, network, timeout, TLS);
-- 76 protocol error; 77 authentication refused. With some recipients
-- refused: 69 when one was refused permanently, else 75. Each refused
-- recipient is reported on standard error with the server's reply.
local getopt = require "luasmtp.getopt"
local client = require "luasmtp.client"
local net = require "luasmtp.net"
local send_mx = require "luasmtp.cli.send_mx"

local M = {}

local EX_OK, EX_USAGE, EX_DATAERR, EX_UNAVAILABLE = 0, 64, 65, 69
local EX_TEMPFAIL, EX_PROTOCOL, EX_NOPERM = 75, 76, 77

local USAGE = [[
usage: luasmtp send [OPTIONS] [RECIPIENT...] < message

sendmail options:
  -f FROM, -r FROM    envelope sender (default: the From: header, else USER@HOST);
                      "<>" or "" is the null sender, <a@b> is a@b
  -t                  take recipients from To:, Cc: and Bcc: (Bcc: is removed)
  -i, -oi             a line with a single "." does not end the message
  -v                  print the SMTP transcript on stderr (credentials masked)
  -N NOTIFY           DSN: never, or success,failure,delay
  -R full|hdrs        DSN: what to return
  -V ENVID            DSN: envelope identifier
  -F NAME, -o..., -B... accepted and ignored
options:
  --server HOST[:PORT]  server (default localhost; port 465 for implicit TLS,
                        24 for LMTP, 587 with --user, else 25); or /PATH (or
                        unix:/PATH), a UNIX-domain socket (then --tls none by default)
  --tls MODE            implicit | starttls (default) | opportunistic | none | auto
  --user USER           authenticate as USER; the password comes from
  --password-file FILE  its first line, or the environment variable LUASMTP_PASSWORD
  --auth MECH           use this SASL mechanism (default: the strongest offered)
  --allow-plaintext-auth  allow PLAIN/LOGIN without TLS
  --cafile FILE         trust these CA certificates (default: the system store)
  --insecure            do not verify the server's certificate
  --lmtp                speak LMTP (LHLO, one reply per recipient)
  --helo NAME           name for EHLO/LHLO
  --timeout SECONDS     scale down every time limit to at most SECONDS
  --help
]] .. send_mx.USAGE

local LONG = {
  server = "string", tls = "string", user = "string", ["password-file"] = "string",
  auth = "string", ["allow-plaintext-auth"] = "flag", cafile = "string", insecure = "flag",
  lmtp = "flag", helo = "string", timeout = "number", help = "flag", from = "string",
}
for k, v in pairs(send_mx.LONG) do LONG[k] = v end

local IGNORED = { ["-bm"] = true, ["-em"] = true, ["-U"] = true, ["-m"] = true }

local usage_error = getopt.usage_error

-- sendmail's short options (-f, -t, -i, -oi, ...).
local function short_option(a, take_value, opts)
  if a:match("^%-[tiv]+$") then
    for c in a:sub(2):gmatch(".") do
      if c == "t" then opts.t = true elseif c == "i" then opts.i = true else opts.v = true end
    end
  elseif a:match("^%-[frFNRVB]") then
    local letter, attached = a:sub(2, 2), a:sub(3)
    local v = take_value("-" .. letter, attached)
    if letter == "f" or letter == "r" then
      opts.from = v
    elseif letter == "N" then
      opts.notify = v
    elseif letter == "R" then
      opts.ret = v
    elseif letter == "V" then
      opts.envid = v
    end -- -F full name and -B body type: accepted, ignored
  elseif a:match("^%-o") then
    if a == "-oi" then opts.i = true end -- -oem, -odi, -oee...: ignored
  elseif IGNORED[a] then
    opts.ignored = true -- sendmail's defaults or no-ops
  else
    usage_error("unknown option " .. a)
  end
end

-- An address given on the command line: one pair of angle brackets is
-- taken off, as sendmail does, so "<a@b.example>" is a@b.example and
-- "<>", like "", the null sender.
local function argument_address(a)
  return a:match("^<(.*)>$") or a
end

-- Split argv into long options, sendmail options and recipients.
local function parse_args(args)
  local opts, rcpts = getopt.parse(args, LONG, short_option)
  if opts.from then opts.from = argument_address(opts.from) end
  for i, r in ipairs(rcpts) do rcpts[i] = argument_address(r) end
  opts.rcpts = rcpts
  return opts
end

---------------------------------------------------------------------------
-- Messages

-- The header section (up to the first empty line) and the rest.
local function split_header(msg)
  local pos = 1
  while pos <= #msg do
    local eol = msg:find("\n", pos, true)
    local line_end = eol or #msg
    local line = msg:sub(pos, line_end):gsub("\r?\n$", "")
    if line == "" then
      return msg:sub(1, pos - 1), msg:sub(pos)
    end
    if not eol then break end
    pos = eol + 1
  end
  return msg, ""
end

-- Header fields as { name =, text = (the raw lines), value = unfolded }.
local function header_fields(header)
  local fields = {}
  for line in header:gmatch("[^\n]*\n?") do
    if line ~= "" then
      if line:match("^[ \t]") and #fields > 0 then
        local f = fields[#fields]
        f.text = f.text .. line
        f.value = f.value .. line:gsub("\r?\n$", "")
      else
        local name, value = line:match("^([^:%s]+):(.*)$")
        fields[#fields + 1] = { name = name and name:lower(), text = line,
          value = (value or ""):gsub("\r?\n$", "") }
      end
    end
  end
  return fields
end

-- The addresses of an RFC 5322 address list: comments dropped, display
-- names dropped, groups flattened.
local function address_list(s)
  -- drop comments, outside quoted strings
  local out, depth, quoted, i = {}, 0, false, 1
  while i <= #s do
    local c = s:sub(i, i)
    if c == "\\" and (quoted or depth > 0) then
      if depth == 0 then out[#out + 1] = s:sub(i, i + 1) end
      i = i + 1
    elseif quoted then
      out[#out + 1] = c
      if c == '"' then quoted = false end
    elseif c == "(" then
      depth = depth + 1
    elseif c == ")" and depth > 0 then
      depth = depth - 1
    elseif depth == 0 then
      if c == '"' then quoted = true end
      out[#out + 1] = c
    end
    i = i + 1
  end
  s = table.concat(out)
  local addrs, cur = {}, {}
  quoted = false
  local angle = false
  local function push()
    local item = table.concat(cur):match("^%s*(.-)%s*$")
    cur = {}
    local inner = item:match("<([^>]*)>")
    local addr = inner and inner:match("^%s*(.-)%s*$") or item
    addr = addr:gsub("^@[^:]*:", "") -- an obsolete source route
    if addr ~= "" then addrs[#addrs + 1] = addr end
  end
  i = 1
  while i <= #s do
    local c = s:sub(i, i)
    if quoted then
      cur[#cur + 1] = c
      if c == "\\" then
        cur[#cur + 1] = s:sub(i + 1, i + 1)
        i = i + 1
      elseif c == '"' then
        quoted = false
      end
    elseif c == '"' then
      quoted = true
      cur[#cur + 1] = c
    elseif c == "<" then
      angle = true
      cur[#cur + 1] = c
    elseif c == ">" then
      angle = false
      cur[#cur + 1] = c
    elseif (c == "," or c == ";") and not angle then
      push()
    elseif c == ":" and not angle then
      cur = {} -- a group's display name
    else
      cur[#cur + 1] = c
    end
    i = i + 1
  end
  push()
  return addrs
end

M.address_list = address_list

-- Without -i, a line holding a single "." ends the input (sendmail).
local function cut_at_dot(msg)
  if msg:match("^%.\r?\n") or msg == "." then
    return ""
  end
  local pos = msg:find("\n%.\r?\n") or msg:find("\n%.$")
  if pos then
    return msg:sub(1, pos)
  end
  return msg
end

local function default_sender()
  local user = os.getenv("USER") or os.getenv("LOGNAME") or "root"
  local host
  local f = io.open("/proc/sys/kernel/hostname", "r")
  if f then
    host = f:read("l")
    f:close()
  end
  return user .. "@" .. ((host and host ~= "") and host or "localhost")
end

---------------------------------------------------------------------------
-- Exit status

local function status_for(token, err)
  if token == "invalid" then
    return EX_DATAERR
  elseif token == "auth" then
    return (err and err.code and err.code < 500) and EX_TEMPFAIL or EX_NOPERM
  elseif token == "protocol" then
    return EX_PROTOCOL
  elseif token == "smtp" then
    return (err and err.permanent) and EX_UNAVAILABLE or EX_TEMPFAIL
  elseif token == "unsupported" or token == "size" then
    return EX_UNAVAILABLE
  end
  return EX_TEMPFAIL
end

local function report(msg)
  io.stderr:write("luasmtp send: ", msg, "\n")
end

local function report_recipients(result)
  local permanent = false
  for _, entry in ipairs(result.recipients) do
    if not entry.ok then
      if entry.reply then
        report(("<%s>: %s"):format(entry.address, client.format_reply(entry.reply)))
      else
        report(("<%s>: %s"):format(entry.address, tostring(entry.error or "not delivered")))
      end
      if entry.permanent then permanent = true end
    end
  end
  return permanent
end

local function read_password(opts)
  if opts["password-file"] then
    local f, err = io.open(opts["password-file"], "r")
    if not f then usage_error("cannot read the password file: " .. tostring(err)) end
    local pw = f:read("l")
    f:close()
    if not pw or pw == "" then usage_error("the password file is empty: " .. opts["password-file"]) end
    return pw
  end
  local pw = os.getenv("LUASMTP_PASSWORD")
  if not pw or pw == "" then
    usage_error("--user needs --password-file or the environment variable LUASMTP_PASSWORD")
  end
  return pw
end

local function run(args)
  local opts = parse_args(args)
  if opts.help then
    io.stdout:write(USAGE)
    return EX_OK
  end
  local tls = opts.tls or "starttls"
  local modes = { implicit = true, starttls = true, opportunistic = true, none = true, auto = true }
  if not modes[tls] then usage_error("--tls must be implicit, starttls, opportunistic, none or auto") end
  local server = opts.server or "localhost"
  local host, port
  -- a UNIX-domain socket: "/path" or "unix:/path"; TLS off unless asked for
  local path = server:match("^unix:(/.*)$") or server:match("^/.*$")
  if path then
    if tls == "auto" then usage_error("--tls auto needs HOST[:PORT], not a socket path") end
    tls = opts.tls or "none"
  else
    host, port = net.parse_address(server, 25)
    if not host then usage_error("bad --server: " .. server) end
    if not server:find(":%d+$") then port = nil end
    if not port and tls ~= "auto" then
      port = tls == "implicit" and 465 or opts.lmtp and 24 or opts.user and 587 or 25
    end
  end
  if opts.auth and not opts.user then usage_error("--auth needs --user") end
  if opts.helo and not opts.helo:find("^[%w%.%-%[%]:]+$") then usage_error("bad --helo name") end
  if opts.ret and not (opts.ret:lower() == "full" or opts.ret:lower() == "hdrs") then
    usage_error("-R must be full or hdrs")
  end
  local auth
  if opts.user then
    auth = { user = opts.user, password = read_password(opts), mechanism = opts.auth,
      allow_plaintext = opts["allow-plaintext-auth"] }
  end
  if not opts.t and #opts.rcpts == 0 then
    usage_error("no recipients (give them as arguments or use -t)")
  end

  local msg = io.stdin:read("a") or ""
  if not opts.i then msg = cut_at_dot(msg) end
  local rcpts = {}
  for _, r in ipairs(opts.rcpts) do rcpts[#rcpts + 1] = r end
  local header, rest = split_header(msg)
  local fields = header_fields(header)
  if opts.t then
    local kept = {}
    for _, f in ipairs(fields) do
      if f.name == "to" or f.name == "cc" or f.name == "bcc" then
        for _, a in ipairs(address_list(f.value)) do rcpts[#rcpts + 1] = a end
      end
      if f.name ~= "bcc" then kept[#kept + 1] = f.text end
    end
    msg = table.concat(kept) .. rest
    if #rcpts == 0 then
      report("no recipients in the To:, Cc: or Bcc: headers")
      return EX_DATAERR
    end
  end
  local seen, unique = {}, {}
  for _, r in ipairs(rcpts) do
    if not seen[r] then
      seen[r] = true
      unique[#unique + 1] = r
    end
  end
  rcpts = unique
  local from = opts.from
  if not from then
    for _, f in ipairs(fields) do
      if f.name == "from" then
        from = address_list(f.value)[1]
        break
      end
    end
    from = from or default_sender()
  end
  if msg == "" then
    report("empty message")
    return EX_DATAERR
  end

  local timeouts
  if opts.timeout then
    timeouts = {}
    for k, v in pairs(client.DEFAULT_TIMEOUTS) do timeouts[k] = math.min(v, opts.timeout) end
  end
  local transcript
  if opts.v then
    transcript = function(direction, line)
      local prefix = direction == "C" and ">>> " or direction == "S" and "<<< " or "--- "
      io.stderr:write(prefix, line, "\n")
    end
  end
  local dsn
  if opts.notify or opts.ret or opts.envid then
    dsn = { notify = opts.notify, ret = opts.ret, envid = opts.envid }
  end

  if opts.mx then
    return send_mx.deliver(opts, { from = from, to = rcpts, body = msg, dsn = dsn, helo = opts.helo,
      timeouts = timeouts, transcript = transcript })
  end
  local res, token, err = client.send {
    host = host,
    port = port,
    path = path,
    tls = tls,
    cafile = opts.cafile,
    insecure = opts.insecure,
    lmtp = opts.lmtp,
    helo = opts.helo,
    auth = auth,
    timeouts = timeouts,
    transcript = transcript,
    from = from,
    to = rcpts,
    body = msg,
    dsn = dsn,
  }
  if res then
    if res.ok then return EX_OK end
    local permanent = report_recipients(res)
    return permanent and EX_UNAVAILABLE or EX_TEMPFAIL
  end
  if err and err.result and err.stage == "rcpt" then
    -- every recipient refused: as for some, a permanent refusal decides
    return report_recipients(err.result) and EX_UNAVAILABLE or EX_TEMPFAIL
  end
  report(tostring(err and err.message or token))
  return status_for(token, err)
end

function M.main(args)
  local ok, res = pcall(run, args)
  if ok then return res end
  if type(res) == "table" and res.usage then
    io.stderr:write("luasmtp send: ", res.message, "\n", USAGE)
    return EX_USAGE
  end
  error(res, 0)
end

return M
