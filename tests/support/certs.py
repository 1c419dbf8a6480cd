"""A private CA and server certificates for the TLS tests, with cryptography.

usage: certs.py [--days N] [--serial-tag T] [--mismatch STEM] DIR [SPEC ...]

SPEC is a comma-separated list of DNS names and IP addresses, e.g.
"server,127.0.0.1,localhost"; its first item is also the file stem and the
certificate's common name. For each SPEC it writes

  DIR/<stem>.pem   the leaf certificate then the CA certificate (a chain)
  DIR/<stem>.key   the leaf's private key (PKCS#8 PEM, unencrypted)

signed by the CA in DIR/ca.pem + DIR/ca.key, which is made on the first run
and reused by later runs on the same DIR. Keys are EC P-256.

  --days N          validity from now (default 2); 0 or less makes a
                    certificate that has already expired
  --serial-tag T    write <stem>-<T>.pem / <stem>-<T>.key instead: a second,
                    different certificate (new key, new serial) for the same
                    names, for reload tests
  --mismatch STEM   also write DIR/STEM-mismatch.key, a fresh key that does
                    not match DIR/STEM.pem (repeatable)

Prints nothing; exits non-zero with a message on error.
"""
import argparse
import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


def name(common):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def san(item):
    try:
        return x509.IPAddress(ipaddress.ip_address(item))
    except ValueError:
        return x509.DNSName(item)


def write(path, data, private=False):
    with open(path, "wb") as f:
        f.write(data)
    if private:
        os.chmod(path, 0o600)


def key_pem(key):
    return key.private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_or_make_ca(directory):
    cert_path = os.path.join(directory, "ca.pem")
    key_path = os.path.join(directory, "ca.key")
    if os.path.exists(cert_path) and os.path.exists(key_path):
        with open(cert_path, "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
        return ca, ca_key
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("tollgate test CA"))
        .issuer_name(name("tollgate test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write(cert_path, ca.public_bytes(PEM))
    write(key_path, key_pem(ca_key), private=True)
    return ca, ca_key


def leaf(items, ca, ca_key, days):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = now + datetime.timedelta(days=days)
    not_before = min(now - datetime.timedelta(hours=1), not_after - datetime.timedelta(days=1))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(items[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName([san(i) for i in items]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def main():
    parser = argparse.ArgumentParser(description="private CA and server certificates")
    parser.add_argument("dir")
    parser.add_argument("specs", nargs="*", metavar="SPEC")
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--serial-tag")
    parser.add_argument("--mismatch", action="append", default=[], metavar="STEM")
    # Options may come before, between or after DIR and the SPECs.
    args = parser.parse_intermixed_args()
    if not args.specs and not args.mismatch:
        parser.error("nothing to make: give a SPEC or --mismatch STEM")
    os.makedirs(args.dir, exist_ok=True)
    ca, ca_key = load_or_make_ca(args.dir)
    for spec in args.specs:
        items = [i.strip() for i in spec.split(",") if i.strip()]
        if not items:
            parser.error(f"empty SPEC {spec!r}")
        stem = items[0] + (f"-{args.serial_tag}" if args.serial_tag else "")
        if os.sep in stem:
            parser.error(f"bad stem {stem!r}")
        cert, key = leaf(items, ca, ca_key, args.days)
        write(os.path.join(args.dir, stem + ".pem"), cert.public_bytes(PEM) + ca.public_bytes(PEM))
        write(os.path.join(args.dir, stem + ".key"), key_pem(key), private=True)
    for stem in args.mismatch:
        write(
            os.path.join(args.dir, stem + "-mismatch.key"),
            key_pem(ec.generate_private_key(ec.SECP256R1())),
            private=True,
        )


if __name__ == "__main__":
    try:
        main()
    except OSError as e:
        sys.exit(f"certs.py: {e}")
