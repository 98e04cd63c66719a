#!/bin/sh
# The cost per connection of the limits plugin's store: kv.memory vs
# kv.redis (a private redis-server on a UNIX socket). smtp-source sends
# MESSAGES messages over SESSIONS parallel sessions, one connection per
# message; prints wall time and the CPU (user + system) of the server
# and of redis-server per connection.
#
#   sh bench/kv_store.sh [MESSAGES] [SESSIONS]
set -eu
cd "$(dirname "$0")/.."
MESSAGES=${1:-5000}
SESSIONS=${2:-20}
export LUA_PATH_5_4="$PWD/lua/?.lua;$PWD/lua/?/init.lua;;"
export LUA_CPATH_5_4="$PWD/build/?.so;;"
tmp=$(mktemp -d /tmp/luasmtp-kvbench-XXXXXX)
rpid=""
cleanup() {
  [ -n "$rpid" ] && kill "$rpid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
redis-server --port 0 --unixsocket "$tmp/redis.sock" --unixsocketperm 700 --save '' \
  --appendonly no --dir "$tmp" --logfile '' >"$tmp/redis.log" 2>&1 &
rpid=$!
i=0
while [ ! -S "$tmp/redis.sock" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done

# user + system ticks of a process
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

for kind in memory redis; do
  lua5.4 bench/kv_store.lua "$kind" "$tmp/redis.sock" >"$tmp/port" 2>"$tmp/server.log" &
  spid=$!
  i=0
  while [ ! -s "$tmp/port" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
  port=$(head -n1 "$tmp/port")
  s0=$(ticks "$spid"); r0=$(ticks "$rpid")
  t0=$(date +%s.%N)
  /usr/sbin/smtp-source -s "$SESSIONS" -m "$MESSAGES" -f a@client.test -t b@sink.test "127.0.0.1:$port"
  t1=$(date +%s.%N)
  s1=$(ticks "$spid"); r1=$(ticks "$rpid")
  kill -TERM "$spid"; wait "$spid" || true
  echo "$kind" "$t0" "$t1" "$s0" "$s1" "$r0" "$r1" | awk -v n="$MESSAGES" -v hz="$hz" '{
    wall = $3 - $2; srv = ($5 - $4) / hz; red = ($7 - $6) / hz
    printf "%-6s  %5d connections  wall %6.2f s (%6.0f conn/s)  server CPU %5.1f us/conn  redis CPU %5.1f us/conn\n",
      $1, n, wall, n / wall, srv / n * 1e6, red / n * 1e6 }'
  cat "$tmp/server.log"
  rm -f "$tmp/port"
done
