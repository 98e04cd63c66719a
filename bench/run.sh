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

# SMTP: Postfix's smtp-source (20 sessions, 10,000 messages of 1 KiB)
# against examples/sink.lua (Lua hooks on MAIL, RCPT and DATA) and
# against Postfix's smtp-sink, with a new connection per message and with
# reused connections (-d). RUNS alternating runs each, the best kept.
RUNS=${RUNS:-3}
if command -v smtp-source >/dev/null 2>&1 && command -v smtp-sink >/dev/null 2>&1; then
  sink_user=""
  [ "$(id -u)" -eq 0 ] && sink_user="-u nobody"
  run_once() { # run_once PORT SOURCE-ARGS... -> seconds
    port=$1; shift
    t0=$(date +%s.%N)
    timeout 120 smtp-source "$@" -s 20 -m 10000 -l 1024 "127.0.0.1:$port" || { echo "smtp-source failed" >&2; exit 1; }
    echo "$(date +%s.%N) - $t0" | bc
  }
  # CPU time (user + system, seconds) a process has used so far, from
  # /proc: far less noisy than wall time on a shared machine.
  cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.4f", ($14 + $15) / hz }' "/proc/$1/stat"; }
  min() { if [ -z "$1" ] || [ "$(echo "$2 < $1" | bc)" -eq 1 ]; then echo "$2"; else echo "$1"; fi; }
  echo
  echo "SMTP sink, smtp-source -s 20 -m 10000 -l 1024 (messages/s, best of $RUNS alternating runs)."
  printf '%-28s %14s %14s %8s %12s %12s\n' "workload" "luasmtp" "smtp-sink" "ratio" "cpu us/msg" "sink us/msg"
  for mode in "new connection per message:" "reused connections:-d"; do
    label=${mode%%:*}; flag=${mode#*:}
    lport=$(free_port)
    lua5.4 bin/luasmtp serve examples/sink.lua --listen "127.0.0.1:$lport" --lifetime 300 2>/dev/null & lpid=$!
    pport=$(free_port)
    # shellcheck disable=SC2086
    smtp-sink $sink_user "127.0.0.1:$pport" 1024 & ppid=$!
    wait_port "$lport"; wait_port "$pport"
    # Alternate the two servers so drifting load on a shared machine
    # hits both alike; keep the best run of each.
    lt=""; pt=""
    lc0=$(cpu_of "$lpid"); pc0=$(cpu_of "$ppid")
    for _ in $(seq "$RUNS"); do
      # shellcheck disable=SC2086
      lt=$(min "$lt" "$(run_once "$lport" $flag)")
      # shellcheck disable=SC2086
      pt=$(min "$pt" "$(run_once "$pport" $flag)")
    done
    # server CPU per message over all runs, in microseconds
    lcpu=$(echo "($(cpu_of "$lpid") - $lc0) * 1000000 / ($RUNS * 10000)" | bc -l)
    pcpu=$(echo "($(cpu_of "$ppid") - $pc0) * 1000000 / ($RUNS * 10000)" | bc -l)
    kill "$lpid" "$ppid" 2>/dev/null || true
    wait "$lpid" "$ppid" 2>/dev/null || true
    printf '%-28s %14.0f %14.0f %8.2f %12.1f %12.1f\n' "$label" "$(echo "10000 / $lt" | bc -l)" \
      "$(echo "10000 / $pt" | bc -l)" "$(echo "$pt / $lt" | bc -l)" "$lcpu" "$pcpu"
  done
else
  echo "smtp-source/smtp-sink not installed (Debian package postfix): SMTP benchmark skipped"
fi

# Memory: peak RSS growth of a Maildir server with 100 MB bodies by DATA
# and BDAT, and five unfinished 20 MB BDAT bodies (bench/memory.py).
echo
python3 bench/memory.py
echo; python3 bench/idle_memory.py # RSS per idle session after EHLO, plain and TLS

# DKIM sign and verify against libopendkim and dkimpy (bench/dkim.sh).
if [ -f /usr/include/opendkim/dkim.h ] && /usr/bin/python3 -c 'import dkim' 2>/dev/null; then
  echo
  sh bench/dkim.sh
else
  echo "libopendkim-dev or python3-dkim not installed: DKIM benchmark skipped"
fi

# The client (luasmtp.client, luasmtp send) into smtp-sink, against
# smtp-source (bench/client.sh).
echo
sh bench/client.sh

# Relay through the queue, fsync on, against Postfix as the same relay (bench/queue.sh).
echo
sh bench/queue.sh
