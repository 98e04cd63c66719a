#!/bin/sh
# Relay throughput through the queue with fsync on, luasmtp against
# Postfix as the same relay in the same run (bench/relay.py: smtp-source
# -> relay -> queue -> SMTP client -> smtp-sink, all on loopback).
# Prints one table: messages/s, their ratio, CPU ms per message of each
# relay, relaying while submitting and from a queue filled first.
#   N=2000 SESSIONS=8,32 SIZE=4096 CONNS=8 RUNS=2 sh bench/queue.sh
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
# the system's python3 when there is one: its pid is the benchmark's
py=$(command -v /usr/bin/python3 || command -v python3)
exec timeout 900 "$py" "$root/bench/relay.py"
