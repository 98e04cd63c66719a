#!/usr/bin/env python3
"""fake_dns.py - a tiny UDP DNS server for the luasmtp tests (stdlib only).

Usage:
  fake_dns.py [--host 127.0.0.1] [--port 0] [--lifetime 30] [--log] RECORD...

RECORD is one of:
  NAME=ADDR[,ADDR...]                 A and AAAA records; each ADDR is an IPv4
                                      or IPv6 literal ("a.test=192.0.2.1,2001:db8::1",
                                      "v4.test=192.0.2.1", "v6.test=,::1")
  mx:DOMAIN=PREF:HOST[,PREF:HOST...]  MX records ("mx:null.test=0:." is a null MX)
  txt:NAME=TEXT                       one TXT record; "|" splits it into several
                                      character-strings, text longer than 255 bytes
                                      is split too; repeat the option for more records
  ptr:NAME=HOST[,HOST...]             PTR records ("ptr:1.2.0.192.in-addr.arpa=a.test")
  delay:NAME=SECONDS                  answer queries for NAME only after SECONDS

Special names: "slow.test" is never answered (timeouts), "servfail.test"
gets SERVFAIL. A name that has some record gets NOERROR with an empty
answer (NODATA) for the types it lacks; any other name gets NXDOMAIN.
Names are case-insensitive, a trailing dot is ignored.

The first line on stdout is the UDP port (useful with --port 0). The
server exits by itself after --lifetime seconds. With --log each query is
reported on stderr as "query NAME TYPE".

Replies larger than 512 bytes are sent with TC set and no records (there
is no TCP listener).
"""
import argparse
import ipaddress
import select
import socket
import struct
import sys
import time

T_A, T_PTR, T_MX, T_TXT, T_AAAA, T_ANY = 1, 12, 15, 16, 28, 255
C_IN = 1
TTL = 60
MAX_UDP = 512

TYPE_NAMES = {T_A: "A", T_PTR: "PTR", T_MX: "MX", T_TXT: "TXT", T_AAAA: "AAAA", T_ANY: "ANY"}


def norm(name):
    return name.rstrip(".").lower()


def encode_name(name):
    """Uncompressed wire form of a dotted name ("" or "." is the root)."""
    out = bytearray()
    name = name.rstrip(".")
    if name:
        for label in name.split("."):
            raw = label.encode("ascii")
            if not 0 < len(raw) < 64:
                raise ValueError("bad label in %r" % name)
            out.append(len(raw))
            out += raw
    out.append(0)
    return bytes(out)


class Zone:
    def __init__(self):
        self.records = {}  # name -> list of (type, rdata bytes)
        self.delays = {}  # name -> seconds

    def add(self, name, rtype, rdata):
        self.records.setdefault(norm(name), []).append((rtype, rdata))

    def parse(self, spec):
        if "=" not in spec:
            raise ValueError("record without '=': %r" % spec)
        key, value = spec.split("=", 1)
        if key.startswith("mx:"):
            domain = key[3:]
            for item in value.split(","):
                pref, host = item.split(":", 1)
                self.add(domain, T_MX, struct.pack("!H", int(pref)) + encode_name(host))
            self.records.setdefault(norm(domain), [])
        elif key.startswith("txt:"):
            strings = []
            for part in value.split("|"):
                raw = part.encode("utf-8")
                chunks = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
                strings.extend(chunks)
            self.add(key[4:], T_TXT, b"".join(bytes([len(c)]) + c for c in strings))
        elif key.startswith("ptr:"):
            for host in filter(None, value.split(",")):
                self.add(key[4:], T_PTR, encode_name(host))
        elif key.startswith("delay:"):
            self.delays[norm(key[6:])] = float(value)
        else:
            self.records.setdefault(norm(key), [])
            for addr in filter(None, value.split(",")):
                ip = ipaddress.ip_address(addr)
                self.add(key, T_A if ip.version == 4 else T_AAAA, ip.packed)


