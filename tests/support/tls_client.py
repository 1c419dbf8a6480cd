"""An HTTPS/1.1 client on Python's ssl module (OpenSSL), to check tollgate's
TLS listeners with an implementation independent of its own.

usage: tls_client.py HOST PORT --ca CA.pem [--sni NAME] [--min 1.2] [--max 1.3]
                     [--delay-handshake SECS] [--pause-in-head SECS]

Connects once and prints one JSON line: {"version", "alpn", "serial",
"names"} of the handshake, or {"error": "..."} when it fails. Then, for
every line "PATH" read on stdin, sends `GET PATH` on that same connection
and prints {"status": N, "body": "..."} (or {"error": ...}), so a test can
hold a connection open across a reload. Exits when stdin closes.
--delay-handshake: connect, then wait that long before the TLS handshake.
--pause-in-head: send each request head in two parts, that long apart.
"""
import argparse
import json
import socket
import ssl
import sys
import time
import warnings

VERSIONS = {"1.1": "TLSv1_1", "1.2": "TLSv1_2", "1.3": "TLSv1_3"}


def say(obj):
    print(json.dumps(obj), flush=True)


def read_response(f):
    status_line = f.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = f.read(length) if length else b""
    return status, body.decode("utf-8", "replace")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--sni")
    ap.add_argument("--min")
    ap.add_argument("--max")
    ap.add_argument("--delay-handshake", type=float, default=0.0)
    ap.add_argument("--pause-in-head", type=float, default=0.0)
    args = ap.parse_args()

    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if args.min:
            ctx.minimum_version = getattr(ssl.TLSVersion, VERSIONS[args.min])
        if args.max:
            ctx.maximum_version = getattr(ssl.TLSVersion, VERSIONS[args.max])
        if args.min == "1.1" or args.max == "1.1":
            # Let this client offer what old clients offer; the server decides.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        raw = socket.create_connection((args.host, args.port), timeout=10)
        time.sleep(args.delay_handshake)
        conn = ctx.wrap_socket(raw, server_hostname=args.sni or args.host)
    except (ssl.SSLError, OSError) as e:
        say({"error": f"{type(e).__name__}: {e}"})
        return
    cert = conn.getpeercert()
    names = [v for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "IP Address")]
    say({
        "version": conn.version(),
        "alpn": conn.selected_alpn_protocol(),
        "serial": cert.get("serialNumber"),
        "names": names,
    })
    f = conn.makefile("rb")
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        try:
            host = args.sni or args.host
            conn.sendall(f"GET {path} HTTP/1.1\r\n".encode())
            time.sleep(args.pause_in_head)
            conn.sendall(f"Host: {host}\r\n\r\n".encode())
            status, body = read_response(f)
            say({"status": status, "body": body})
        except (OSError, ValueError, ConnectionError) as e:
            say({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
