"""Line echo server in Python asyncio, the peer bench/run.sh compares
against: replies "250 <line>" to each CRLF line, exits after LIFETIME s.
   python3 bench/echo_server.py PORT LIFETIME"""
import asyncio
import sys


async def handle(reader, writer):
    try:
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
            writer.write(b"250 " + line)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError,
            asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main():
    port, lifetime = int(sys.argv[1]), float(sys.argv[2])
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await asyncio.sleep(lifetime)


asyncio.run(main())
