#!/bin/sh
# Relay throughput through the queue with fsync on: submission over SMTP
# -> queue (durable enqueue) -> client into Postfix's smtp-sink, all on
# loopback (bench/queue_relay.lua). Prints messages/s and CPU ms per
# message, relaying while submitting and from a queue filled first.
# Postfix as the same relay is not measured here yet.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export LUA_PATH_5_4="$root/lua/?.lua;$root/lua/?/init.lua;;"
export LUA_CPATH_5_4="$root/build/?.so;;"
N=${N:-1000}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
user=$(id -u)
if [ "$user" -eq 0 ]; then sinkuser="-u postfix"; else sinkuser=""; fi
# shellcheck disable=SC2086 # one optional word
timeout 600 /usr/sbin/smtp-sink $sinkuser 127.0.0.1:"$port" 256 & sink=$!
trap 'kill "$sink" 2>/dev/null || true' EXIT
sleep 0.5
dir=$(mktemp -d)
printf '%-34s %12s %14s\n' "workload ($N messages, 4 KiB)" "messages/s" "cpu ms/msg"
printf '%-34s %12s %14s\n' "submit and relay, 8 sessions" $(lua5.4 bench/queue_relay.lua "$port" "$dir/q" "$N" 8)
printf '%-34s %12s %14s\n' "submit all, then relay" $(lua5.4 bench/queue_relay.lua "$port" "$dir/q" "$N" 8 "$N")
rm -rf "$dir"
