#!/usr/bin/env python3
"""Memory benchmark: how much a server's peak RSS grows with large bodies.

Each scenario starts a fresh bench/memory_server.lua (a Maildir MX),
reads its peak RSS (VmHWM in /proc/PID/status) once it is idle, runs the
scenario, and reports the growth:
  - one 100 MB message by DATA, one by BDAT (delivered to the Maildir);
  - five concurrent BDAT transactions of 20 MB each, left unfinished.
Targets (issue: streaming bodies): < 4 MB for the first two, < 8 MB for
the third.
"""
import os, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1024 * 1024


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def hwm_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


class Client:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), 10)
        self.sock.settimeout(120)
        self.buf = b""
        self.reply()

    def reply(self):
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise RuntimeError("closed")
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return line

    def cmd(self, line):
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def envelope(self):
        self.cmd("EHLO bench.test")
        assert self.cmd("MAIL FROM:<a@bench.test>").startswith(b"250")
        assert self.cmd("RCPT TO:<b@memory.test>").startswith(b"250")


LINE = b"x" * 78 + b"\r\n"
BLOCK = LINE * (MB // len(LINE))


def data_message(port, size):
    c = Client(port)
    c.envelope()
    assert c.cmd("DATA").startswith(b"354")
    c.sock.sendall(b"Subject: big\r\n\r\n")
    sent = 0
    while sent < size:
        c.sock.sendall(BLOCK)
        sent += len(BLOCK)
    c.sock.sendall(b".\r\n")
    r = c.reply()
    assert r.startswith(b"250"), r


def bdat_message(port, size, last=True, chunk=MB):
    c = Client(port)
    c.envelope()
    sent = 0
    head = b"Subject: big\r\n\r\n"
    first = True
    while sent < size:
        piece = (head + BLOCK)[:chunk] if first else BLOCK[:chunk]
        first = False
        final = last and sent + len(piece) >= size
        c.sock.sendall(b"BDAT %d%s\r\n" % (len(piece), b" LAST" if final else b"") + piece)
        r = c.reply()
        assert r.startswith(b"250"), r
        sent += len(piece)
    return c


def scenario(name, run):
    tmp = tempfile.mkdtemp(prefix="luasmtp-membench-")
    port = free_port()
    env = dict(os.environ)
    env["LUA_PATH_5_4"] = f"{ROOT}/lua/?.lua;{ROOT}/lua/?/init.lua;;"
    env["LUA_CPATH_5_4"] = f"{ROOT}/build/?.so;;"
    proc = subprocess.Popen(["lua5.4", f"{ROOT}/bench/memory_server.lua", str(port), tmp + "/md"], env=env)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                time.sleep(0.05)
        # one small message first, so the baseline includes a warm server
        bdat_message(port, 1000).sock.close()
        time.sleep(0.2)
        before = hwm_kb(proc.pid)
        keep = run(port)
        time.sleep(0.5)
        after = hwm_kb(proc.pid)
        for c in keep or []:
            c.sock.close()
        return (after - before) / 1024
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    rows = [
        ("100 MB message by DATA", lambda p: data_message(p, 100 * MB), 4),
        ("100 MB message by BDAT", lambda p: bdat_message(p, 100 * MB) and None, 4),
        ("5 unfinished 20 MB BDAT bodies",
         lambda p: [bdat_message(p, 20 * MB, last=False) for _ in range(5)], 8),
    ]
    print("Peak RSS growth of the server (VmHWM), bench/memory.py.")
    print(f"{'workload':<34} {'growth MB':>10} {'target MB':>10}")
    for name, run, target in rows:
        growth = scenario(name, run)
        print(f"{name:<34} {growth:>10.1f} {'< ' + str(target):>10}")


if __name__ == "__main__":
    sys.exit(main())
