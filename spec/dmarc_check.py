#!/usr/bin/env python3
"""dmarc_check.py - read DMARC aggregate reports the way a receiver would
(stdlib only: xml.etree, gzip, email).

Usage:
  dmarc_check.py xml FILE    FILE is a report (RFC 7489 appendix C)
  dmarc_check.py gzip FILE   FILE is a gzipped report
  dmarc_check.py mail FILE   FILE is a report mail (section 7.2.1.1)
Prints JSON: for a report {"root", "order", "metadata": {...},
"policy": {...}, "records": [{"row", "policy_evaluated", "identifiers",
"dkim": [...], "spf": [...]}]}; for a mail {"headers", "content_type",
"defects", "parts": [{"content_type", "filename", "defects"}], "report"}.
A report that is not well-formed XML makes it exit 1 with the parser's
message.
"""
import email
import email.policy
import gzip
import json
import sys
import xml.etree.ElementTree as ET


def text_children(el):
    """The text of each child element without children of its own."""
    return {c.tag: (c.text or "") for c in el if len(c) == 0}


def read_report(data):
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        print("XML error: %s" % e)
        sys.exit(1)
    meta = root.find("report_metadata")
    out = {
        "root": root.tag,
        "order": [c.tag for c in root],
        "metadata": text_children(meta),
        "metadata_order": [c.tag for c in meta],
        "date_range": text_children(meta.find("date_range")),
        "policy": text_children(root.find("policy_published")),
        "policy_order": [c.tag for c in root.find("policy_published")],
        "records": [],
    }
    for rec in root.findall("record"):
        row = rec.find("row")
        pe = row.find("policy_evaluated")
        auth = rec.find("auth_results")
        out["records"].append({
            "row": text_children(row),
            "policy_evaluated": text_children(pe),
            "reasons": [r.findtext("type") for r in pe.findall("reason")],
            "identifiers": text_children(rec.find("identifiers")),
            "dkim": [text_children(d) for d in auth.findall("dkim")],
            "spf": [text_children(s) for s in auth.findall("spf")],
        })
    return out


def main():
    kind, path = sys.argv[1], sys.argv[2]
    with open(path, "rb") as f:
        data = f.read()
    if kind == "xml":
        print(json.dumps(read_report(data)))
        return
    if kind == "gzip":
        print(json.dumps(read_report(gzip.decompress(data))))
        return
    msg = email.message_from_bytes(data, policy=email.policy.default)
    out = {
        "headers": {k.lower(): str(v) for k, v in msg.items()},
        "content_type": msg.get_content_type(),
        "defects": [str(d) for d in msg.defects],
        "parts": [],
    }
    for part in msg.iter_parts():
        info = {"content_type": part.get_content_type(), "filename": part.get_filename(),
                "disposition": part.get_content_disposition(),
                "defects": [str(d) for d in part.defects]}
        if part.get_content_type() == "application/gzip":
            out["report"] = read_report(gzip.decompress(part.get_payload(decode=True)))
        else:
            info["text"] = part.get_content()
        out["parts"].append(info)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
