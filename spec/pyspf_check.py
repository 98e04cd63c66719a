#!/usr/bin/env python3
"""pyspf_check.py - the SPF verdicts of pyspf (Debian python3-spf) for the
luasmtp differential test, asking a DNS server on loopback.

Usage: pyspf_check.py --port PORT [--host 127.0.0.1] < cases

Each input line is "IP<TAB>SENDER<TAB>HELO"; each output line is
"RESULT<TAB>EXPLANATION" (pyspf's check2), in the same order.
"""
import argparse
import sys

import dns.resolver
import spf


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [args.host]
    resolver.port = args.port
    resolver.lifetime = 5
    dns.resolver.default_resolver = resolver
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line:
            continue
        ip, sender, helo = line.split("\t")
        result, explanation = spf.check2(i=ip, s=sender, h=helo, querytime=10)
        print("%s\t%s" % (result, explanation.replace("\n", " ")), flush=True)


if __name__ == "__main__":
    main()
