#!/usr/bin/env python3
"""Edge protocols against nginx, side by side in one run (issue #14).

Starts a private CA and certificate (tests/support/certs.py), a redis-server,
an nginx `return 200` upstream, an nginx proxy (TLS + http2, proxy_pass over
keep-alive) and tollgate (JWT + hybrid limits on /api/), both with one
worker (tollgate threads 1, nginx worker_processes 1), the same certificate
and key, and measures, interleaved and repeated (medians of --rounds):

  https  HTTP/1.1 over TLS, keep-alive: wrk -t1 -c32 --latency
         -> requests/s, p50/p99, proxy CPU µs/request
  http   the same without TLS, a baseline: what TLS adds per request
  h2     HTTP/2 over TLS (ALPN h2): h2load -t1 -c32 -m10 -D
  h2c    HTTP/2 prior knowledge without TLS, the same h2load (labelled)
         -> requests/s, mean request time, proxy CPU µs/request
  hs     a new TLS connection, with a full handshake, for every request:
         h2load --h1 -c B -n B, repeated for the duration. Each h2load client
         is a fresh OpenSSL object that makes one connection and one request,
         so it has no session to resume. (h2load with -n > -c resumes its
         previous session when it reconnects, and wrk with "Connection: close"
         keeps its session across reconnects too: neither measures full
         handshakes.) The sanity phase checks this in nginx's own log.
         -> handshakes/s, proxy CPU µs/handshake (handshake + one request)

Both proxies get the same requests, Authorization header included (nginx
forwards it without looking at it: nginx is the floor, tollgate does JWT,
route permissions and hybrid limits). Proxy CPU is utime+stime from
/proc/<pid>/stat (tollgate's process, nginx's worker) over the run, divided
by the requests; client CPU is the load generator's, from getrusage.

Before measuring, it fails loudly unless: nginx answers 200 directly and
through the proxy over https; tollgate answers 200 over https with a token
and 401 without; h2load reports ALPN h2 and all 2xx on every h2/h2c target
and all 4xx without a token on tollgate; both negotiate the same TLS version,
cipher and key exchange for wrk's client defaults and for h2load's; the
handshake mode makes one connection per request and resumes none.

Markdown report on stdout (progress on stderr), also written to
bench/results/edge.md (not in --quick mode unless --out is given).

usage: bench/edge.py [--bin ${CARGO_TARGET_DIR:-target}/release/tollgate] [--duration 10] [--rounds 3] [--quick]
Needs nginx (ssl, http_v2), wrk, h2load (nghttp2-client), redis-server,
PyJWT, and tests/support/certs.py's `cryptography`.
"""
import argparse
import http.client
import os
import re
import shlex
import signal
import ssl
import statistics
import subprocess
import sys
import time

import jwt

from common import (CLK_TCK, ROOT, Workspace, children, client_cpu, cpu_model, cpu_ticks, exit_on_signals,
                    free_port, http_status, parse_latency, release_binary, require, require_binary, run_tool,
                    table, token, wrk)

SECRET = "bench-edge-secret-0123456789abcdef"


def parse_h2load(out):
    """The counts h2load prints: requests (total, succeeded, failed, errored,
    timeout), status classes, negotiated TLS and protocol, mean request time."""
    res = {"succeeded": 0, "failed": 0, "errored": 0, "timeout": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0,
           "proto": None, "tls": None, "cipher": None, "kx": None, "mean_ms": 0.0, "rps": 0.0}
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    if not m:
        raise SystemExit(f"cannot read h2load's output:\n{out[-2000:]}")
    res["succeeded"], res["failed"], res["errored"], res["timeout"] = (int(m.group(i)) for i in (4, 5, 6, 7))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        res["2xx"], res["3xx"], res["4xx"], res["5xx"] = (int(x) for x in m.groups())
    for key, pattern in (("proto", r"Application protocol: (\S+)"), ("tls", r"TLS Protocol: (\S+)"),
                         ("cipher", r"Cipher: (\S+)"), ("kx", r"Server Temp Key: (.+)")):
        m = re.search(pattern, out)
        if m:
            res[key] = m.group(1).strip()
    m = re.search(r"finished in [^,]+, ([\d.]+) req/s", out)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if m:
        res["mean_ms"] = parse_latency(m.group(1))
    return res


