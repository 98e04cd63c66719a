#!/usr/bin/env python3
"""dkimpy as a test peer, without DNS.

  dkimpy_tool.py verify KEYS MESSAGE  -> prints one "pass"/"fail" per signature
  dkimpy_tool.py sign KEY.pem DOMAIN SELECTOR ALGO CANON MESSAGE -> the field

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

        d = dkim.DKIM(msg, minkey=1024)
        count = len([h for h in d.headers if h[0].lower() == b"dkim-signature"])
        for i in range(count):
            try:
                ok = d.verify(idx=i, dnsfunc=dnsfunc)
            except dkim.DKIMException as e:
                print("fail", e)
                continue
            print("pass" if ok else "fail")
    else:
        key, domain, selector, algo, canon, path = sys.argv[2:8]
        msg = open(path, "rb").read()
        h, b = canon.split("/")
        sig = dkim.sign(msg, selector.encode(), domain.encode(), read_key(key, algo),
                        canonicalize=(h.encode(), b.encode()),
                        signature_algorithm=algo.encode())
        sys.stdout.buffer.write(sig)


main()
