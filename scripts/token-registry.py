#!/usr/bin/env python3
"""Docker token-auth front for a plain test registry (stdlib only; pulls and pushes).

Usage: token-registry.py --port P --upstream HOST:PORT [--user user --password pass]
                         [--addr 127.0.0.1] [--pid-file F]

- /v2/... without a known `Authorization: Bearer <token>`: 401 with
  `WWW-Authenticate: Bearer realm="http://ADDR:P/token",service="test-registry"[,scope=...]`.
- GET /token?service=..&scope=.. with the right Basic credentials:
  {"token": T, "access_token": T, "expires_in": 300, "issued_at": ...}; else 401.
  The token grants the actions its scopes name.
- /v2/... with a valid token: forwarded to the upstream registry; status, headers and
  a streamed body are passed through (Host is kept, so Location points back here).
  POST/PUT/PATCH/DELETE need a token whose scope has `push` for that repository (else 401
  with `error="insufficient_scope"` and the `pull,push` scope); request bodies
  (Content-Length) are streamed upstream.
"""
import argparse
import base64
import http.client
import json
import os
import re
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERVICE = "test-registry"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate"}
tokens = {}  # token -> {repository: set of actions}
tokens_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "token-registry"

    def log_message(self, fmt, *args):
        pass

    def reply(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        self.route()

    def do_HEAD(self):
        self.route()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def route(self):
        try:
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/token":
                return self.token(url)
            if url.path == "/v2" or url.path.startswith("/v2/"):
                return self.v2(url)
            self.reply(404)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def token(self, url):
        want = "Basic " + base64.b64encode(
            f"{self.server.user}:{self.server.password}".encode()).decode()
        if self.headers.get("Authorization") != want:
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}'
            return self.reply(401, body, [("Content-Type", "application/json"),
                                          ("WWW-Authenticate", 'Basic realm="token"')])
        grants = {}
        for scope in urllib.parse.parse_qs(url.query).get("scope", []):
            for one in scope.split(" "):
                parts = one.split(":")
                if len(parts) >= 3 and parts[0] == "repository":
                    grants.setdefault(":".join(parts[1:-1]), set()).update(parts[-1].split(","))
        tok = secrets.token_urlsafe(24)
        with tokens_lock:
            tokens[tok] = grants
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = json.dumps({"token": tok, "access_token": tok, "expires_in": 300,
                           "issued_at": issued}).encode()
        self.reply(200, body, [("Content-Type", "application/json")])

    def v2(self, url):
        auth = self.headers.get("Authorization", "")
        tok = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        m = re.match(r"^/v2/(.+?)/(manifests|blobs|tags)/", url.path)
        push = self.command not in ("GET", "HEAD")
        with tokens_lock:
            grants = tokens.get(tok)
        ok = grants is not None
        if ok and m:
            want = "push" if push else "pull"
            ok = want in grants.get(m.group(1), set())
        if not ok:
            host = f"{self.server.server_address[0]}:{self.server.server_address[1]}"
            chal = f'Bearer realm="http://{host}/token",service="{SERVICE}"'
            if m:
                actions = "pull,push" if push else "pull"
                chal += f',scope="repository:{m.group(1)}:{actions}"'
            if grants is not None:
                chal += ',error="insufficient_scope"'
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
            return self.reply(401, body, [("Content-Type", "application/json"),
                                          ("WWW-Authenticate", chal)])
        self.forward()

    def forward(self):
        up = http.client.HTTPConnection(self.server.upstream, timeout=60)
        # Header by header: clients send several `Accept` lines, all must reach the registry.
        up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in self.headers.items():
            if k.lower() not in HOP_BY_HOP and k.lower() != "authorization":
                up.putheader(k, v)
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding"):
            up.close()
            return self.reply(411, b"chunked request bodies are not supported here")
        up.endheaders()
        while length > 0:
            buf = self.rfile.read(min(length, 64 * 1024))
            if not buf:
                break
            up.send(buf)
            length -= len(buf)
        resp = up.getresponse()
        self.send_response(resp.status)
        length = resp.getheader("Content-Length")
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        if length is None and self.command != "HEAD":
            # Unknown length: end the body by closing the connection.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            while True:
                buf = resp.read(64 * 1024)
                if not buf:
                    break
                self.wfile.write(buf)
        up.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the plain registry")
    ap.add_argument("--addr", default="127.0.0.1")
    ap.add_argument("--user", default="user")
    ap.add_argument("--password", default="pass")
    ap.add_argument("--pid-file")
    a = ap.parse_args()
    srv = ThreadingHTTPServer((a.addr, a.port), Handler)
    srv.daemon_threads = True
    srv.upstream, srv.user, srv.password = a.upstream, a.user, a.password
    if a.pid_file:
        with open(a.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    srv.serve_forever()


if __name__ == "__main__":
    main()
