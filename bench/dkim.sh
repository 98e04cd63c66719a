#!/bin/sh
# DKIM benchmark: sign and verify COUNT messages of 100 KB (rsa-sha256,
# relaxed/relaxed) with luasmtp, libopendkim (spec/opendkim_tool.c, in
# one process, keys from a file) and dkimpy (in one process, fewer
# rounds: it is slow), in the same run; messages per second and ratios.
#
#   sh bench/dkim.sh            COUNT=10000 PY_COUNT=300 by default
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export LUA_PATH_5_4="$root/lua/?.lua;$root/lua/?/init.lua;;"
export LUA_CPATH_5_4="$root/build/?.so;;"
COUNT=${COUNT:-10000}
PY_COUNT=${PY_COUNT:-300}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/r.pem" 2>/dev/null
gcc -std=c11 -D_GNU_SOURCE -O2 -o "$tmp/opendkim_tool" spec/opendkim_tool.c -lopendkim

# a 100 KB message: text lines with runs of spaces (work for relaxed)
lua5.4 - "$tmp" <<'LUA'
local dir = arg[1]
local core = require "luasmtp.core"
local dkim = require "luasmtp.dkim"
local lines = { "From: Joe <joe@example.org>", "To: Suzie <suzie@example.net>",
  "Subject: benchmark", "Date: Tue, 1 Dec 2026 12:00:00 +0000",
  "Message-ID: <bench@example.org>", "MIME-Version: 1.0", "" }
local n = 0
local seed = 1
while n < 100 * 1024 do
  local words = {}
  for i = 1, 12 do
    seed = (seed * 1103515245 + 12345) % 2147483648
    words[i] = ("w"):rep(1 + seed % 9)
  end
  local line = table.concat(words, (seed % 3 == 0) and "  " or " ")
  lines[#lines + 1] = line
  n = n + #line + 2
end
local message = table.concat(lines, "\r\n") .. "\r\n"
local f = assert(io.open(dir .. "/plain.eml", "wb")); f:write(message); f:close()
f = assert(io.open(dir .. "/r.pem", "rb")); local pem = f:read("a"); f:close()
local signed = dkim.sign_message(message, { domain = "example.org", selector = "r", key = pem })
f = assert(io.open(dir .. "/signed.eml", "wb")); f:write(signed); f:close()
local priv = core.dkim_privkey(pem)
f = assert(io.open(dir .. "/keys", "w"))
f:write("r._domainkey.example.org v=DKIM1; k=rsa; p=" .. core.b64encode(priv:public()) .. "\n")
f:close()
LUA

# time CMD... -> seconds of wall time; the output must say "pass" when verifying
seconds() {
  t0=$(date +%s.%N)
  "$@" > "$tmp/out"
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}
rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", n / s }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
check_pass() { grep -q '^pass' "$tmp/out" || { echo "$1 did not verify: $(cat "$tmp/out")" >&2; exit 1; }; }

echo "DKIM, $COUNT messages of 100 KB (dkimpy: $PY_COUNT), rsa-sha256 relaxed/relaxed, one process each."
printf '%-8s %12s %12s %12s %10s %10s\n' "" "luasmtp/s" "opendkim/s" "dkimpy/s" "vs opendkim" "vs dkimpy"
for op in verify sign; do
  if [ "$op" = verify ]; then
    s1=$(seconds lua5.4 bench/dkim.lua verify "$tmp/keys" "$tmp/signed.eml" "$COUNT"); check_pass luasmtp
    s2=$(seconds "$tmp/opendkim_tool" verify "$tmp/keys" "$tmp/signed.eml" "$COUNT"); check_pass opendkim
    s3=$(seconds /usr/bin/python3 spec/dkimpy_tool.py verify "$tmp/keys" "$tmp/signed.eml" "$PY_COUNT"); check_pass dkimpy
  else
    s1=$(seconds lua5.4 bench/dkim.lua sign "$tmp/r.pem" "$tmp/plain.eml" "$COUNT")
    s2=$(seconds "$tmp/opendkim_tool" sign "$tmp/r.pem" example.org r rsa-sha256 relaxed/relaxed "$tmp/plain.eml" "$COUNT")
    s3=$(seconds /usr/bin/python3 spec/dkimpy_tool.py sign "$tmp/r.pem" example.org r rsa-sha256 relaxed/relaxed "$tmp/plain.eml" "$PY_COUNT")
  fi
  r1=$(rate "$COUNT" "$s1"); r2=$(rate "$COUNT" "$s2"); r3=$(rate "$PY_COUNT" "$s3")
  printf '%-8s %12s %12s %12s %10s %10s\n' "$op" "$r1" "$r2" "$r3" "$(ratio "$r1" "$r2")" "$(ratio "$r1" "$r3")"
done
