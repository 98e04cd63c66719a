#!/bin/sh
# Install the Debian packages needed to build and test luasmtp.
#
# As root on Debian/Ubuntu, installs whatever is missing with apt-get.
# Otherwise lists what is missing and exits 1. Silent when nothing is
# missing.
set -eu

# Everything the build, the test suite and the examples use. Add new
# needs here.
PACKAGES="gcc make pkg-config lua5.4 liblua5.4-dev libssl-dev openssl libcrypt-dev
libev-dev libc-ares-dev libcurl4-openssl-dev zlib1g-dev lua-busted lua-check lua-dkjson luarocks
ca-certificates bc python3 python3-aiosmtpd swaks msmtp procps postfix dovecot-core
nsd unbound ldnsutils"

missing=""
if command -v dpkg-query >/dev/null 2>&1; then
  for p in $PACKAGES; do
    case $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) in
      *" installed") ;;
      *) missing="$missing $p" ;;
    esac
  done
else
  for p in $PACKAGES; do missing="$missing $p"; done
fi
missing=${missing# }
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "deps.sh: installing $missing"
  case " $missing " in
    *" postfix "*)
      # Install postfix unconfigured: no questions, no running daemon.
      echo "postfix postfix/main_mailer_type select No configuration" |
        debconf-set-selections ;;
  esac
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # shellcheck disable=SC2086 # one word per package
  apt-get install -y -q --no-install-recommends $missing
  exit 0
fi

cat >&2 <<MSG
deps.sh: missing packages: $missing
On Debian/Ubuntu, as root:
  apt-get install --no-install-recommends $missing
On other systems install the equivalents: a C compiler, make, pkg-config,
Lua 5.4 with its headers, OpenSSL 3 (headers and CLI), libev, c-ares,
libcurl (built with OpenSSL), zlib,
busted, luacheck and dkjson for Lua 5.4, LuaRocks, Python 3 with aiosmtpd,
swaks and msmtp.
MSG
exit 1
