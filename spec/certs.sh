#!/bin/sh
# Generate the test PKI used by the specs:
#
#   ca.pem ca.key               private test CA
#   other-ca.pem other-ca.key   a second, unrelated CA
#   server.pem server.key       localhost (DNS:localhost, IP:127.0.0.1, IP:::1)
#   wronghost.pem/.key          other.test only
#   expired.pem/.key            localhost, valid 2020-01-01 .. 2020-02-01
#   untrusted.pem/.key          localhost, signed by other-ca
#   sni2.pem/.key               mail.example.test (second SNI name)
#   client.pem/.key             client@example.test (TLS client auth)
#   mtasts.pem/.key             mta-sts.<domain> for the MTA-STS test domains
#
# Usage: spec/certs.sh OUTDIR
# Does nothing when OUTDIR/ca.pem is newer than this script. All keys are
# EC P-256 so that the whole run takes well under a second. Silent on
# success; on failure prints the openssl output and exits non-zero.
set -eu

out=${1:?usage: certs.sh OUTDIR}
if [ -n "$(find "$out/ca.pem" -newer "$0" 2>/dev/null)" ]; then
  exit 0
fi

mkdir -p "$out"
work=$(mktemp -d "$out/.gen.XXXXXX")
log=$work/log
trap 'rm -rf "$work"' EXIT
trap 'exit 1' HUP INT TERM

fail() {
  echo "certs.sh: $1" >&2
  cat "$log" >&2
  exit 1
}

# Configuration for `openssl req` and `openssl ca`. `openssl ca` lets us
# set explicit validity dates (needed for the expired certificate).
# SAN and EKU come from the environment of each call.
cat >"$work/ca.cnf" <<CNF
[ req ]
distinguished_name = req_dn
prompt             = no
[ req_dn ]
CN = unused

[ ca ]
default_ca = test_ca
[ test_ca ]
dir             = $work
database        = \$dir/index.txt
serial          = \$dir/serial
new_certs_dir   = \$dir
default_md      = sha256
policy          = policy_any
unique_subject  = no
copy_extensions = none
[ policy_any ]
commonName = supplied

[ ext_ca ]
basicConstraints       = critical, CA:true
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
[ ext_leaf ]
basicConstraints       = critical, CA:false
keyUsage               = critical, digitalSignature
extendedKeyUsage       = \$ENV::EKU
subjectAltName         = \$ENV::SAN
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid
CNF
: >"$work/index.txt"
echo 1000 >"$work/serial"

genkey() { # name
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
    -out "$work/$1.key" >>"$log" 2>&1 || fail "key $1"
}

csr() { # name subject
  openssl req -new -config "$work/ca.cnf" -key "$work/$1.key" -subj "$2" \
    -out "$work/$1.csr" >>"$log" 2>&1 || fail "csr $1"
}

# sign NAME ISSUER START END: issue NAME.pem from NAME.csr with ext_leaf.
sign() {
  openssl ca -batch -notext -config "$work/ca.cnf" -extensions ext_leaf \
    -cert "$work/$2.pem" -keyfile "$work/$2.key" \
    -startdate "$3" -enddate "$4" \
    -in "$work/$1.csr" -out "$work/$1.pem" >>"$log" 2>&1 || fail "sign $1"
}

# ca NAME SUBJECT: a self-signed CA.
ca() {
  genkey "$1"
  csr "$1" "$2"
  openssl ca -batch -notext -selfsign -config "$work/ca.cnf" -extensions ext_ca \
    -keyfile "$work/$1.key" -startdate 20190101000000Z -enddate 20491231000000Z \
    -in "$work/$1.csr" -out "$work/$1.pem" >>"$log" 2>&1 || fail "ca $1"
}

# leaf NAME SUBJECT SAN [ISSUER [START END]]: key, CSR and certificate.
leaf() {
  genkey "$1"
  csr "$1" "$2"
  SAN=$3 sign "$1" "${4:-ca}" "${5:-20190101000000Z}" "${6:-20491231000000Z}"
}

export EKU=serverAuth SAN=unused
ca ca "/CN=luasmtp test CA"
ca other-ca "/CN=luasmtp other test CA"

localhost_san="DNS:localhost, IP:127.0.0.1, IP:::1"
leaf server "/CN=localhost" "$localhost_san"
leaf wronghost "/CN=other.test" "DNS:other.test"
leaf expired "/CN=localhost" "$localhost_san" ca 20200101000000Z 20200201000000Z
leaf untrusted "/CN=localhost" "$localhost_san" other-ca
leaf sni2 "/CN=mail.example.test" "DNS:mail.example.test"
sts=""
for d in example testing none redirect big invalid missing refresh ctype report; do
  sts="$sts${sts:+, }DNS:mta-sts.$d.test"
done
leaf mtasts "/CN=mta-sts.example.test" "$sts"
EKU=clientAuth leaf client "/CN=client@example.test" "email:client@example.test"

# Publish: keys and certificates first, ca.pem last, so that an
# interrupted run is redone next time.
for n in ca other-ca server wronghost expired untrusted sni2 client mtasts; do
  chmod 600 "$work/$n.key"
  mv -f "$work/$n.key" "$out/$n.key"
  [ "$n" = ca ] || mv -f "$work/$n.pem" "$out/$n.pem"
done
mv -f "$work/ca.pem" "$out/ca.pem"
