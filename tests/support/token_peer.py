"""An OAuth2 token endpoint (client credentials, RFC 6749 §4.4) for the
README's upstream_auth recipe, on Python's standard library.

usage: token_peer.py --port N --client-id ID --client-secret SECRET [--token T]

Listens on 127.0.0.1:N until killed. A POST with the form fields
grant_type=client_credentials, client_id=ID and client_secret=SECRET (or
the same pair in HTTP Basic) gets 200 {"access_token": T, "token_type":
"Bearer", "expires_in": 3600}, and T is "upstream-token-<n>", n counting
the tokens issued, unless --token names it; anything else 401
{"error": "invalid_client"}.
"""
import argparse
import base64
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


def main():
    parser = argparse.ArgumentParser(description="OAuth2 token endpoint")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", required=True)
    parser.add_argument("--token")
    args = parser.parse_args()
    issued = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            basic = self.headers.get("authorization", "")
            if basic.lower().startswith("basic "):
                user, _, password = base64.b64decode(basic[6:]).decode().partition(":")
                form.setdefault("client_id", user)
                form.setdefault("client_secret", password)
            good = (
                form.get("grant_type") == "client_credentials"
                and form.get("client_id") == args.client_id
                and form.get("client_secret") == args.client_secret
            )
            if good:
                issued[0] += 1
                token = args.token or f"upstream-token-{issued[0]}"
                self.answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600})
            else:
                self.answer(401, {"error": "invalid_client"})

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_):
            pass

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
