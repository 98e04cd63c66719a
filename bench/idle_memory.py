"""Memory per idle server session after EHLO (plain, and after STARTTLS).

Starts bench/idle_server.lua (a sink server with its connection limits
raised and a stats listener), opens SESSIONS connections spread over
several 127.0.0.x source addresses, sends EHLO on each (for the TLS row:
EHLO, STARTTLS, the handshake, EHLO again) and leaves them idle. Then it
divides the growth of the server's VmRSS (/proc/PID/status) over the
baseline by the number of sessions, and does the same with what the
server reports through luasmtp.stats(): the Lua heap (after a full
collection) and the bytes its sockets hold in buffers.
Targets: at most 8 KiB (plain) and 24 KiB (TLS) of RSS per session.

Usage: python3 bench/idle_memory.py [--sessions N] [--only plain|tls]
       (from the repository root; make bench)
"""
import argparse
import os
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

from proctree import free_port

TARGETS = {"plain": 8 * 1024, "tls": 24 * 1024}


def status_kb(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no " + field)


def wait_port(port):
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("port %d did not open" % port)


def server_stats(port):
    with socket.create_connection(("127.0.0.1", port), 30) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    out = {}
    for kv in data.decode().split():
        k, v = kv.split("=", 1)
        out[k] = float(v)
    return out


def read_reply(f):
    while True:
        line = f.readline()
        if not line:
            raise RuntimeError("connection closed")
        if line[3:4] != b"-":
            return line


def open_session(port, i, tls_ctx):
    s = socket.socket()
    s.bind(("127.0.%d.%d" % (1 + i // 250 % 200, 2 + i % 250), 0))
    s.settimeout(60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.connect(("127.0.0.1", port))
    f = s.makefile("rb")
    assert read_reply(f).startswith(b"220")
    s.sendall(b"EHLO bench.test\r\n")
    assert read_reply(f).startswith(b"250")
    if tls_ctx is None:
        return s, f
    s.sendall(b"STARTTLS\r\n")
    assert read_reply(f).startswith(b"220")
    f.close()
    t = tls_ctx.wrap_socket(s, server_hostname="localhost")
    f = t.makefile("rb")
    t.sendall(b"EHLO bench.test\r\n")
    assert read_reply(f).startswith(b"250")
    return t, f


def make_cert(d):
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


def run(kind, n, tmp):
    port, sport = free_port(), free_port()
    cmd = ["lua5.4", "bin/luasmtp", "serve", "bench/idle_server.lua", "--listen", "127.0.0.1:%d" % port,
           "--stats", "127.0.0.1:%d" % sport, "--lifetime", "600"]
    tls_ctx = None
    if kind == "tls":
        cert, key = make_cert(tmp)
        cmd += ["--cert", cert, "--key", key]
        tls_ctx = ssl.create_default_context()
        tls_ctx.check_hostname = False
        tls_ctx.verify_mode = ssl.CERT_NONE
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    conns = []
    try:
        wait_port(sport)
        # Warm-up: a few sessions come and go, so what every session
        # needs once (code pages, the allocator's first arenas, OpenSSL's
        # tables) is in the baseline.
        for i in range(50):
            s, f = open_session(port, i, tls_ctx)
            s.sendall(b"QUIT\r\n")
            read_reply(f)
            s.close()
        time.sleep(0.5)
        base = server_stats(sport)
        base_rss = status_kb(server.pid, "VmRSS")
        t0 = time.time()
        for i in range(n):
            conns.append(open_session(port, i, tls_ctx))
        took = time.time() - t0
        time.sleep(0.5)
        st = server_stats(sport)
        rss = status_kb(server.pid, "VmRSS")
        assert st["sockets"] - base["sockets"] == n, (st, base)
        per = (rss - base_rss) * 1024.0 / n
        lua = (st["lua_kib"] - base["lua_kib"]) * 1024.0 / n
        buf = (st.get("buffer_bytes", 0) - base.get("buffer_bytes", 0)) / n
        target = TARGETS[kind]
        print("%-6s %7d %10.0f B %8.0f B %8.0f B %10d B %5s %6.1f s" % (
            kind, n, per, lua, buf, target, "ok" if per <= target else "OVER", took))
        return per <= target
    finally:
        for s, f in conns:
            f.close()
            s.close()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=5000)
    ap.add_argument("--only", choices=["plain", "tls"])
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 2 * args.sessions + 1000) if hard != resource.RLIM_INFINITY else 2 * args.sessions + 1000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the server inherits it
    if want < args.sessions + 200:
        print("RLIMIT_NOFILE hard limit %d is too low for %d sessions" % (hard, args.sessions))
        return 1
    print("Server memory per idle session after EHLO (RSS growth / sessions; Lua heap and")
    print("socket buffers from luasmtp.stats()).")
    print("%-6s %7s %12s %10s %10s %12s %5s %8s" % ("kind", "sessions", "RSS/session", "Lua heap",
                                                   "buffers", "target", "", "open"))
    tmp = tempfile.mkdtemp(prefix="luasmtp-idle-")
    try:
        ok = True
        for kind in ("plain", "tls"):
            if args.only in (None, kind):
                ok = run(kind, args.sessions, tmp) and ok
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
