#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup and mounts_under run from the EXIT trap
# make test-fresh: run the whole suite the way a new user would, on a
# freshly made minimal Debian 12 (bookworm) root filesystem.
#
#   scripts/test-fresh.sh            (as root; make test-fresh calls it)
#
# 1. mmdebstrap --variant=apt builds the root (Essential packages and apt
#    only) into a temporary directory, from this machine's own Debian
#    mirrors and with its apt proxy and validity settings;
# 2. a clean `git clone` of HEAD goes into it (uncommitted changes are
#    not part of the test);
# 3. /proc, /dev and a tmpfs on /tmp are mounted, and `bash .ci/run` runs
#    inside with chroot: scripts/deps.sh installs what it lists, make test
#    builds and runs the suite;
# 4. the last lines are printed, everything under the directory is
#    unmounted (also on failure or interrupt) and the directory removed.
#
# Exits with the suite's status. Touches nothing outside its temporary
# directory, besides installing its own tools (mmdebstrap) on this machine
# when missing. Processes left in the root are stopped by pid.
#
# Environment:
#   FRESH_SUITE   Debian suite (default bookworm)
#   FRESH_TAIL    how many last lines to print (default 25)
#   FRESH_LOG     also copy the whole log to this file
#   FRESH_CMD     what runs in the clone instead of `bash .ci/run` (one
#                 command, run with exec), e.g. `env BENCH_QUICK=1 sh
#                 bench/run.sh`: does make bench install what it needs on
#                 a fresh machine? (`make` itself is not there yet)
#   TMPDIR        where the temporary directory goes (default /tmp); the
#                 root lives there, so its file system must allow exec
set -euo pipefail

suite=${FRESH_SUITE:-bookworm}
tail_lines=${FRESH_TAIL:-25}
src=$(cd "$(dirname "$0")/.." && pwd)

say() { printf 'test-fresh: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

[ "$(id -u)" -eq 0 ] || die "needs root (it runs mmdebstrap, mounts and chroots)"
command -v git >/dev/null 2>&1 || die "git is needed to clone the checkout"
git -C "$src" rev-parse --verify -q HEAD >/dev/null || die "$src is not a git checkout with a commit"
# The host tools of this target only; the root gets its packages from
# scripts/deps.sh like any machine.
sh "$src/scripts/deps.sh" mmdebstrap debian-archive-keyring mount util-linux

base=${TMPDIR:-/tmp}
case $base in *[[:space:]]*) die "TMPDIR must not contain white space: $base" ;; esac
dir=$(mktemp -d "$base/luasmtp-fresh.XXXXXX")
root=$dir/root
log=$dir/fresh.log
child=   # the chroot running .ci/run (a process group of its own)
builder= # mmdebstrap

# The mount points under $dir, deepest first (as the kernel lists them).
mounts_under() {
  findmnt -rn -o TARGET | awk -v d="$dir" 'index($0, d "/") == 1 || $0 == d' | sort -r
}

# Processes whose root is the test root: the suite and whatever it left.
procs_in_root() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] && echo "${p#/proc/}"
  done
  return 0
}

# Stop them by pid: TERM, then KILL what is still there after 5 s.
stop_procs_in_root() {
  local sig pids i
  for sig in TERM KILL; do
    pids=$(procs_in_root)
    [ -z "$pids" ] && return 0
    # shellcheck disable=SC2086 # one word per pid
    kill -"$sig" $pids 2>/dev/null
    for i in $(seq 50); do [ -z "$(procs_in_root)" ] && return 0; sleep 0.1; done
  done
}

