#!/usr/bin/env python3
"""tlsrpt_check.py - read TLS reports the way a receiver would (stdlib only).

Usage:
  tlsrpt_check.py gzip FILE   FILE is a gzipped report: prints the JSON
  tlsrpt_check.py mail FILE   FILE is a report mail (RFC 8460 section 5.3):
                              prints {"headers": {...}, "content_type",
                              "report_type", "parts": [...], "report": {...}}
"""
import email
import email.policy
import gzip
import json
import sys


def main():
    kind, path = sys.argv[1], sys.argv[2]
    with open(path, "rb") as f:
        data = f.read()
    if kind == "gzip":
        print(json.dumps(json.loads(gzip.decompress(data))))
        return
    msg = email.message_from_bytes(data, policy=email.policy.default)
    out = {
        "headers": {k.lower(): str(v) for k, v in msg.items()},
        "content_type": msg.get_content_type(),
        "report_type": msg.get_param("report-type"),
        "defects": [str(d) for d in msg.defects],
        "parts": [],
    }
    for part in msg.iter_parts():
        info = {"content_type": part.get_content_type(), "filename": part.get_filename(),
                "defects": [str(d) for d in part.defects]}
        if part.get_content_type() == "application/tlsrpt+gzip":
            out["report"] = json.loads(gzip.decompress(part.get_payload(decode=True)))
        else:
            info["text"] = part.get_content()
        out["parts"].append(info)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
