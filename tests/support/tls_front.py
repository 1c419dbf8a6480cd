"""A TLS front for the tests' plain HTTP servers, on Python's ssl module.

usage: tls_front.py DIR BACKEND_PORT [PORT]

Makes a private CA and a certificate for 127.0.0.1 / localhost signed by it
(DIR/ca.pem, DIR/server.pem, DIR/server.key), listens with TLS on a free
port of 127.0.0.1, prints "PORT <n>" and relays every connection's bytes to
127.0.0.1:BACKEND_PORT until stdin closes. Given a PORT, it listens there
and relays until it is killed (the README's recipes run it in the background).
"""
import asyncio
import datetime
import ipaddress
import os
import ssl
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def name(common):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def certificate(subject, issuer, key, signer, ca, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(sans)), critical=False
        ).add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def make_certificates(directory):
    os.makedirs(directory, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("tollgate test CA", "tollgate test CA", ca_key, ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    leaf = certificate("127.0.0.1", "tollgate test CA", key, ca_key, False, sans)
    pem = serialization.Encoding.PEM
    write(os.path.join(directory, "ca.pem"), ca.public_bytes(pem))
    write(os.path.join(directory, "server.pem"), leaf.public_bytes(pem))
    write(
        os.path.join(directory, "server.key"),
        key.private_bytes(
            pem,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def main(directory, backend_port, port):
    make_certificates(directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(
        os.path.join(directory, "server.pem"), os.path.join(directory, "server.key")
    )

    async def relay(client_reader, client_writer):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", backend_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))

    server = await asyncio.start_server(relay, "127.0.0.1", port, ssl=context)
    print("PORT", server.sockets[0].getsockname()[1], flush=True)
    if port:
        await asyncio.Future()
    loop = asyncio.get_running_loop()
    # Runs until the test closes stdin (or dies).
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0))
