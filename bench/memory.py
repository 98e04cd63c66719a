"""Peak memory of the server while it receives large bodies.

Starts bench/body_server.lua once per scenario and reports how much its
peak RSS (VmHWM in /proc/PID/status) grew over what it was after a small
warm-up message:
  - one 100 MB message by DATA
  - one 100 MB message by BDAT (1 MiB chunks)
  - five concurrent 20 MB BDAT bodies, held unfinished, then finished
Targets: < 4 MB, < 4 MB, < 8 MB.

Usage: python3 bench/memory.py   (from the repository root; make bench)
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from proctree import free_port

MB = 1024 * 1024
BLOCK = b"".join(b"%07d 0123456789abcdefghijklmnopqrstuvwxyz 0123456789ABCDEFGHIJKLMNOPQ\r\n" % i
                 for i in range(13107))  # about 1 MiB of CRLF lines, no dots


def hwm_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


class Client:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.f = self.sock.makefile("rb")
        self.reply()

    def reply(self):
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("connection closed")
            if line[3:4] != b"-":
                return line.decode().strip()

    def cmd(self, line):
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def envelope(self):
        assert self.cmd("EHLO bench.test").startswith("250")
        assert self.cmd("MAIL FROM:<a@bench.test>").startswith("250")
        assert self.cmd("RCPT TO:<b@bench.test>").startswith("250")

    def data(self, size):
        self.envelope()
        assert self.cmd("DATA").startswith("354")
        sent = 0
        while sent < size:
            self.sock.sendall(BLOCK)
            sent += len(BLOCK)
        self.sock.sendall(b".\r\n")
        r = self.reply()
        assert r.startswith("250"), r

    def bdat(self, size, last=True):
        sent = 0
        while sent < size:
            self.sock.sendall(b"BDAT %d\r\n" % len(BLOCK) + BLOCK)
            sent += len(BLOCK)
            r = self.reply()
            assert r.startswith("250"), r
        if last:
            r = self.cmd("BDAT 0 LAST")
            assert r.startswith("250"), r

    def close(self):
        try:
            self.cmd("QUIT")
        except Exception:
            pass
        self.sock.close()


def run(name, target_mb, scenario):
    port = free_port()
    spool = tempfile.mkdtemp(prefix="luasmtp-bench-")
    server = subprocess.Popen(["lua5.4", "bin/luasmtp", "serve", "bench/body_server.lua",
                               "--listen", "127.0.0.1:%d" % port, "--spool", spool,
                               "--lifetime", "300"], stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                time.sleep(0.05)
        warm = Client(port)
        warm.data(64 * 1024)
        warm.close()
        base = hwm_kb(server.pid)
        t0 = time.time()
        scenario(port, server.pid)
        grown = (hwm_kb(server.pid) - base) / 1024
        print("%-44s %8.1f MB %8.1f MB %6s %6.1f s" % (name, grown, target_mb,
              "ok" if grown < target_mb else "OVER", time.time() - t0))
        return grown < target_mb
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(spool, ignore_errors=True)


def data_100(port, pid):
    c = Client(port)
    c.data(100 * MB)
    c.close()


def bdat_100(port, pid):
    c = Client(port)
    c.envelope()
    c.bdat(100 * MB)
    c.close()


def bdat_5x20(port, pid):
    clients = [Client(port) for _ in range(5)]
    for c in clients:
        c.envelope()
    for c in clients:
        c.bdat(20 * MB, last=False)  # all five are now held unfinished
    for c in clients:
        r = c.cmd("BDAT 0 LAST")
        assert r.startswith("250"), r
        c.close()


def main():
    print("Server peak RSS growth (VmHWM) while receiving large bodies.")
    print("%-44s %11s %11s %6s %8s" % ("scenario", "growth", "target", "", "time"))
    ok = run("100 MB message by DATA", 4, data_100)
    ok = run("100 MB message by BDAT (1 MiB chunks)", 4, bdat_100) and ok
    ok = run("5 concurrent unfinished 20 MB BDAT bodies", 8, bdat_5x20) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