def h2load_cmd(url, clients, streams, headers, duration=None, requests=None, h1=False):
    cmd = ["h2load", "-t1", f"-c{clients}", f"-m{streams}"]
    cmd += [f"-D{duration}"] if duration is not None else [f"-n{requests}"]
    if h1:
        cmd.append("--h1")
    for h in headers:
        cmd += ["-H", h]
    return cmd + [url]


def wrk_run(url, duration, connections, headers):
    res = wrk(url, duration, connections, headers)
    res["bad"] = res["non2xx"] + res["socket_errors"]
    return res


def h2load(url, duration, clients, streams, headers):
    res = parse_h2load(run_tool(h2load_cmd(url, clients, streams, headers, duration=duration), duration + 60))
    res["requests"] = res["succeeded"]
    res["bad"] = res["failed"] + res["errored"] + res["timeout"] + res["3xx"] + res["4xx"] + res["5xx"]
    res["p50"] = res["p99"] = None
    return res


def handshakes(url, duration, batch, headers):
    """Fresh h2load clients, one connection and one request each, batch after
    batch until `duration` has passed: every request pays a full handshake."""
    cmd = h2load_cmd(url, batch, 1, headers, requests=batch, h1=True)
    start = time.monotonic()
    ok = bad = 0
    while time.monotonic() - start < duration:
        r = parse_h2load(run_tool(cmd, 120))
        ok += r["2xx"]
        bad += r["failed"] + r["errored"] + r["timeout"] + r["3xx"] + r["4xx"] + r["5xx"]
    elapsed = time.monotonic() - start
    return {"rps": ok / elapsed, "requests": ok, "bad": bad, "p50": None, "p99": None, "mean_ms": None}


def https_status(port, path, headers=None, cafile=None):
    """One HTTPS request verified against the private CA: (status, TLS
    version, cipher) with the client defaults of OpenSSL, like wrk's."""
    ctx = ssl.create_default_context(cafile=cafile)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, conn.sock.version(), conn.sock.cipher()[0]
    finally:
        conn.close()


