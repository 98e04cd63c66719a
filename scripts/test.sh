#!/bin/sh
# Run the test suite: busted (Lua 5.4, TAP output) over spec/, then
# luacheck, and finish with the line "N passed, M failed", or
# "N passed, M failed, K skipped" when tests were skipped (busted's
# pending tests: only for the optional capabilities the README names).
#
# Usage: scripts/test.sh [MODULE_DIR]
#   MODULE_DIR holds luasmtp/core.so (default: build). It and lua/ come
#   first on the module search paths, ahead of anything installed.
#
# Exits non-zero when any test fails, when busted fails, crashes or runs
# past the time limit (counted as a failure too), or when no test ran.
# Extra busted arguments may be given in BUSTED_ARGS (e.g. "--filter=TLS"),
# the time limit in TEST_TIMEOUT (seconds, default 900).
set -u

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
moddir=${1:-build}
case $moddir in /*) ;; *) moddir=$root/$moddir ;; esac

if [ ! -f "$moddir/luasmtp/core.so" ]; then
  echo "test.sh: $moddir/luasmtp/core.so not found (run make first)" >&2
  echo "0 passed, 1 failed"
  exit 1
fi

# Lua 5.4 reads the _5_4 variables in preference to the plain ones; ";;"
# appends the default paths (busted, luassert, dkjson, ./?.lua ...).
LUA_PATH_5_4="$root/lua/?.lua;$root/lua/?/init.lua;;"
LUA_CPATH_5_4="$moddir/?.so;;"
LUA_PATH=$LUA_PATH_5_4
LUA_CPATH=$LUA_CPATH_5_4
export LUA_PATH_5_4 LUA_CPATH_5_4 LUA_PATH LUA_CPATH

tap=$(mktemp)
rcfile=$(mktemp)
trap 'rm -f "$tap" "$rcfile"' EXIT

# Stream the TAP output while keeping a copy to count it. The exit code
# of busted travels through a file since the pipeline hides it.
# shellcheck disable=SC2086 # BUSTED_ARGS is a list of words
{
  timeout -k 10 "${TEST_TIMEOUT:-900}" busted --lua=lua5.4 -o TAP ${BUSTED_ARGS:-} spec 2>&1
  echo $? >"$rcfile"
} | tee "$tap"
rc=$(cat "$rcfile")

# busted's TAP reports a pending test as "ok N - # SKIP reason".
skipped=$(grep -c '^ok [0-9]* - # SKIP' "$tap")
passed=$(($(grep -c '^ok ' "$tap") - skipped))
failed=$(grep -c '^not ok ' "$tap")
status=0

if [ "$rc" -ne 0 ]; then
  status=1
  case $rc in
    124|137) echo "test.sh: busted did not finish within ${TEST_TIMEOUT:-900} s" ;;
    *) [ "$rc" -gt 128 ] && echo "test.sh: busted was killed by signal $((rc - 128))" ;;
  esac
  # A crash or time-out may leave no "not ok" line behind: count it.
  [ "$failed" -eq 0 ] && failed=1
fi
[ "$failed" -gt 0 ] && status=1
if [ $((passed + failed + skipped)) -eq 0 ]; then
  echo "test.sh: no test ran"
  status=1
  failed=1
fi

# luacheck counts as one more test.
dirs=
for d in lua bin spec examples; do [ -e "$d" ] && dirs="$dirs $d"; done
# shellcheck disable=SC2086 # one word per directory
if luacheck --no-color -q $dirs; then
  passed=$((passed + 1))
  echo "ok - luacheck"
else
  failed=$((failed + 1))
  status=1
  echo "not ok - luacheck"
fi

if [ "$skipped" -gt 0 ]; then
  grep '^ok [0-9]* - # SKIP' "$tap" | sed 's/^ok [0-9]* - # SKIP/skipped:/'
  echo "$passed passed, $failed failed, $skipped skipped"
else
  echo "$passed passed, $failed failed"
fi
exit $status
