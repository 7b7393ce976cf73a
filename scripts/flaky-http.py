#!/usr/bin/env python3
"""Test HTTP file server that misbehaves on purpose (stdlib only).

Usage: flaky-http.py --root DIR --port P [--addr 127.0.0.1] [--pid-file F]

Serves files under DIR with Content-Length and Accept-Ranges: bytes; honours
`Range: bytes=N-` and `bytes=N-M` with 206. Faults, keyed on the request target
(path + query, so `?run=<id>` re-arms them for a new test):
  /drop/...  the first full (non-Range) GET sends half the body, then closes.
  /slow/...  the first full GET sends half the body, then stalls forever.
Later GETs and all Range GETs of the same target succeed.
"""
import argparse
import os
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 64 * 1024
seen = set()  # targets whose first full GET already happened
seen_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "flaky-http"

    def log_message(self, fmt, *args):  # quiet; errors still go to stderr
        pass

    def do_HEAD(self):
        self.serve(body=False)

    def do_GET(self):
        self.serve(body=True)

    def resolve(self):
        """Map the URL path onto a regular file under root, or None."""
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        root = self.server.root
        full = os.path.realpath(os.path.join(root, rel))
        if full != root and not full.startswith(root + os.sep):
            return None
        return full if os.path.isfile(full) else None

    def fail(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def serve(self, body):
        try:
            self.serve_inner(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away: normal in tests

    def serve_inner(self, body):
        path = self.resolve()
        if path is None:
            return self.fail(404)
        size = os.path.getsize(path)
        rng = self.headers.get("Range")
        start, end = 0, size - 1
        if rng is not None:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m.group(1)) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m.group(1))
            if m.group(2):
                end = min(int(m.group(2)), size - 1)
        fault = None
        if body and rng is None:
            top = urllib.parse.urlsplit(self.path).path.lstrip("/").split("/", 1)[0]
            if top in ("drop", "slow"):
                with seen_lock:
                    if self.path not in seen:
                        seen.add(self.path)
                        fault = top
        self.send_response(206 if rng is not None else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if rng is not None:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        # With a fault, only the first half of the body is sent.
        remaining = (size // 2) if fault else (end - start + 1)
        with open(path, "rb") as f:
            f.seek(start)
            while remaining > 0:
                buf = f.read(min(CHUNK, remaining))
                if not buf:
                    break
                self.wfile.write(buf)
                remaining -= len(buf)
        self.wfile.flush()
        if fault == "slow":
            # Stall with the connection open until the client gives up.
            while True:
                time.sleep(3600)
        if fault == "drop":
            self.close_connection = True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--addr", default="127.0.0.1")
    ap.add_argument("--pid-file")
    a = ap.parse_args()
    srv = ThreadingHTTPServer((a.addr, a.port), Handler)
    srv.daemon_threads = True
    srv.root = os.path.realpath(a.root)
    if a.pid_file:
        with open(a.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    srv.serve_forever()


if __name__ == "__main__":
    main()
