#!/bin/sh
# Client benchmarks against Postfix's smtp-sink, with smtp-source as the
# reference load generator, in the same run:
#   1. MESSAGES messages of 1 KiB over 20 sessions: bench/client_load.lua
#      (luasmtp.client) vs smtp-source -d -s 20
#   2. one BIG_MB MB message from a file: bench/client_file.lua
#      (client.send with a file body) vs smtp-source -m 1 -l SIZE
#   3. luasmtp send -t with the same message on standard input, from the
#      file and through a pipe (cat: its CPU time is counted too)
# Wall time, CPU time (user + system) and peak RSS of the client process
# (GNU time, which takes them from wait4's rusage).
#
#   sh bench/client.sh   (MESSAGES=20000 BIG_MB=200 RUNS=3 by default)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export LUA_PATH_5_4="$root/lua/?.lua;$root/lua/?/init.lua;;"
export LUA_CPATH_5_4="$root/build/?.so;;"
MESSAGES=${MESSAGES:-20000}
BIG_MB=${BIG_MB:-200}
RUNS=${RUNS:-3}

for cmd in smtp-source smtp-sink; do
  command -v $cmd >/dev/null 2>&1 || { echo "$cmd not installed (Debian package postfix): client benchmark skipped"; exit 0; }
done
[ -x /usr/bin/time ] || { echo "/usr/bin/time not installed (Debian package time): client benchmark skipped"; exit 0; }

tmp=$(mktemp -d)
sink_pid=""
cleanup() {
  # "|| true": under set -e, dash exits from the trap with the status of
  # a wait for the killed sink (143)
  [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null && { wait "$sink_pid" 2>/dev/null || true; }
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
wait_port() {
  i=0
  while ! python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 100 ] && { echo "port $1 did not open" >&2; exit 1; }
    sleep 0.05
  done
}

port=$(free_port)
sink_user=""
[ "$(id -u)" -eq 0 ] && sink_user="-u nobody"
# shellcheck disable=SC2086
smtp-sink $sink_user "127.0.0.1:$port" 1024 & sink_pid=$!
wait_port "$port"

# measure CMD... -> "wall cpu maxrss_kb" (best wall time of RUNS)
measure() {
  best=""
  for _ in $(seq "$RUNS"); do
    timeout 600 /usr/bin/time -f "%e %U %S %M" -o "$tmp/time" "$@" >/dev/null 2>"$tmp/err" || {
      echo "failed: $*" >&2; cat "$tmp/err" >&2; exit 1; }
    r=$(awk '{ printf "%.2f %.2f %d", $1, $2 + $3, $4 }' "$tmp/time")
    if [ -z "$best" ] || [ "$(echo "${r%% *} < ${best%% *}" | bc)" -eq 1 ]; then best=$r; fi
  done
  echo "$best"
}


printf '%-34s %9s %9s %9s %10s %s\n' "client workload" "wall s" "cpu s" "RSS KiB" "rate" "ratio (smtp-source / luasmtp wall)"

l=$(measure lua5.4 bench/client_load.lua "$port" 20 "$MESSAGES" 1024)
s=$(measure smtp-source -d -s 20 -m "$MESSAGES" -l 1024 "127.0.0.1:$port")
set -- $l; lw=$1; lc=$2; lm=$3
set -- $s; sw=$1; sc=$2; sm=$3
printf '%-34s %9s %9s %9s %8.0f/s\n' "$MESSAGES x 1 KiB, 20 sessions" "$lw" "$lc" "$lm" "$(echo "$MESSAGES / $lw" | bc -l)"
printf '%-34s %9s %9s %9s %8.0f/s %.2f\n' "  smtp-source -d -s 20" "$sw" "$sc" "$sm" "$(echo "$MESSAGES / $sw" | bc -l)" \
  "$(echo "$sw / $lw" | bc -l)"

# A text message with lines of varying length, some starting with a dot.
big="$tmp/big.eml"
python3 - "$big" "$BIG_MB" <<'PY'
import sys
path, mb = sys.argv[1], int(sys.argv[2])
head = b"From: <bench@example.org>\r\nTo: <sink@example.org>\r\nSubject: big\r\n\r\n"
lines = [(b"." if i % 50 == 0 else b"") + b"%06d " % i + b"abcdefghij" * (i % 8) + b"\r\n" for i in range(400)]
block = b"".join(lines)
with open(path, "wb") as f:
    f.write(head)
    n = (mb * 1000 * 1000) // len(block)
    for _ in range(n):
        f.write(block)
PY
size=$(stat -c %s "$big")
mbytes=$(echo "$size / 1000000" | bc -l)

l=$(measure lua5.4 bench/client_file.lua "$port" "$big")
s=$(measure smtp-source -m 1 -l "$size" "127.0.0.1:$port")
set -- $l; lw=$1; lc=$2; lm=$3
set -- $s; sw=$1; sc=$2; sm=$3
printf '%-34s %9s %9s %9s %6.0f MB/s\n' "$BIG_MB MB file body, client.send" "$lw" "$lc" "$lm" "$(echo "$mbytes / $lw" | bc -l)"
printf '%-34s %9s %9s %9s %6.0f MB/s %.2f\n' "  smtp-source -m 1 -l $size" "$sw" "$sc" "$sm" "$(echo "$mbytes / $sw" | bc -l)" \
  "$(echo "$sw / $lw" | bc -l)"

measure_stdin() { # like measure, the big message on standard input
  best=""
  for _ in $(seq "$RUNS"); do
    timeout 600 /usr/bin/time -f "%e %U %S %M" -o "$tmp/time" "$@" <"$big" >/dev/null 2>"$tmp/err" || {
      echo "failed: $*" >&2; cat "$tmp/err" >&2; exit 1; }
    r=$(awk '{ printf "%.2f %.2f %d", $1, $2 + $3, $4 }' "$tmp/time")
    if [ -z "$best" ] || [ "$(echo "${r%% *} < ${best%% *}" | bc)" -eq 1 ]; then best=$r; fi
  done
  echo "$best"
}
l=$(measure_stdin lua5.4 bin/luasmtp send -t -i --tls none --server "127.0.0.1:$port")
set -- $l; lw=$1; lc=$2; lm=$3
printf '%-34s %9s %9s %9s %6.0f MB/s\n' "luasmtp send -t, $BIG_MB MB on stdin" "$lw" "$lc" "$lm" "$(echo "$mbytes / $lw" | bc -l)"
l=$(measure sh -c "cat '$big' | lua5.4 bin/luasmtp send -t -i --tls none --server 127.0.0.1:$port")
set -- $l; lw=$1; lc=$2; lm=$3
printf '%-34s %9s %9s %9s %6.0f MB/s\n' "  the same through a pipe" "$lw" "$lc" "$lm" "$(echo "$mbytes / $lw" | bc -l)"
