#!/usr/bin/env python3
"""https_server.py - an HTTP(S) server for the luasmtp tests (stdlib only).

Usage:
  https_server.py [--host 127.0.0.1] [--port 0] [--cert PEM --key KEY]
                  [--root DIR] [--lifetime 60]

Without --cert it speaks plain HTTP. The first line on stdout is the TCP
port (useful with --port 0). The server exits by itself after --lifetime
seconds; a thread per connection, so a stalled request blocks no other.

Paths:
  /hello               200 "hello"
  /status/N            status N, body "status N"
  /echo                200, JSON {method, path, headers: [[name, value]...], body}
  /size/N              N bytes with a Content-Length
  /stream/N            N bytes without Content-Length, then close
  /stall               never answers (holds the connection)
  /stall-body          headers and 10 of 100 announced bytes, then nothing
  /sleep/S             answers "slept" after S seconds (at most 10)
  /redirect            302 to /hello
  /redirect-ftp        302 to ftp://127.0.0.1/
  /loop                302 to /loop
  /headers             repeated and folded header fields
  /bigheaders          100 header fields of 1000 bytes each
  POST anything else   stored as ROOT/received/N.body and N.json
                       ({path, headers}), 200 "stored N"
  any other GET        the file ROOT/<host>/<path> (host without port):
                       200 with the file (Content-Type text/plain, or
                       the contents of <path>.ctype), or 301 to the
                       contents of <path>.redirect if that exists, else 404
"""
import argparse
import json
import os
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STALL = 60


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "luasmtp-test"
    counter_lock = threading.Lock()
    counter = [0]

    def setup(self):
        ctx = self.server.tls
        if ctx is not None:
            self.request.settimeout(STALL)
            self.request = ctx.wrap_socket(self.request, server_side=True)
        super().setup()

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

    def reply(self, status, body=b"", headers=(), length=True):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        parts = path.strip("/").split("/")
        if path == "/hello":
            self.reply(200, b"hello", [("Content-Type", "text/plain")])
        elif parts[0] == "status" and len(parts) == 2:
            n = int(parts[1])
            self.reply(n, ("status %d" % n).encode())
        elif path == "/echo":
            self.echo(b"")
        elif parts[0] == "size" and len(parts) == 2:
            self.reply(200, b"a" * int(parts[1]))
        elif parts[0] == "stream" and len(parts) == 2:
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"b" * int(parts[1]))
            self.close_connection = True
        elif path == "/stall":
            time.sleep(STALL)
        elif path == "/stall-body":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            time.sleep(STALL)
        elif parts[0] == "sleep" and len(parts) == 2:
            time.sleep(min(float(parts[1]), 10.0))
            self.reply(200, b"slept")
        elif path == "/redirect":
            self.reply(302, b"", [("Location", "/hello")])
        elif path == "/redirect-ftp":
            self.reply(302, b"", [("Location", "ftp://127.0.0.1/")])
        elif path == "/loop":
            self.reply(302, b"", [("Location", "/loop")])
        elif path == "/headers":
            self.send_response(200)
            self.send_header("Set-Cookie", "a=1")
            self.send_header("X-Multi", "one")
            self.send_header("Set-Cookie", "b=2")
            self.send_header("X-Multi", "two")
            self.send_header("X-Spaces", "  padded value \t")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        elif path == "/bigheaders":
            self.send_response(200)
            for i in range(100):
                self.send_header("X-Big-%d" % i, "v" * 1000)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.serve_file(path)

    def serve_file(self, path):
        root = self.server.root
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        if root is None or not host or ".." in path or "/" in host:
            self.reply(404, b"not found")
            return
        full = os.path.join(root, host, path.lstrip("/"))
        if os.path.isfile(full + ".redirect"):
            with open(full + ".redirect") as f:
                self.reply(301, b"", [("Location", f.read().strip())])
        elif os.path.isfile(full):
            ctype = "text/plain"
            if os.path.isfile(full + ".ctype"):
                with open(full + ".ctype") as f:
                    ctype = f.read().strip()
            with open(full, "rb") as f:
                self.reply(200, f.read(), [("Content-Type", ctype)])
        else:
            self.reply(404, b"not found")

    def echo(self, body):
        doc = {
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
        }
        self.reply(200, json.dumps(doc).encode(), [("Content-Type", "application/json")])

    def do_POST(self):
        body = self.read_body()
        if self.path.split("?", 1)[0] == "/echo":
            self.echo(body)
            return
        if self.server.root is None:
            self.reply(404, b"no root")
            return
        with self.counter_lock:
            self.counter[0] += 1
            n = self.counter[0]
        d = os.path.join(self.server.root, "received")
        os.makedirs(d, exist_ok=True)
        base = os.path.join(d, "%d" % n)
        with open(base + ".body.tmp", "wb") as f:
            f.write(body)
        with open(base + ".json.tmp", "w") as f:
            json.dump({"path": self.path, "headers": [[k, v] for k, v in self.headers.items()]}, f)
        os.rename(base + ".body.tmp", base + ".body")
        os.rename(base + ".json.tmp", base + ".json")
        self.reply(200, ("stored %d" % n).encode())

    do_PUT = do_POST
    do_DELETE = do_GET


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--root")
    ap.add_argument("--lifetime", type=float, default=60)
    args = ap.parse_args()

    ThreadingHTTPServer.daemon_threads = True
    httpd = ThreadingHTTPServer((args.host, args.port), Handler)
    httpd.root = args.root
    httpd.tls = None
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        httpd.tls = ctx
    print(httpd.server_address[1], flush=True)
    timer = threading.Timer(args.lifetime, lambda: os._exit(0))
    timer.daemon = True
    timer.start()
    httpd.serve_forever()


if __name__ == "__main__":
    main()
