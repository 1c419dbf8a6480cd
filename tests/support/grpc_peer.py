"""A real gRPC server and client (grpcio), for the proxy's gRPC tests.

No generated code: the service is registered with grpcio's generic handlers
and messages are raw bytes (no protobuf), which the proxy never looks into.

usage: grpc_peer.py server [--tls DIR] [--port N]
       grpc_peer.py call --target HOST:PORT --method unary|stream|fail
                         [--payload TEXT] [--token T] [--meta KEY=VALUE ...]
                         [--tls-ca CA.pem --authority NAME] [--timeout SECONDS]
                         [--brief]

server: listens on a free port of 127.0.0.1, plaintext HTTP/2 (h2c, prior
knowledge) or, with --tls DIR, TLS with DIR/server.pem (chain) and
DIR/server.key (ALPN h2); prints "PORT <n>" and serves until stdin closes.
With --port N it listens on that port and serves until it is killed (for
the README's recipes, where it runs in the background).
Service tollgate.test.Echo:
  Unary   answers the request bytes unchanged
  Stream  request is an ASCII integer n: streams b"msg-0" .. b"msg-<n-1>",
          ~20 ms apart, then OK with trailing metadata x-count = n
  Fail    request is an ASCII gRPC status code: fails with it, details
          "failed on purpose" (0 answers OK with an empty message)
Every method also sets trailing metadata describing what it received:
  x-seen-api-key        incoming x-api-key (absent if none came)
  x-seen-authorization  "present" or "absent"
  x-seen-proto          incoming x-forwarded-proto (absent if none came)
  x-seen-traceparent    incoming traceparent (absent if none came)
  x-seen-authority      the :authority the server saw (read from grpcio
                        internals; left out if a grpcio version hides it)

call: makes one call to /tollgate.test.Echo/<Method> and prints one JSON
object, whatever the gRPC status:
  {"code": "OK" | "UNAUTHENTICATED" | ..., "details": str,
   "messages": [text, ...], "trailing": {key: value}, "initial": {key: value}}
--token T sends metadata "authorization: Bearer T"; --meta adds any other
metadata. --tls-ca makes a secure channel trusting CA.pem, --authority sets
the TLS server name (SNI and verification) and :authority. --brief prints
only code, details, messages and the rate-limit headers (for the README's
recipes: nothing that changes from run to run or between grpcio versions).
Proxy variables
in the environment (http_proxy, grpc_proxy) are ignored. Exits non-zero only
on usage errors.
"""
import argparse
import json
import sys
import time
from concurrent import futures

import grpc

SERVICE = "tollgate.test.Echo"
CODES = {c.value[0]: c for c in grpc.StatusCode}


def seen(context):
    md = {}
    for key, value in context.invocation_metadata():
        md.setdefault(key, value)
    out = [("x-seen-authorization", "present" if "authorization" in md else "absent")]
    if "x-api-key" in md:
        out.append(("x-seen-api-key", md["x-api-key"]))
    if "x-forwarded-proto" in md:
        out.append(("x-seen-proto", md["x-forwarded-proto"]))
    if "traceparent" in md:
        out.append(("x-seen-traceparent", md["traceparent"]))
    # grpcio keeps :authority out of the metadata; its call details hold it.
    host = getattr(getattr(getattr(context, "_rpc_event", None), "call_details", None), "host", None)
    if host:
        out.append(("x-seen-authority", host.decode("utf-8", "replace")))
    return out


def unary(request, context):
    context.set_trailing_metadata(seen(context))
    return request


def stream(request, context):
    try:
        n = int(request.decode("ascii").strip() or "0")
    except (UnicodeDecodeError, ValueError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "payload must be an integer")
    context.set_trailing_metadata(seen(context) + [("x-count", str(n))])
    for i in range(n):
        if i:
            time.sleep(0.02)
        if not context.is_active():
            return
        yield f"msg-{i}".encode()


def fail(request, context):
    context.set_trailing_metadata(seen(context))
    try:
        code = CODES[int(request.decode("ascii").strip())]
    except (UnicodeDecodeError, ValueError, KeyError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "payload must be a gRPC status code")
    if code is grpc.StatusCode.OK:
        return b""
    context.abort(code, "failed on purpose")


def serve(args):
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    if args.tls:
        with open(f"{args.tls}/server.key", "rb") as f:
            key = f.read()
        with open(f"{args.tls}/server.pem", "rb") as f:
            chain = f.read()
        creds = grpc.ssl_server_credentials([(key, chain)])
        port = server.add_secure_port(f"127.0.0.1:{args.port}", creds)
    else:
        port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if not port:
        sys.exit("grpc_peer.py: could not bind a port")
    server.start()
    print("PORT", port, flush=True)
    if args.port:
        server.wait_for_termination()
        return
    # Runs until the test closes stdin (or dies).
    sys.stdin.read()
    server.stop(0)


def text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def as_dict(metadata):
    out = {}
    for key, value in metadata or ():
        value = text(value)
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def call(args):
    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        if args.authority:
            options += [
                ("grpc.ssl_target_name_override", args.authority),
                ("grpc.default_authority", args.authority),
            ]
        channel = grpc.secure_channel(args.target, creds, options=options)
    else:
        if args.authority:
            options.append(("grpc.default_authority", args.authority))
        channel = grpc.insecure_channel(args.target, options=options)
    metadata = []
    if args.token is not None:
        metadata.append(("authorization", f"Bearer {args.token}"))
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"grpc_peer.py: --meta wants KEY=VALUE, got {item!r}")
        metadata.append((key.lower(), value))
    method = {"unary": "Unary", "stream": "Stream", "fail": "Fail"}[args.method]
    path = f"/{SERVICE}/{method}"
    payload = args.payload.encode()
    messages = []
    with channel:
        if args.method == "stream":
            rpc = channel.unary_stream(path)(payload, timeout=args.timeout, metadata=metadata)
            try:
                for message in rpc:
                    messages.append(text(message))
            except grpc.RpcError:
                pass
        else:
            try:
                response, rpc = channel.unary_unary(path).with_call(
                    payload, timeout=args.timeout, metadata=metadata
                )
                messages.append(text(response))
            except grpc.RpcError as e:
                rpc = e
        result = {
            "code": rpc.code().name,
            "details": rpc.details() or "",
            "messages": messages,
            "trailing": as_dict(rpc.trailing_metadata()),
            "initial": as_dict(rpc.initial_metadata()),
        }
    if args.brief:
        limits = {k: v for k, v in result["initial"].items() if k.startswith("ratelimit")}
        result = {k: result[k] for k in ("code", "details", "messages")}
        result.update(limits)
    print(json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser(description="gRPC test peer")
    modes = parser.add_subparsers(dest="mode", required=True)
    server = modes.add_parser("server")
    server.add_argument("--tls", metavar="DIR")
    server.add_argument("--port", type=int, default=0)
    client = modes.add_parser("call")
    client.add_argument("--target", required=True)
    client.add_argument("--method", required=True, choices=["unary", "stream", "fail"])
    client.add_argument("--payload", default="")
    client.add_argument("--token")
    client.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")
    client.add_argument("--tls-ca")
    client.add_argument("--authority")
    client.add_argument("--timeout", type=float, default=10.0)
    client.add_argument("--brief", action="store_true")
    args = parser.parse_args()
    if args.mode == "server":
        serve(args)
    else:
        call(args)


if __name__ == "__main__":
    main()