cleanup() {
  local status=$? m i
  # No second interrupt half-way through the clean-up.
  trap '' INT TERM
  trap - EXIT
  set +e
  if [ -n "$builder" ]; then
    say "stopping mmdebstrap"
    kill -TERM "$builder" 2>/dev/null
    wait "$builder" 2>/dev/null
  fi
  if [ -n "$child" ]; then
    say "stopping the suite in the root"
    # The chroot runs in its own process group (setsid).
    kill -TERM -- "-$child" 2>/dev/null
  fi
  stop_procs_in_root
  [ -n "$child" ] && wait "$child" 2>/dev/null
  # Everything mounted under $dir: what this script mounted and what the
  # suite or mmdebstrap may have left. Deepest first; lazily when busy.
  for i in 1 2 3; do
    for m in $(mounts_under); do
      umount "$m" 2>/dev/null || { [ "$i" -eq 3 ] && umount -l "$m"; }
    done
    [ -z "$(mounts_under)" ] && break
    sleep 1
  done
  if [ -n "$(mounts_under)" ]; then
    say "still mounted, $dir left in place:"
    mounts_under >&2
    exit $((status ? status : 2))
  fi
  if [ -n "${FRESH_LOG:-}" ] && [ -f "$log" ]; then cp "$log" "$FRESH_LOG"; fi
  # --one-file-system: never descend into anything mounted after all.
  rm -rf --one-file-system "$dir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Mounts below $dir must not propagate to the rest of the machine: make
# the directory a private mount of its own first.
mount --bind "$dir" "$dir"
mount --make-private "$dir"

# This machine's Debian mirrors for the suite, as apt knows them (any
# sources file, any mirror, proxies included); mmdebstrap's default
# mirrors when apt has no Debian index for it.
# shellcheck disable=SC2016 # $(...) are apt's fields, not the shell's
fields='$(ORIGIN) $(CODENAME) $(REPO_URI) $(RELEASE) $(COMPONENT)'
mirrors=()
while IFS= read -r line; do
  [ -n "$line" ] && mirrors+=("$line")
done < <(apt-get indextargets --format "$fields" 'Created-By: Packages' 2>/dev/null |
  awk -v s="$suite" '$1 == "Debian" && ($2 == s || index($2, s "-") == 1) {
      key = $3 " " $4
      if (!(key in comps)) { order[++n] = key; comps[key] = $5 }
      else if (index(" " comps[key] " ", " " $5 " ") == 0) comps[key] = comps[key] " " $5
    }
    END { for (i = 1; i <= n; i++) print "deb " order[i] " " comps[order[i]] }')
# apt settings the root needs to reach those mirrors the way this machine
# does: proxies and release-file validity checks (a mirror that serves a
# snapshot has old Release files). They stay in the root's apt.conf.d.
aptopts=()
while IFS= read -r line; do
  [ -n "$line" ] && aptopts+=("--aptopt=$line")
done < <(apt-config dump 2>/dev/null |
  grep -E '^Acquire::(https?|ftp)::Proxy|^Acquire::(https?::)?Check-(Valid-Until|Date) ' || true)

say "building a minimal Debian $suite root in $root"
if [ ${#mirrors[@]} -gt 0 ]; then
  for m in "${mirrors[@]}"; do say "  from this machine's mirror: $m"; done
else
  say "  apt knows no Debian $suite mirror here: mmdebstrap's default mirrors"
fi
start=$(date +%s)
# In the background, so that an interrupt is handled at once.
mmdebstrap --variant=apt --mode=root --format=directory "${aptopts[@]}" \
  "$suite" "$root" "${mirrors[@]}" >"$log" 2>&1 &
builder=$!
rc=0
wait "$builder" || rc=$?
builder=
[ "$rc" -eq 0 ] || { tail -n "$tail_lines" "$log" >&2; die "mmdebstrap failed (status $rc)"; }

# What a freshly installed machine has besides the packages: name
# resolution (mmdebstrap copies resolv.conf and hostname; an installer
# writes hosts), and no daemons started by package scripts (there is no
# init in the root; a daemon started there would outlive the test).
[ -e "$root/etc/resolv.conf" ] || cp /etc/resolv.conf "$root/etc/resolv.conf"
if [ ! -e "$root/etc/hosts" ]; then
  host=$(cat "$root/etc/hostname" 2>/dev/null || echo localhost)
  printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$host" \
    >"$root/etc/hosts"
fi
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"

# A clean clone of HEAD, sharing nothing with this checkout.
rev=$(git -C "$src" rev-parse HEAD)
[ -z "$(git -C "$src" status --porcelain --untracked-files=no)" ] ||
  say "note: uncommitted changes in $src are not tested, only HEAD $rev"
git clone -q --no-hardlinks --no-checkout "$src" "$root/root/luasmtp" >>"$log" 2>&1
git -C "$root/root/luasmtp" fetch -q "$src" HEAD >>"$log" 2>&1 # also a detached HEAD
git -C "$root/root/luasmtp" checkout -q --detach "$rev"

# The network's own trust anchors (a TLS-inspecting egress proxy's CA)
# belong to this network, not to the software under test: the root gets
# them, and ca-certificates (installed by deps.sh) adds them to its store.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi

mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"

cmd=${FRESH_CMD:-bash .ci/run}
say "running $cmd in the root (log: $log)"
# Own process group, so an interrupt stops all of it; a clean login-like
# environment, keeping only the proxy settings apt may need (and where
# Node.js finds this network's trust anchors, for make bench's npm).
envs=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
for v in http_proxy https_proxy ftp_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY NODE_EXTRA_CA_CERTS; do
  [ -n "${!v:-}" ] && envs+=("$v=${!v}")
done
setsid chroot "$root" /usr/bin/env -i "${envs[@]}" \
  /bin/bash -c "cd /root/luasmtp && exec $cmd" </dev/null >>"$log" 2>&1 &
child=$!
rc=0
wait "$child" || rc=$?
child=
left=$(procs_in_root)
if [ -n "$left" ]; then
  say "processes the suite left running in the root (stopped now):"
  # shellcheck disable=SC2086 # one word per pid
  ps -o pid=,args= -p "$(echo $left | tr ' ' ,)" >&2
  stop_procs_in_root
fi

echo "--- last lines of $cmd in a fresh Debian $suite ---"
# What deps.sh installed, and each failure with busted's message (the
# "# ..." lines after "not ok", at most 8 of them).
awk '/^(deps|test)\.sh:/ { print; next }
     /^not ok / { print; n = 8; next }
     n > 0 && /^#/ { print; n--; next }
     { n = 0 }' "$log"
tail -n "$tail_lines" "$log"
echo "--- $(($(date +%s) - start)) s, exit status $rc ---"
exit "$rc"
