"""A real WebSocket server and client (websockets, asyncio API), for the
proxy's WebSocket tests.

usage: ws_peer.py server
       ws_peer.py client --url ws://HOST:PORT/PATH | wss://HOST:PORT/PATH
                         [--tls-ca CA.pem] [--authority NAME] [--token T]
                         [--header "Name: value" ...] [--send a,b,c]
                         [--binary] [--hold SECONDS] [--headers-probe]
                         [--timeout SECONDS]

server: listens on a free port of 127.0.0.1, prints "PORT <n>" and serves
until stdin closes. On a WebSocket connection (any path) it echoes every
text and binary message, except:
  "headers?"    answers with a JSON object of the handshake request headers
                it saw (lower-case names, repeated headers joined by ", ",
                plus ":path" for the request path)
  "close:CODE"  closes the connection with that close code
A request that is not an upgrade (a plain GET, any path) gets 200 with the
body "plain", so a test can tell a tunnel from a plain request. An upgrade
request for /refuse/NNN is refused with status NNN and the body
"refused by upstream". Pings are off, so an idle connection stays silent.

client: opens the handshake (with "Authorization: Bearer T" if --token;
--header adds others), waits --hold seconds idle (no pings), then sends each
--send message (text, or bytes with --binary) and waits for its echo, then
with --headers-probe sends "headers?". Prints one JSON object:
  {"status": 101, "echoed": [text, ...], "headers": {name: value},
   "response_headers": {name: value}}        on success ("headers" is the
                                             probe's answer, {} without it)
  {"status": <HTTP status>, "body": text}    the handshake was refused
  {"error": text, "closed_code": n | null}   the connection failed or died
                                             (1006: closed without a close
                                             frame; null: never opened)
Proxy variables in the environment are ignored. --authority is the TLS
server name (SNI and verification) for wss://. Exits 0 in all these cases,
non-zero only on usage errors.
"""
import argparse
import asyncio
import http
import json
import ssl
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State


def lower_headers(headers):
    out = {}
    for key, value in headers.raw_items():
        key = key.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def process_request(connection, request):
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    if not upgrade:
        return connection.respond(http.HTTPStatus.OK, "plain")
    if request.path.startswith("/refuse/"):
        try:
            status = int(request.path.split("/")[2])
        except ValueError:
            status = 403
        return connection.respond(status, "refused by upstream")
    return None


async def echo(ws):
    try:
        async for message in ws:
            if message == "headers?":
                seen = lower_headers(ws.request.headers)
                seen[":path"] = ws.request.path
                await ws.send(json.dumps(seen))
            elif isinstance(message, str) and message.startswith("close:"):
                await ws.close(int(message[6:]), "asked to close")
            else:
                await ws.send(message)
    except ConnectionClosed:
        pass


async def run_server(port):
    async with serve(
        echo, "127.0.0.1", port, process_request=process_request, ping_interval=None
    ) as server:
        print("PORT", server.sockets[0].getsockname()[1], flush=True)
        if port:
            # A fixed port (the README's recipes): until killed.
            await asyncio.Future()
        # Runs until the test closes stdin (or dies).
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def closed_code(exc):
    if exc.rcvd is not None:
        return exc.rcvd.code
    if exc.sent is not None:
        return exc.sent.code
    return 1006


async def run_client(args):
    headers = []
    if args.token is not None:
        headers.append(("Authorization", f"Bearer {args.token}"))
    for item in args.header:
        key, sep, value = item.partition(":")
        if not sep:
            sys.exit(f"ws_peer.py: --header wants 'Name: value', got {item!r}")
        headers.append((key.strip(), value.strip()))
    options = {}
    if args.url.startswith("wss://"):
        context = ssl.create_default_context(cafile=args.tls_ca)
        options["ssl"] = context
        if args.authority:
            options["server_hostname"] = args.authority
    messages = [m for m in args.send.split(",")] if args.send else []
    try:
        async with connect(
            args.url,
            additional_headers=headers,
            proxy=None,
            ping_interval=None,
            open_timeout=args.timeout,
            close_timeout=2,
            **options,
        ) as ws:
            result = {
                "status": ws.response.status_code,
                "echoed": [],
                "headers": {},
                "response_headers": lower_headers(ws.response.headers),
            }
            if args.hold:
                await asyncio.sleep(args.hold)
                if ws.state is not State.OPEN:
                    # Died while idle: wait_closed() never raises, so make
                    # recv() raise ConnectionClosed with the close details.
                    await ws.recv()
            for message in messages:
                await ws.send(message.encode() if args.binary else message)
                reply = await asyncio.wait_for(ws.recv(), args.timeout)
                if isinstance(reply, bytes):
                    reply = reply.decode("utf-8", "replace")
                result["echoed"].append(reply)
            if args.headers_probe:
                await ws.send("headers?")
                result["headers"] = json.loads(await asyncio.wait_for(ws.recv(), args.timeout))
            return result
    except InvalidStatus as e:
        body = e.response.body or b""
        return {"status": e.response.status_code, "body": body.decode("utf-8", "replace")}
    except ConnectionClosed as e:
        return {"error": f"connection closed: {e}", "closed_code": closed_code(e)}
    except asyncio.TimeoutError:
        return {"error": "timed out", "closed_code": None}
    except (OSError, InvalidHandshake, ssl.SSLError) as e:
        return {"error": f"{type(e).__name__}: {e}", "closed_code": None}


def main():
    parser = argparse.ArgumentParser(description="WebSocket test peer")
    modes = parser.add_subparsers(dest="mode", required=True)
    server = modes.add_parser("server")
    server.add_argument("--port", type=int, default=0)
    client = modes.add_parser("client")
    client.add_argument("--url", required=True)
    client.add_argument("--tls-ca")
    client.add_argument("--authority")
    client.add_argument("--token")
    client.add_argument("--header", action="append", default=[])
    client.add_argument("--send", default="")
    client.add_argument("--binary", action="store_true")
    client.add_argument("--hold", type=float, default=0.0)
    client.add_argument("--headers-probe", action="store_true")
    client.add_argument("--timeout", type=float, default=10.0)
    # Only status, echoed messages (or the refusal's body) and rate-limit
    # headers: what does not change between runs (the README's recipes).
    client.add_argument("--brief", action="store_true")
    args = parser.parse_args()
    if args.mode == "server":
        asyncio.run(run_server(args.port))
    else:
        if not args.url.startswith(("ws://", "wss://")):
            parser.error("--url must start with ws:// or wss://")
        result = asyncio.run(run_client(args))
        if args.brief:
            headers = result.pop("response_headers", {})
            result.pop("headers", None)
            result.update({k: v for k, v in headers.items() if k.startswith("ratelimit")})
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
