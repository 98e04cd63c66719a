"""aiosmtpd as a sink for the server benchmarks (bench/table.py).

Accepts every message and discards it (aiosmtpd.handlers.Sink), logs
errors only, offers STARTTLS when given a certificate, and exits after
LIFETIME seconds.

Usage: /usr/bin/python3 bench/sink_aiosmtpd.py PORT LIFETIME [CERT KEY]
"""
import asyncio
import logging
import ssl
import sys

from aiosmtpd.handlers import Sink
from aiosmtpd.smtp import SMTP


async def main(port, lifetime, cert=None, key=None):
    tls = None
    if cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    # hostname given: the default asks socket.getfqdn(), a DNS lookup
    server = await loop.create_server(
        lambda: SMTP(Sink(), hostname="aiosmtpd.localhost", tls_context=tls),
        "127.0.0.1", port, backlog=1024)
    async with server:
        await asyncio.sleep(lifetime)


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    args = sys.argv[1:]
    if len(args) not in (2, 4):
        sys.exit(__doc__)
    asyncio.run(main(int(args[0]), float(args[1]), *args[2:]))
