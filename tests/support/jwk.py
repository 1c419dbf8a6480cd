"""Prints the public JWK (RFC 7517) of a PEM public key, with PyJWT.

usage: jwk.py PEM_FILE KID ALG
ALG "-" leaves "alg" out of the JWK (the key's type alone says what it is for);
"EdDSA" makes an OKP key, "RS*"/"PS*" an RSA key, anything else an EC key.
"""
import json
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

path, kid, alg = sys.argv[1:4]
with open(path, "rb") as f:
    key = serialization.load_pem_public_key(f.read())
if alg == "EdDSA":
    algo = OKPAlgorithm
elif alg.startswith(("RS", "PS")) or (alg == "-" and isinstance(key, rsa.RSAPublicKey)):
    algo = RSAAlgorithm
else:
    algo = ECAlgorithm
jwk = json.loads(algo.to_jwk(key))
jwk.update({"kid": kid, "use": "sig"})
if alg != "-":
    jwk["alg"] = alg
print(json.dumps(jwk))
