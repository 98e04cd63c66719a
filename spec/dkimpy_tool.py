#!/usr/bin/env python3
"""dkimpy as a test peer, without DNS.

  dkimpy_tool.py verify KEYS MESSAGE [COUNT] -> one "pass"/"fail" per signature
  dkimpy_tool.py sign KEY.pem DOMAIN SELECTOR ALGO CANON MESSAGE [COUNT] -> the field

COUNT repeats the work (bench/dkim.sh); the output is the last round's.

KEYS: a file of lines "selector._domainkey.domain TXT-record".
"""
import base64
import sys

import dkim


def read_key(path, algo):
    """dkimpy takes an Ed25519 key as the base64 of its 32-byte seed: the
    last 32 bytes of the PKCS#8 DER inside the PEM."""
    data = open(path, "rb").read()
    if algo != "ed25519-sha256":
        return data
    body = b"".join(line for line in data.splitlines() if not line.startswith(b"-----"))
    return base64.b64encode(base64.b64decode(body)[-32:])


def main():
    if sys.argv[1] == "verify":
        keys = {}
        with open(sys.argv[2]) as f:
            for line in f:
                name, _, txt = line.rstrip("\n").partition(" ")
                keys[name.lower()] = txt.encode()
        msg = open(sys.argv[3], "rb").read()

        def dnsfunc(name, timeout=5):
            if isinstance(name, bytes):
                name = name.decode()
            return keys.get(name.rstrip(".").lower())

        rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 1
        for _ in range(rounds):
            d = dkim.DKIM(msg, minkey=1024)
            count = len([h for h in d.headers if h[0].lower() == b"dkim-signature"])
            out = []
            for i in range(count):
                try:
                    ok = d.verify(idx=i, dnsfunc=dnsfunc)
                except dkim.DKIMException as e:
                    out.append("fail %s" % e)
                    continue
                out.append("pass" if ok else "fail")
        for line in out:
            print(line)
    else:
        key, domain, selector, algo, canon, path = sys.argv[2:8]
        msg = open(path, "rb").read()
        h, b = canon.split("/")
        rounds = int(sys.argv[8]) if len(sys.argv) > 8 else 1
        privkey = read_key(key, algo)
        for _ in range(rounds):
            sig = dkim.sign(msg, selector.encode(), domain.encode(), privkey,
                            canonicalize=(h.encode(), b.encode()),
                            signature_algorithm=algo.encode())
        sys.stdout.buffer.write(sig)


main()
