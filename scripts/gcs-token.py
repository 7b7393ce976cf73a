#!/usr/bin/env python3
"""A Google OAuth token endpoint and a bearer-checking front for a GCS emulator, for the
importer's gcs tests (gcp-storage-emulator issues no tokens and checks none).

POST /token  grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=JWT
    The JWT must be RS256 with header {"alg":"RS256","typ":"JWT"}, signed by the key whose
    public half is --public-key, with iss=--email, scope=devstorage.read_only, aud=this
    endpoint's /token URL, exp=iat+3600 and iat near now. Answers
    {"access_token":...,"expires_in":3600,"token_type":"Bearer"}, else 400.
GET /anything
    Needs "Authorization: Bearer <a token issued here>" (else 401), then relays the GET
    (and its Range header) to --upstream.

Usage: gcs-token.py --public-key PEM --email EMAIL --upstream URL --port-file FILE
"""
import argparse
import os
import base64
import json
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"

ap = argparse.ArgumentParser()
ap.add_argument("--public-key", required=True)
ap.add_argument("--email", required=True)
ap.add_argument("--upstream", required=True)
ap.add_argument("--port-file", required=True)
args = ap.parse_args()
with open(args.public_key, "rb") as f:
    PUBLIC = serialization.load_pem_public_key(f.read())
TOKENS = set()
LOCK = threading.Lock()


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def check_jwt(jwt, aud):
    parts = jwt.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    header = json.loads(b64d(parts[0]))
    if header != {"alg": "RS256", "typ": "JWT"}:
        raise ValueError(f"bad header {header}")
    try:
        PUBLIC.verify(b64d(parts[2]), (parts[0] + "." + parts[1]).encode(),
                      padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise ValueError("bad signature")
    c = json.loads(b64d(parts[1]))
    want = {"iss": args.email, "scope": SCOPE, "aud": aud}
    for k, v in want.items():
        if c.get(k) != v:
            raise ValueError(f"claim {k}={c.get(k)!r}, want {v!r}")
    if c["exp"] - c["iat"] != 3600 or abs(c["iat"] - time.time()) > 300:
        raise ValueError(f"bad times iat={c['iat']} exp={c['exp']}")


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, body, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(n).decode())
        aud = f"http://{self.headers['Host']}/token"
        try:
            if self.path != "/token":
                raise ValueError("not /token")
            if self.headers.get("Content-Type") != "application/x-www-form-urlencoded":
                raise ValueError("not a form")
            if form.get("grant_type") != [GRANT]:
                raise ValueError(f"grant_type {form.get('grant_type')}")
            check_jwt(form.get("assertion", [""])[0], aud)
        except Exception as e:  # any malformed request is refused
            body = json.dumps({"error": "invalid_grant", "error_description": str(e)})
            return self.reply(400, body.encode())
        token = secrets.token_urlsafe(24)
        with LOCK:
            TOKENS.add(token)
        body = {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}
        self.reply(200, json.dumps(body).encode())

    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        with LOCK:
            ok = auth.startswith("Bearer ") and auth[7:] in TOKENS
        if not ok:
            return self.reply(401, b'{"error":"no valid bearer token"}')
        req = urllib.request.Request(args.upstream.rstrip("/") + self.path)
        if self.headers.get("Range"):
            req.add_header("Range", self.headers["Range"])
        try:
            r = urllib.request.urlopen(req)
        except urllib.error.HTTPError as e:
            r = e
        self.send_response(r.status)
        for k in ("Content-Length", "Content-Range", "Content-Type"):
            if r.headers.get(k):
                self.send_header(k, r.headers[k])
        self.end_headers()
        while True:
            b = r.read(256 << 10)
            if not b:
                break
            self.wfile.write(b)

    def log_message(self, fmt, *a):
        pass


srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(args.port_file + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
os.rename(args.port_file + ".tmp", args.port_file)
srv.serve_forever()
