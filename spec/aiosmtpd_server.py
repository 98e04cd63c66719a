#!/usr/bin/python3
"""aiosmtpd_server.py - an aiosmtpd server for the luasmtp client tests.

Usage:
  aiosmtpd_server.py --port PORT [--host 127.0.0.1] [--tls none|starttls|implicit]
                     [--cert FILE --key FILE] [--user USER:PASSWORD]
                     [--auth-required] [--require-starttls] [--size N]
                     [--no-smtputf8] [--log FILE] [--lifetime SECONDS]

Needs Debian's python3-aiosmtpd (run it with /usr/bin/python3). Listens
on host:port and prints "READY" once it does; exits by itself after
--lifetime seconds (default 30).

Recipients whose local part starts with "reject" get 550 5.1.1, with
"busy" 450 4.2.1. A sender whose local part starts with "tempfail" gets
451 4.3.0 after the data, "permfail" 554 5.6.0. Every accepted message is
appended to --log as one JSON line: from, to, data (latin-1), mail and
rcpt options, the authenticated user and whether TLS was in use.
"""
import argparse
import logging
import asyncio
import json
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Handler:
    def __init__(self, log):
        self.log = log

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        if local.startswith("reject"):
            return "550 5.1.1 No such user here"
        if local.startswith("busy"):
            return "450 4.2.1 Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        sender = (envelope.mail_from or "").split("@", 1)[0].lower()
        if sender.startswith("tempfail"):
            return "451 4.3.0 Try again later"
        if sender.startswith("permfail"):
            return "554 5.6.0 Message refused"
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        user = None
        if isinstance(session.auth_data, str):
            user = session.auth_data
        record = {
            "from": envelope.mail_from,
            "to": envelope.rcpt_tos,
            "data": content.decode("latin-1"),
            "mail_options": envelope.mail_options,
            "rcpt_options": envelope.rcpt_options,
            "user": user,
            "tls": session.ssl is not None,
        }
        if self.log:
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return "250 2.0.0 OK queued"


def make_authenticator(users):
    def authenticator(server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ok = users.get(login) == password
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)
    return authenticator


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tls", default="none", choices=["none", "starttls", "implicit"])
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--user", action="append", default=[])
    ap.add_argument("--auth-required", action="store_true")
    ap.add_argument("--require-starttls", action="store_true")
    ap.add_argument("--size", type=int, default=33554432)
    ap.add_argument("--no-smtputf8", action="store_true")
    ap.add_argument("--log")
    ap.add_argument("--lifetime", type=float, default=30)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    users = dict(u.split(":", 1) for u in args.user)
    ctx = None
    if args.tls != "none":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler = Handler(args.log)

    def factory():
        kwargs = dict(
            hostname="aiosmtpd.test",
            data_size_limit=args.size,
            enable_SMTPUTF8=not args.no_smtputf8,
            auth_required=args.auth_required,
            # implicit TLS: aiosmtpd only knows about STARTTLS, so do not
            # make it wait for one before offering AUTH
            auth_require_tls=args.tls == "starttls",
            authenticator=make_authenticator(users) if users else None,
            timeout=10,
            loop=loop,
        )
        if args.tls == "starttls":
            kwargs["tls_context"] = ctx
            kwargs["require_starttls"] = args.require_starttls
        return SMTP(handler, **kwargs)

    server = loop.run_until_complete(loop.create_server(
        factory, host=args.host, port=args.port,
        ssl=ctx if args.tls == "implicit" else None))
    print("READY", flush=True)
    loop.call_later(args.lifetime, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