def upstream_accepts(status_port):
    """Connections the upstream nginx has accepted (stub_status), not
    counting the one this question itself opens."""
    conn = http.client.HTTPConnection("127.0.0.1", status_port, timeout=5)
    try:
        conn.request("GET", "/")
        lines = conn.getresponse().read().decode().splitlines()
    finally:
        conn.close()
    return int(lines[2].split()[0]) - 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=release_binary("tollgate"))
    ap.add_argument("--duration", type=int, default=10, help="seconds per measurement (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians reported (default 3)")
    ap.add_argument("--connections", type=int, default=32, help="wrk and h2load connections (default 32)")
    ap.add_argument("--streams", type=int, default=10, help="h2load concurrent streams per connection (default 10)")
    ap.add_argument("--batch", type=int, default=200,
                    help="handshake mode: fresh clients per h2load invocation (default 200)")
    ap.add_argument("--quick", action="store_true", help="2 s runs, 1 round, report not written (CI, < 1 minute)")
    ap.add_argument("--out", help="report file (default bench/results/edge.md; none in --quick mode)")
    args = ap.parse_args()
    argv = sys.argv[1:]
    if args.quick:
        args.duration, args.rounds = 2, 1
    out_path = args.out or (None if args.quick else os.path.join(ROOT, "bench/results/edge.md"))
    warmup = 1
    binary = os.path.abspath(args.bin)
    require(("nginx", "wrk", "h2load", "redis-server"), "apt-get install nginx-light wrk nghttp2-client redis-server")
    require_binary(binary, "cargo build --release --bin tollgate")
    nginx_v = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    for module in ("--with-http_ssl_module", "--with-http_v2_module"):
        if module not in nginx_v:
            raise SystemExit(f"this nginx lacks {module} (nginx -V); Debian's nginx-light has both")
    exit_on_signals()

    with Workspace("tollgate-edge-") as ws:
        work = ws.dir
        certs = f"{work}/certs"
        made = subprocess.run([sys.executable, os.path.join(ROOT, "tests/support/certs.py"), "--days", "2",
                               certs, "localhost,127.0.0.1"], capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"tests/support/certs.py failed:\n{made.stderr}")
        ca, cert, key = f"{certs}/ca.pem", f"{certs}/localhost.pem", f"{certs}/localhost.key"

        up_port, up_status, redis_port = free_port(), free_port(), free_port()
        ngx_tls, ngx_h2c, ngx_plain = free_port(), free_port(), free_port()
        tg_plain, tg_tls, tg_admin = free_port(), free_port(), free_port()

        def nginx(name, http_block):
            return ws.nginx(name, "  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n" + http_block,
                            error_level="warn")

        # keepalive_requests everywhere: nginx's default (1000) would close a
        # keep-alive connection, and for the proxy redo a TLS handshake or an
        # upstream connection, every 1000 requests; tollgate's
        # `server.max_requests_per_connection` (1000 by default) is lifted to
        # match. (With it, h2load counted 2 failed of 32,025 h2 requests on
        # 2026-12-06: streams it sent after tollgate's GOAWAY at the cap.)
        # Idle upstream connections kept: 1024 on both sides. Both default to
        # 128 (nginx `keepalive`, tollgate `server.upstream_pool_size`), and
        # h2 with 32 x 10 streams has 320 requests in flight: each proxy then
        # opens and closes upstream connections all the time. The upstream's
        # stub_status counts the connections opened during every run.
        up = nginx("upstream", f"""  server {{ listen 127.0.0.1:{up_port} backlog=4096; location / {{ return 200 'ok'; }} }}
  server {{ listen 127.0.0.1:{up_status}; location / {{ stub_status; }} }}""")
        ngx = nginx("proxy", f"""  log_format handshake '$connection $ssl_session_reused $ssl_protocol $ssl_cipher';
  upstream backend {{ server 127.0.0.1:{up_port}; keepalive 1024; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{ngx_tls} ssl http2 backlog=4096;
    listen 127.0.0.1:{ngx_h2c} http2 backlog=4096;
    listen 127.0.0.1:{ngx_plain} backlog=4096;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
    # The sanity phase reads this log to prove one fresh handshake per request.
    location /handshake-check {{
      access_log {work}/handshake.log handshake;
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}""")
        ws.redis(redis_port)
        ws.wait(up, "upstream", up_port, up_status)
        ws.wait(ngx, "proxy", ngx_tls, ngx_h2c, ngx_plain)
        # SIGINT: Pingora's fast shutdown (SIGTERM would drain for the grace period).
        tg = ws.tollgate(binary, "tollgate", f"""server:
  listen: ["127.0.0.1:{tg_plain}"]
  threads: 1
  upstream_pool_size: 1024
  max_requests_per_connection: 0
  h2c: true
  tls:
    - listen: "127.0.0.1:{tg_tls}"
      certificates: [{{ cert_file: "{cert}", key_file: "{key}" }}]
      min_version: "1.2"
  pid_file: "{work}/tollgate.pid"
  upgrade_sock: "{work}/tollgate.sock"
admin: {{ listen: "127.0.0.1:{tg_admin}" }}
log: {{ level: warn, access_log: false }}
redis: {{ url: "redis://127.0.0.1:{redis_port}", key_prefix: "edge:" }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits: {{ sync: hybrid, claim_window: 1m, default: [{{ requests: 1000000000, window: 1m }}] }}
upstreams: {{ backend: {{ peers: ["127.0.0.1:{up_port}"] }} }}
routes: [{{ name: api, path_prefix: /api/, upstream: backend }}]
""", (tg_plain, tg_tls, tg_admin), stop=signal.SIGINT)
        time.sleep(0.3)
        ngx_pids = children(ngx.pid) or [ngx.pid]  # the worker is the master's child
        tg_pids = [tg.pid]

        tok = token(SECRET, "edge-bench-key")
        auth = f"Authorization: Bearer {tok}"
        bearer = {"Authorization": f"Bearer {tok}"}

        # -- sanity: every target does its whole job before it is measured --
        def expect(what, got, want):
            if got != want:
                raise SystemExit(f"sanity check failed: {what}: got {got!r}, expected {want!r}")

        expect("nginx upstream, GET /", http_status(up_port, "/"), 200)
        expect("nginx proxy over plain HTTP/1.1", http_status(ngx_plain, "/x"), 200)
        expect("tollgate over plain HTTP/1.1 with a token", http_status(tg_plain, "/api/x", bearer), 200)
        ngx_s, ngx_ver, ngx_cipher = https_status(ngx_tls, "/x", bearer, ca)
        expect("nginx proxy over https (CA-verified)", ngx_s, 200)
        tg_s, tg_ver, tg_cipher = https_status(tg_tls, "/api/x", bearer, ca)
        expect("tollgate over https with a token (CA-verified)", tg_s, 200)
        expect("tollgate over https without a token", https_status(tg_tls, "/api/x", None, ca)[0], 401)
        expect("tollgate over https, token signed with another secret",
               https_status(tg_tls, "/api/x", {"Authorization": "Bearer " + jwt.encode(
                   {"api_key": "k", "allowed_routes": ["/api/*"], "exp": int(time.time()) + 60},
                   "another-secret-0123456789abcdef!", algorithm="HS256")}, ca)[0], 401)
        expect("TLS version and cipher with OpenSSL's client defaults (wrk's): tollgate vs nginx",
               (tg_ver, tg_cipher), (ngx_ver, ngx_cipher))
        expect("TLS version negotiated", tg_ver, "TLSv1.3")
        h2_targets = {
            "h2_tollgate": ("tollgate, h2 over TLS", f"https://127.0.0.1:{tg_tls}/api/x"),
            "h2_nginx": ("nginx, h2 over TLS", f"https://127.0.0.1:{ngx_tls}/x"),
            "h2c_tollgate": ("tollgate, h2c", f"http://127.0.0.1:{tg_plain}/api/x"),
            "h2c_nginx": ("nginx, h2c", f"http://127.0.0.1:{ngx_h2c}/x"),
        }
        negotiated = {}
        for key, (label, url) in h2_targets.items():
            r = parse_h2load(run_tool(h2load_cmd(url, 2, 10, (auth,), requests=200), 60))
            expect(f"{label}: h2load 2xx out of 200", r["2xx"], 200)
            if url.startswith("https"):
                expect(f"{label}: ALPN", r["proto"], "h2")
                negotiated[key] = (r["tls"], r["cipher"], r["kx"])
        expect("h2load's TLS version, cipher, key exchange: tollgate vs nginx",
               negotiated["h2_tollgate"], negotiated["h2_nginx"])
        for url in (h2_targets["h2_tollgate"][1], h2_targets["h2c_tollgate"][1]):
            r = parse_h2load(run_tool(h2load_cmd(url, 2, 10, (), requests=100), 60))
            expect(f"h2load without a token on {url}: 4xx out of 100", r["4xx"], 100)
        # Handshake mode: nginx logs, per request, its connection serial and
        # whether the TLS session was resumed ("r") or not (".").
        check_batch = 100
        r = parse_h2load(run_tool(h2load_cmd(f"https://127.0.0.1:{ngx_tls}/handshake-check", check_batch, 1,
                                             (auth,), requests=check_batch, h1=True), 60))
        expect("handshake mode on nginx: 2xx", r["2xx"], check_batch)
        hs_tls = (r["tls"], r["cipher"], r["kx"])
        time.sleep(0.2)
        with open(f"{work}/handshake.log") as f:
            lines = [l.split() for l in f if l.strip()]
        expect("handshake mode: requests logged by nginx", len(lines), check_batch)
        expect("handshake mode: distinct connections", len({l[0] for l in lines}), check_batch)
        expect("handshake mode: resumed TLS sessions", sum(1 for l in lines if l[1] == "r"), 0)
        r = parse_h2load(run_tool(h2load_cmd(f"https://127.0.0.1:{tg_tls}/api/x", check_batch, 1, (auth,),
                                             requests=check_batch, h1=True), 60))
        expect("handshake mode on tollgate: 2xx", r["2xx"], check_batch)
        expect("handshake mode, TLS version, cipher, key exchange: tollgate vs nginx", (r["tls"], r["cipher"], r["kx"]),
               hs_tls)
        print(f"sanity: nginx 200 direct and over https; tollgate over https 200 with the token, 401 without or "
              f"badly signed; wrk-like client: {tg_ver} {tg_cipher} on both; h2load: {' / '.join(map(str, hs_tls))} "
              f"on both, ALPN h2, all 2xx, 4xx without a token on tollgate h2/h2c; handshake mode: "
              f"{check_batch} requests = {check_batch} connections, 0 resumed", file=sys.stderr)

        c, m, d, b = args.connections, args.streams, args.duration, args.batch
        tg_https, ngx_https = f"https://127.0.0.1:{tg_tls}/api/x", f"https://127.0.0.1:{ngx_tls}/x"
        # (key, label, kind, url, pids)
        scenarios = [
            ("https_tollgate", "tollgate HTTPS, full path", "wrk", tg_https, tg_pids),
            ("https_nginx", "nginx HTTPS proxy_pass", "wrk", ngx_https, ngx_pids),
            ("http_tollgate", "baseline: tollgate HTTP/1.1 without TLS, full path", "wrk",
             f"http://127.0.0.1:{tg_plain}/api/x", tg_pids),
            ("http_nginx", "baseline: nginx HTTP/1.1 without TLS proxy_pass", "wrk", f"http://127.0.0.1:{ngx_plain}/x",
             ngx_pids),
            ("h2_tollgate", "tollgate h2 (TLS, ALPN), full path", "h2load", h2_targets["h2_tollgate"][1], tg_pids),
            ("h2_nginx", "nginx http2 (TLS, ALPN) proxy_pass", "h2load", h2_targets["h2_nginx"][1], ngx_pids),
            ("h2c_tollgate", "tollgate h2c (prior knowledge), full path", "h2load", h2_targets["h2c_tollgate"][1],
             tg_pids),
            ("h2c_nginx", "nginx h2c (prior knowledge) proxy_pass", "h2load", h2_targets["h2c_nginx"][1], ngx_pids),
            ("hs_tollgate", "tollgate, new TLS connection per request", "hs", tg_https, tg_pids),
            ("hs_nginx", "nginx, new TLS connection per request", "hs", ngx_https, ngx_pids),
        ]

        def measure(kind, url, duration):
            if kind == "wrk":
                return wrk_run(url, duration, c, (auth,))
            if kind == "h2load":
                return h2load(url, duration, c, m, (auth,))
            return handshakes(url, duration, b, (auth,))

        for key, label, kind, url, _ in scenarios:  # warm-up: connections, pools, caches
            measure(kind, url, warmup)
        results = {key: [] for key, *_ in scenarios}
        for rnd in range(args.rounds):
            order = scenarios if rnd % 2 == 0 else list(reversed(scenarios))
            for key, label, kind, url, pids in order:
                accepts = upstream_accepts(up_status)
                before, client_before, t0 = cpu_ticks(pids), client_cpu(), time.monotonic()
                res = measure(kind, url, d)
                wall = time.monotonic() - t0
                res["upstream_conns"] = upstream_accepts(up_status) - accepts - 1
                proxy_s, client_s = (cpu_ticks(pids) - before) / CLK_TCK, client_cpu() - client_before
                n = max(res["requests"], 1)
                res["cpu_us"], res["client_us"] = proxy_s * 1e6 / n, client_s * 1e6 / n
                # Cores busy over the run: which side limited the rate.
                res["proxy_cores"], res["client_cores"] = proxy_s / wall, client_s / wall
                if res["bad"] or not res["requests"]:
                    raise SystemExit(f"{label}: {res['bad']} failed or non-2xx requests, {res['requests']} good")
                results[key].append(res)
                lat = (f", p50 {res['p50']:.3f} ms, p99 {res['p99']:.3f} ms" if res["p50"] is not None else
                       f", mean {res['mean_ms']:.3f} ms" if res["mean_ms"] is not None else "")
                print(f"round {rnd + 1} {label}: {res['rps']:.0f}/s{lat}, proxy {res['cpu_us']:.1f} µs CPU, "
                      f"client {res['client_us']:.1f} µs CPU per request; cores busy: proxy "
                      f"{res['proxy_cores']:.2f}, client {res['client_cores']:.2f}; {res['upstream_conns']} upstream "
                      f"connections opened", file=sys.stderr)

        # -- report --
        def med(key, field):
            return statistics.median(x[field] for x in results[key])

        label_of = {key: label for key, label, *_ in scenarios}

        def cores(key):
            return f"{med(key, 'proxy_cores'):.2f} / {med(key, 'client_cores'):.2f}"

        def ratio_row(label, a, b):
            # Per round: the two runs of one round, close in time, so less
            # exposed to the shared machine's drift than the medians' ratio.
            rps = [x["rps"] / y["rps"] for x, y in zip(results[a], results[b])]
            cpu = [y["cpu_us"] / x["cpu_us"] for x, y in zip(results[a], results[b])]
            return (label, f"{med(a, 'rps') / med(b, 'rps'):.2f}", f"{min(rps):.2f}–{max(rps):.2f}",
                    f"{med(b, 'cpu_us') / med(a, 'cpu_us'):.2f}", f"{min(cpu):.2f}–{max(cpu):.2f}")

        model = cpu_model()
        ngx_version = re.search(r"nginx/(\S+)", nginx_v)
        ngx_ssl = re.search(r"built with (OpenSSL \S+)", nginx_v)
        h2load_v = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip()
        wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].split(" [")[0]
        rustls_v = ""
        try:
            with open(os.path.join(ROOT, "Cargo.lock")) as f:
                m_ = re.search(r'name = "rustls"\nversion = "([^"]+)"', f.read())
                rustls_v = m_.group(1) if m_ else ""
        except OSError:
            pass
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        T, N = "$TOKEN", "127.0.0.1"
        lines = []
        say = lines.append
        say("# tollgate at the edge vs nginx: HTTPS, HTTP/2, TLS handshakes\n")
        say(f"Run on {time.strftime('%Y-%m-%d')} at tollgate {commit}, {os.cpu_count()} cores ({model}), "
            f"{args.rounds} interleaved rounds of {d} s (order reversed every other round), medians; "
            f"per-round ranges are the ratio within each round. One worker each: tollgate `threads: 1` "
            f"(rustls {rustls_v}, ring), nginx {ngx_version.group(1) if ngx_version else '?'} "
            f"`worker_processes 1` ({ngx_ssl.group(1) if ngx_ssl else '?'}). Both in front of the same "
            f"nginx `return 200` upstream over keep-alive (1024 idle connections kept on both: nginx "
            f"`keepalive 1024`, tollgate `upstream_pool_size: 1024`; both default to 128, too few for h2's "
            f"320 requests in flight), same certificate and key (EC P-256, private CA). "
            f"Negotiated: {tg_ver} {tg_cipher} with OpenSSL's client defaults (wrk), "
            f"{' / '.join(map(str, hs_tls))} with h2load, the same on both proxies. "
            f"{wrk_v}, {h2load_v}.\n")
        say("Commands (ports are picked per run; `$TOKEN` is an HS256 JWT with api_key, "
            "allowed_routes [\"/api/*\"], exp; nginx gets the same header and ignores it):\n")
        say("```sh")
        say(f"python3 bench/edge.py {shlex.join(argv)}".rstrip())
        say(f"wrk -t1 -c{c} -d{d}s --latency -H 'Authorization: Bearer {T}' https://{N}:$TOLLGATE_TLS/api/x")
        say(f"wrk -t1 -c{c} -d{d}s --latency -H 'Authorization: Bearer {T}' https://{N}:$NGINX_TLS/x")
        say(f"wrk -t1 -c{c} -d{d}s --latency -H 'Authorization: Bearer {T}' http://{N}:$TOLLGATE_PLAIN/api/x   # baseline")
        say(f"wrk -t1 -c{c} -d{d}s --latency -H 'Authorization: Bearer {T}' http://{N}:$NGINX_PLAIN/x   # baseline")
        say(f"h2load -t1 -c{c} -m{m} -D{d} -H 'Authorization: Bearer {T}' https://{N}:$TOLLGATE_TLS/api/x")
        say(f"h2load -t1 -c{c} -m{m} -D{d} -H 'Authorization: Bearer {T}' https://{N}:$NGINX_TLS/x")
        say(f"h2load -t1 -c{c} -m{m} -D{d} -H 'Authorization: Bearer {T}' http://{N}:$TOLLGATE_PLAIN/api/x   # h2c")
        say(f"h2load -t1 -c{c} -m{m} -D{d} -H 'Authorization: Bearer {T}' http://{N}:$NGINX_H2C/x   # h2c")
        say(f"# handshakes: repeated for {d} s, every client a fresh OpenSSL object: one connection, one "
            f"full handshake, one request")
        say(f"h2load -t1 -c{b} -m1 -n{b} --h1 -H 'Authorization: Bearer {T}' https://{N}:$TOLLGATE_TLS/api/x")
        say(f"h2load -t1 -c{b} -m1 -n{b} --h1 -H 'Authorization: Bearer {T}' https://{N}:$NGINX_TLS/x")
        say("```\n")
        say("Proxy CPU: utime+stime of tollgate's process / nginx's worker (`/proc/<pid>/stat`) over the run, "
            "divided by the requests. Client CPU: the load generator's (getrusage). Cores busy: CPU seconds "
            "per second of the run, to show which side limited the rate on this 2-core machine (the proxy, "
            "the client and the upstream share it): when the client is near a full core and the proxy is "
            "not, requests/s compares the client, and the CPU columns are the comparison.\n")
        say("## HTTPS, HTTP/1.1 keep-alive (wrk)\n")
        lines += table(
            ["proxy", "requests/s", "p50 ms", "p99 ms", "proxy CPU µs/request", "client CPU µs/request",
             "cores busy, proxy / client", "upstream connections opened"],
            [(label_of[key], f"{med(key, 'rps'):.0f}", f"{med(key, 'p50'):.3f}", f"{med(key, 'p99'):.3f}",
              f"{med(key, 'cpu_us'):.1f}", f"{med(key, 'client_us'):.1f}", cores(key),
              f"{med(key, 'upstream_conns'):.0f}")
             for key in ("https_tollgate", "https_nginx", "http_tollgate", "http_nginx")],
            "lrrrrrrr")
        say(f"\nTLS adds {med('https_tollgate', 'cpu_us') - med('http_tollgate', 'cpu_us'):.1f} µs of CPU per "
            f"request to tollgate and {med('https_nginx', 'cpu_us') - med('http_nginx', 'cpu_us'):.1f} µs to nginx "
            f"(HTTPS minus the plain HTTP/1.1 baseline, medians).")
        say(f"\n## HTTP/2 (h2load -c{c} -m{m})\n")
        lines += table(
            ["proxy", "requests/s", "mean request ms", "proxy CPU µs/request", "client CPU µs/request",
             "cores busy, proxy / client", "upstream connections opened"],
            [(label_of[key], f"{med(key, 'rps'):.0f}", f"{med(key, 'mean_ms'):.3f}", f"{med(key, 'cpu_us'):.1f}",
              f"{med(key, 'client_us'):.1f}", cores(key), f"{med(key, 'upstream_conns'):.0f}")
             for key in ("h2_tollgate", "h2_nginx", "h2c_tollgate", "h2c_nginx")],
            "lrrrrrr")
        say("\nUpstream connections opened in h2 runs are those each proxy drops when the previous h2load run "
            f"stops with {c} x {m} requests in flight: they are opened again in the first moments of the next run, "
            "none after.")
        say(f"\n## TLS handshakes: a new connection per request (h2load --h1, batches of {b} fresh clients)\n")
        lines += table(
            ["proxy", "handshakes/s", "proxy CPU µs/handshake", "client CPU µs/handshake",
             "cores busy, proxy / client", "upstream connections opened"],
            [(label_of[key], f"{med(key, 'rps'):.0f}", f"{med(key, 'cpu_us'):.1f}", f"{med(key, 'client_us'):.1f}",
              cores(key), f"{med(key, 'upstream_conns'):.0f}")
             for key in ("hs_tollgate", "hs_nginx")],
            "lrrrrr")
        say("\nEach handshake row's CPU covers the TCP connection, a full TLS 1.3 handshake (no resumption: "
            "checked in nginx's log), one proxied request (tollgate: JWT and limits too) and the close.\n")
        say("## tollgate / nginx\n")
        lines += table(
            ["comparison", "throughput (medians)", "per round", "by CPU (nginx µs / tollgate µs)", "per round"],
            [ratio_row("HTTPS full path / nginx HTTPS proxy_pass", "https_tollgate", "https_nginx"),
             ratio_row("baseline: HTTP/1.1 without TLS, full path / nginx", "http_tollgate", "http_nginx"),
             ratio_row("h2 (TLS) full path / nginx http2", "h2_tollgate", "h2_nginx"),
             ratio_row("h2c full path / nginx h2c", "h2c_tollgate", "h2c_nginx"),
             ratio_row("handshakes / nginx handshakes", "hs_tollgate", "hs_nginx")],
            "lrrrr")
        say("\nAbove 1 favours tollgate. Throughput: requests (or handshakes) per second. By CPU: the inverse "
            "ratio of proxy CPU per request, what one proxy core would give. nginx only proxies; tollgate "
            "also verifies the JWT, checks the route permission and counts the request in its hybrid limits.")
        say("\n## Every run\n")
        lines += table(
            ["round", "scenario", "requests/s", "proxy CPU µs/request", "client CPU µs/request",
             "cores busy, proxy / client", "upstream connections opened"],
            [(rnd + 1, label, f"{x['rps']:.0f}", f"{x['cpu_us']:.1f}", f"{x['client_us']:.1f}",
              f"{x['proxy_cores']:.2f} / {x['client_cores']:.2f}", x["upstream_conns"])
             for rnd in range(args.rounds)
             for key, label, *_ in (scenarios if rnd % 2 == 0 else reversed(scenarios))
             for x in (results[key][rnd],)],
            "rlrrrrr")
        say("\nA proxy well below one core busy while the client is too means the machine was busy with "
            "something else during that run (the machine is shared): compare within a round.")
        report = "\n".join(lines) + "\n"
        print(report, end="")
        if out_path:
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
            with open(out_path + ".partial", "w") as f:
                f.write(report)
            os.replace(out_path + ".partial", out_path)
            print(f"written to {out_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
