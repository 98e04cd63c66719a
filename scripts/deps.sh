#!/bin/sh
# Install the Debian packages needed to build and test luasmtp.
#
# Usage: scripts/deps.sh [--bench | PACKAGE...]
#   Without arguments: everything in PACKAGES below. --bench: what the
#   build and `make bench` need (BUILD and BENCH below). With package
#   names: just those (make test-fresh asks for its own tools this way).
#
# As root on Debian/Ubuntu, installs whatever is missing with apt-get.
# Otherwise lists what is missing and exits 1. Silent when nothing is
# missing.
set -eu

# Everything the build, the test suite, the examples, `make run` and
# `make bench` use, on a minimal Debian 12 with --no-install-recommends:
# list each need here, also what a package only recommends. The README
# dependency table says the same; `make test-fresh` proves the list.

# build: compiler, headers, the libraries of the C core (libcurl for the
# HTTP client, zlib for gzip, libpsl and the list it reads for DMARC,
# hiredis for the Redis client)
BUILD="gcc libc6-dev make pkg-config lua5.4 liblua5.4-dev libssl-dev libcrypt-dev
libev-dev libc-ares-dev libcurl4-openssl-dev zlib1g-dev libpsl-dev publicsuffix
libhiredis-dev"
# suite: busted, luacheck, JSON for the test servers' logs, luarocks for
# the install test, openssl for the test PKI, the system trust store,
# mount for the full-disk test's tmpfs, kill/ps
SUITE="lua-busted lua-check lua-dkjson luarocks openssl ca-certificates mount procps"
# peers the tests run, with what each needs to do its job there: swaks
# speaks TLS only with the Perl TLS modules (swaks merely recommends
# them) and AUTH with MIME::Base64 (perl); smtplib and aiosmtpd (Python);
# smtp-sink, smtp-source and private smtpd/lmtp instances (postfix);
# doveadm pw and a private LMTP server (dovecot-core, dovecot-lmtpd);
# `ip` for the network-namespace tests (iproute2); the DNSSEC test rig
# (spec/dnssec_rig.lua): zone signing and ldns-dane (ldnsutils), the
# authoritative server (nsd), the validating resolver (unbound); dkimpy
# for DKIM, with PyNaCl for its Ed25519 (python3-dkim only suggests
# it), and libopendkim (the tests build a small driver against it);
# pyspf for the SPF differential test (python3-spf, python3-dnspython);
# redis-server for the Redis client and store.
# The tests check these abilities (H.peers in spec/helper.lua).
PEERS="swaks libnet-ssleay-perl libio-socket-ssl-perl perl python3 python3-aiosmtpd
postfix dovecot-core dovecot-lmtpd iproute2 ldnsutils nsd unbound python3-dkim python3-nacl
libopendkim-dev python3-spf python3-dnspython redis-server"
# examples and benchmarks: nc (examples/echo-server.lua), bc (bench/run.sh),
# GNU time (bench/client.sh)
EXTRA="netcat-openbsd bc time"
# make bench (bench/run.sh, bench/table.py), a subset of the above: the
# peers smtp-sink and smtp-source (postfix) and aiosmtpd, Python, openssl
# for the test certificate, bc and GNU time (bench/client.sh), ps,
# libopendkim and dkimpy (bench/dkim.sh). Node.js and npm for Haraka and
# smtp-server come from `deps.sh nodejs npm` when node is missing (a
# newer Node.js may already be installed from elsewhere).
BENCH="postfix python3 python3-aiosmtpd openssl bc time procps libopendkim-dev python3-dkim"

PACKAGES="$BUILD $SUITE $PEERS $EXTRA"
if [ "${1:-}" = "--bench" ]; then
  PACKAGES="$BUILD $BENCH"
elif [ $# -gt 0 ]; then
  PACKAGES="$*"
fi

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
libcurl (built with OpenSSL), zlib, libxcrypt, busted, luacheck and
dkjson for Lua 5.4, LuaRocks, Python 3 with aiosmtpd, swaks with
Net::SSLeay and IO::Socket::SSL, Postfix's smtp-sink and smtp-source,
Dovecot's doveadm, nsd, unbound and the ldns utilities.
MSG
exit 1
