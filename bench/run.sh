#!/bin/sh
# Benchmarks. Each compares luasmtp against a peer in the same run, on the
# same machine and load generator, and reports the ratio: absolute numbers
# on a shared machine are noise, ratios much less so.
#
#   make bench            (builds first)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export LUA_PATH_5_4="$root/lua/?.lua;$root/lua/?/init.lua;;"
export LUA_CPATH_5_4="$root/build/?.so;;"

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

# run_echo NAME CMD... : start an echo server, drive it, print round trips/s
run_echo() {
  name=$1; shift
  port=$(free_port)
  "$@" "$port" 60 & pid=$!
  wait_port "$port"
  rate=$(lua5.4 bench/load.lua "$port" "$CONNS" "$ROUNDS" "$PIPELINE")
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  echo "$rate"
}

echo "Line echo server, loopback, one load generator (bench/load.lua)."
printf '%-28s %14s %14s %8s\n' "workload" "luasmtp/s" "asyncio/s" "ratio"
for spec in "1 20000 1" "50 1000 1" "50 500 10"; do
  set -- $spec
  CONNS=$1 ROUNDS=$2 PIPELINE=$3
  a=$(run_echo luasmtp lua5.4 bench/echo_server.lua)
  b=$(run_echo asyncio python3 bench/echo_server.py)
  printf '%-28s %14s %14s %8s\n' "conns=$CONNS pipeline=$PIPELINE" "$a" "$b" \
    "$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", a / b }')"
done
