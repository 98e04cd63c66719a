#!/bin/sh
# Benchmarks (make bench). Installs what they need, then bench/table.py
# measures luasmtp against other software in the same run, on the same
# machine and load generators, and prints one table of ratios (absolute
# numbers on a shared machine are noise, ratios much less so). See
# BENCHMARKS.md for what each row measures and how to read it.
#
#   make bench                      (installs, builds, runs this)
#   BENCH_QUICK=1 sh bench/run.sh   small counts, one run: for development
#   RUNS=5 sh bench/run.sh          alternating runs per measurement (3)
#
# Debian packages: scripts/deps.sh --bench. The npm packages Haraka and
# smtp-server (versions in bench/package-lock.json) go into
# build/bench/node, never into the global npm directory; a changed lock
# file reinstalls them.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export LUA_PATH_5_4="$root/lua/?.lua;$root/lua/?/init.lua;;"
export LUA_CPATH_5_4="$root/build/?.so;;"

sh scripts/deps.sh --bench
make --no-print-directory -s all

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  sh scripts/deps.sh nodejs npm ||
    echo "bench: Node.js and npm could not be installed: Haraka and smtp-server are left out" >&2
fi

node_dir=$root/build/bench/node
export BENCH_NODE_DIR="$node_dir"
if command -v npm >/dev/null 2>&1 && ! cmp -s bench/package-lock.json "$node_dir/installed.lock"; then
  echo "bench: installing Haraka and smtp-server into $node_dir" >&2
  rm -rf "$node_dir"
  mkdir -p "$node_dir"
  cp bench/package.json bench/package-lock.json "$node_dir/"
  # npm ci: exactly the lock file's versions; no install scripts (only
  # an optional syslog binding of Haraka's has one)
  if (cd "$node_dir" && timeout 900 npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >&2); then
    cp bench/package-lock.json "$node_dir/installed.lock"
  else
    echo "bench: npm ci failed: Haraka and smtp-server are left out" >&2
  fi
fi

status=0
/usr/bin/python3 bench/table.py || status=$?
exit $status
