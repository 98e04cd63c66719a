--- Built-in plugin: the Received header (RFC 5321 section 4.4), an edit
-- of the header view made when the header block ends.
local core = require "luasmtp.core"

local next_id = 0

local function message_id(s)
  next_id = next_id + 1
  return ("%x%04x.%d"):format(math.floor(core.time()), next_id % 0x10000, s.id)
end

return function()
  return {
    name = "received",
    headers = function(s, message)
      local with = s.config.lmtp and "LMTP" or (s.esmtp and "ESMTP" or "SMTP")
      if s.tls then with = with .. "S" end
      if s.user then with = with .. "A" end
      local info = s.tls and s.sock:tlsinfo()
      local tlsnote = info and (" (%s %s)"):format(info.version, info.cipher) or ""
      local rcpt = message.rcpt
      local for_clause = #rcpt == 1 and ("\r\n\tfor <%s>"):format(rcpt[1]) or ""
      -- TCP-info only for a TCP client (RFC 5321 4.4), not over a UNIX socket
      local tcp_info = s.client_port and (" ([%s])"):format(s.client_address) or ""
      message.header:prepend("Received", ("from %s%s\r\n\tby %s with %s id %s%s%s;\r\n\t%s"):format(
        s.helo_name or "unknown", tcp_info, s.config.hostname, with,
        message_id(s), tlsnote, for_clause, os.date("!%a, %d %b %Y %H:%M:%S +0000")))
    end,
  }
end
