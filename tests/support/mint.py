"""Mints JWTs with PyJWT, an implementation independent of tollgate's.

Reads one JSON object on stdin:
  {"alg": "HS256", "key": "secret" | "key_file": "path", "claims": {...},
   "headers": {...}, "hmac_with_key_file": false}
and prints the token. "hmac_with_key_file" builds an HS256 token by hand,
keyed with the raw bytes of key_file (PyJWT itself refuses to do this with a
PEM key, which is the attack being reproduced).
"""
import base64
import hashlib
import hmac
import json
import sys

import jwt

req = json.load(sys.stdin)
key = req.get("key")
if "key_file" in req:
    with open(req["key_file"], "rb") as f:
        key = f.read()

if req.get("hmac_with_key_file"):
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(req["claims"]).encode())
    signing_input = f"{header}.{payload}".encode()
    sig = b64(hmac.new(key, signing_input, hashlib.sha256).digest())
    print(f"{header}.{payload}.{sig}")
else:
    alg = req["alg"]
    print(jwt.encode(req["claims"], None if alg == "none" else key, algorithm=alg,
                     headers=req.get("headers")))