def parse_name(msg, off):
    """Read a (possibly compressed) name; returns (labels, offset after it)."""
    labels, end, jumps, total = [], None, 0, 0
    while True:
        if off >= len(msg):
            raise ValueError("name runs past the message")
        n = msg[off]
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(msg):
                raise ValueError("truncated pointer")
            jumps += 1
            if jumps > 16:
                raise ValueError("pointer loop")
            if end is None:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            continue
        if n & 0xC0:
            raise ValueError("bad label type")
        off += 1
        if n == 0:
            break
        if off + n > len(msg):
            raise ValueError("label runs past the message")
        labels.append(bytes(msg[off:off + n]))
        total += n + 1
        if total > 255:
            raise ValueError("name too long")
        off += n
    return labels, (end if end is not None else off)


def build_reply(query, zone, log):
    """Returns (reply bytes or None to stay silent, name)."""
    if len(query) < 12:
        return None, None
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000:
        return None, None  # a response, not a query
    opcode = (flags >> 11) & 0xF
    rd = flags & 0x0100

    def header(rcode, qd, an, tc=0):
        f = 0x8000 | (opcode << 11) | 0x0400 | rd | 0x0080 | (0x0200 if tc else 0) | rcode
        return struct.pack("!HHHHHH", qid, f, qd, an, 0, 0)

    if opcode != 0:
        return header(4, 0, 0), None  # NOTIMP
    if qdcount != 1:
        return header(1, 0, 0), None  # FORMERR
    try:
        labels, off = parse_name(query, 12)
        if off + 4 > len(query):
            raise ValueError("truncated question")
        qtype, qclass = struct.unpack("!HH", query[off:off + 4])
    except ValueError:
        return header(1, 0, 0), None
    qname_wire = b"".join(bytes([len(l)]) + l for l in labels) + b"\0"
    name = ".".join(l.decode("ascii", "replace") for l in labels)
    if log:
        print("query %s %s" % (name, TYPE_NAMES.get(qtype, str(qtype))), file=sys.stderr,
              flush=True)
    question = qname_wire + struct.pack("!HH", qtype, qclass)
    key = norm(name)
    if key == "slow.test":
        return None, key
    if key == "servfail.test":
        return header(2, 1, 0) + question, key
    if key not in zone.records:
        return header(3, 1, 0) + question, key  # NXDOMAIN
    answers = []
    if qclass == C_IN:
        for rtype, rdata in zone.records[key]:
            if qtype in (rtype, T_ANY):
                # owner: pointer to the question name at offset 12
                answers.append(struct.pack("!HHHIH", 0xC00C, rtype, C_IN, TTL, len(rdata)) + rdata)
    reply = header(0, 1, len(answers)) + question + b"".join(answers)
    if len(reply) > MAX_UDP:
        reply = header(0, 1, 0, tc=1) + question
    return reply, key


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--lifetime", type=float, default=30.0)
    ap.add_argument("--log", action="store_true")
    ap.add_argument("records", nargs="*")
    args = ap.parse_args()
    zone = Zone()
    try:
        for spec in args.records:
            zone.parse(spec)
    except (ValueError, UnicodeError) as e:
        ap.error(str(e))

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((args.host, args.port))
    print(sock.getsockname()[1], flush=True)

    end = time.monotonic() + args.lifetime
    delayed = []  # (due, reply, peer)
    while True:
        now = time.monotonic()
        if now >= end:
            break
        for item in [d for d in delayed if d[0] <= now]:
            delayed.remove(item)
            sock.sendto(item[1], item[2])
        wait = end - now
        if delayed:
            wait = min(wait, max(0.0, min(d[0] for d in delayed) - now))
        ready, _, _ = select.select([sock], [], [], wait)
        if not ready:
            continue
        try:
            query, peer = sock.recvfrom(4096)
        except OSError:
            continue
        reply, key = build_reply(query, zone, args.log)
        if reply is None:
            continue
        delay = zone.delays.get(key) if key else None
        if delay:
            delayed.append((time.monotonic() + delay, reply, peer))
        else:
            sock.sendto(reply, peer)
    sock.close()


if __name__ == "__main__":
    main()
