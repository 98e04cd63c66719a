#!/usr/bin/python3
"""dsn_check.py - parse a delivery status notification with Python's email
package and print what it found as JSON, for spec/dsn_spec.lua.

Usage: dsn_check.py FILE

Output: {"headers": {name: value}, "content_type", "report_type",
"parts": [content types], "defects": [...], "human": text,
"per_message": {field: value}, "recipients": [{field: value}],
"attached": {"content_type", "headers": {name: value}, "body"}}
"""
import email
import email.parser
import email.policy
import json
import sys


def fields(msg):
    return {k: str(v) for k, v in msg.items()}


def main():
    with open(sys.argv[1], "rb") as f:
        msg = email.message_from_bytes(f.read(), policy=email.policy.default)
    out = {
        "headers": fields(msg),
        "content_type": msg.get_content_type(),
        "report_type": msg.get_param("report-type"),
        "parts": [],
        "defects": [type(d).__name__ for d in msg.defects],
    }
    parts = msg.get_payload()
    for part in parts:
        ct = part.get_content_type()
        out["parts"].append(ct)
        out["defects"] += [type(d).__name__ for d in part.defects]
        if ct == "text/plain":
            out["human"] = part.get_content()
        elif ct == "message/delivery-status":
            blocks = part.get_payload()
            out["per_message"] = fields(blocks[0])
            out["recipients"] = [fields(b) for b in blocks[1:]]
        elif ct == "message/global-delivery-status":
            # Python reads message/* other than delivery-status as one
            # message: the per-message block is its header, the rest its body
            sub = part.get_payload(0)
            out["per_message"] = fields(sub)
            body = sub.get_payload(decode=True).decode("utf-8")
            out["recipients"] = []
            for block in body.replace("\r\n", "\n").split("\n\n"):
                if block.strip():
                    b = email.parser.Parser(policy=email.policy.default).parsestr(block, headersonly=True)
                    out["recipients"].append(fields(b))
        elif ct in ("message/rfc822", "message/global", "message/global-headers"):
            sub = part.get_payload(0)
            body = None if sub.is_multipart() else sub.get_payload(decode=True).decode("utf-8")
            out["attached"] = {"content_type": ct, "headers": fields(sub), "body": body}
        elif ct == "text/rfc822-headers":
            hdrs = email.parser.Parser(policy=email.policy.default).parsestr(part.get_content(), headersonly=True)
            out["attached"] = {"content_type": ct, "headers": fields(hdrs), "body": None}
    json.dump(out, sys.stdout)


main()
