"""Open N connections at once, then count the first reply of each.

Usage: burst_client.py PORT N RESULT_FILE
Prints "connected" once every connection is established (the kernel
completes them from the listen backlog, whether or not the server has
accepted them yet), then reads the first line each connection gets and
writes "greeted refused other" to RESULT_FILE. Every wait is bounded.
"""
import socket
import sys

port, n, result = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
print("connected", flush=True)
greeted = refused = other = 0
for s in socks:
    s.settimeout(10)
    try:
        line = s.recv(512)
    except OSError:
        line = b""
    if line.startswith(b"220"):
        greeted += 1
    elif line.startswith(b"421"):
        refused += 1
    else:
        other += 1
with open(result + ".tmp", "w") as f:
    f.write("%d %d %d\n" % (greeted, refused, other))
import os
os.rename(result + ".tmp", result)
for s in socks:
    s.close()
