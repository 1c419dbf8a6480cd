"""Prints the public JWK (RFC 7517) of a PEM public key, with PyJWT.

usage: jwk.py PEM_FILE KID ALG
"""
import json
import sys

from cryptography.hazmat.primitives import serialization
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

path, kid, alg = sys.argv[1:4]
with open(path, "rb") as f:
    key = serialization.load_pem_public_key(f.read())
algo = RSAAlgorithm if alg.startswith(("RS", "PS")) else ECAlgorithm
jwk = json.loads(algo.to_jwk(key))
jwk.update({"kid": kid, "alg": alg, "use": "sig"})
print(json.dumps(jwk))
