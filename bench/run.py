#!/usr/bin/env python3
"""Whole-system load benchmark, side by side in one run (driven by bench/run.sh).

Starts an nginx static upstream (`return 200`), an nginx proxy_pass baseline,
HAProxy, a private redis-server and tollgate instances, then measures,
interleaved and repeated (medians of --rounds):
  nginx        nginx proxy_pass (keep-alive upstream)
  bare         Pingora with no logic (examples/bare_pingora.rs): the floor
               any proxy built on Pingora's HTTP/1 path stands on
  haproxy      HAProxy doing tollgate's job in C: bearer token, alg must be
               HS256, jwt_verify, exp against `date`, track-sc0 on the api_key
               claim into a stick-table (http_req_rate(60s), limit 10^9),
               `http-reuse always`, nbthread 1. Before measuring, the script
               asserts 200 for the bench token, 401 for a bad signature and an
               expired token, and that the stick-table holds the key.
  passthrough  tollgate, route with auth: none and no limits
  full         tollgate, JWT + route permission + hybrid Redis limits, far from the limit
  exact        the same with sync: exact (one Redis script per request)
  limited      tollgate, a key over its limit (the 429 path)
Reports requests/s, p50/p99 latency (wrk) and the proxy's CPU time per
request (utime+stime from /proc/<pid>/stat, the process and its children,
over the wrk run), the ratios the targets are stated in, p50/p99 at a fixed
request rate of half the full path's median throughput (oha -q, with latency
correction; skipped when oha is missing), an oha cross-check, and a scaling
section (1 vs 2 worker threads; 1, 1k and 100k distinct keys). Prints a
markdown report on stdout, progress on stderr.
"""
import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time

import jwt

from common import (Workspace, children, cpu_model, cpu_per_request, exit_on_signals, free_port, http_status,
                    release_binary, require, require_binary, table, token, wrk)

SECRET = "bench-run-secret-0123456789abcdef"
OTHER_SECRET = "not-the-bench-secret-0123456789ab"


def haproxy_maxconn(wanted=4096):
    """HAProxy refuses to start when maxconn needs more file descriptors than
    allowed (about two per connection): raise our soft limit to the hard one
    (the child inherits it) and lower maxconn if even that is too small."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft == resource.RLIM_INFINITY:
        return wanted
    maxconn = min(wanted, (soft - 200) // 2)
    if maxconn < 256:
        raise SystemExit(f"open files limit {soft} is too low for HAProxy (ulimit -n)")
    return maxconn


def haproxy_config(work, port, up_port, maxconn):
    """tollgate's full path, in HAProxy 2.6: every rule answers 401 on a bad
    token; the stick-table counts requests per api_key over 60 s."""
    return f"""
global
    nbthread 1
    maxconn {maxconn}
    pidfile {work}/haproxy.pid
    stats socket {work}/haproxy.sock mode 600 level admin
defaults
    mode http
    maxconn {maxconn}
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 30s
frontend fe
    bind 127.0.0.1:{port}
    stick-table type string len 64 size 1m expire 60s store http_req_rate(60s)
    http-request set-var(txn.bearer) http_auth_bearer
    http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_header_query('$.alg') -m str HS256 }}
    http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify("HS256","{SECRET}") -m int 1 }}
    http-request set-var(txn.now) date
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request deny deny_status 401 unless {{ var(txn.exp) -m found }}
    http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}
    http-request set-var(txn.api_key) var(txn.bearer),jwt_payload_query('$.api_key')
    http-request deny deny_status 401 unless {{ var(txn.api_key) -m found }}
    http-request track-sc0 var(txn.api_key)
    http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt 1000000000 }}
    default_backend be
backend be
    http-reuse always
    server up 127.0.0.1:{up_port}
"""


def haproxy_table(sock_path):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(b"show table fe\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode()


def oha(url, duration, connections, headers=(), extra=()):
    if not shutil.which("oha"):
        return None
    cmd = ["oha", "-z", f"{duration}s", "-c", str(connections), *extra, "--no-tui", "--output-format", "json"]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        cmd = [c for c in cmd if c not in ("--output-format", "json")] + ["-j"]
        res = subprocess.run(cmd, capture_output=True, text=True)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        return None
    pct = data.get("latencyPercentiles", {})
    codes = {int(k): v for k, v in (data.get("statusCodeDistribution") or {}).items()}
    return {
        "rps": data.get("summary", {}).get("requestsPerSec", 0.0),
        "p50": (pct.get("p50") or 0.0) * 1000,
        "p99": (pct.get("p99") or 0.0) * 1000,
        "requests": sum(codes.values()),
        "non2xx": sum(v for k, v in codes.items() if not 200 <= k < 300),
    }


def print_table(headers, rows):
    """A markdown table whose first column is text and the others numbers."""
    print("\n".join(table(headers, rows, "l" + "r" * (len(headers) - 1))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=release_binary("tollgate"))
    ap.add_argument("--bare-bin", default=release_binary("bare_pingora", example=True))
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="1 s runs, 1 round, no scaling (CI)")
    ap.add_argument("--skip-scaling", action="store_true", help="leave out the scaling section")
    args = ap.parse_args()
    if args.smoke:
        args.duration, args.rounds = 1, 1
    binary = os.path.abspath(args.bin)
    bare_binary = os.path.abspath(args.bare_bin)
    require(("nginx", "wrk", "redis-server", "haproxy", "curl"), "bench/run.sh installs it")
    for path in (binary, bare_binary):
        require_binary(path, "cargo build --release --bin tollgate --example bare_pingora")
    exit_on_signals()

    with Workspace("tollgate-load-") as ws:
        work = ws.dir
        up_port, ngx_port, redis_port = free_port(), free_port(), free_port()
        up = ws.nginx("upstream", f"  server {{ listen 127.0.0.1:{up_port}; location / {{ return 200 'ok'; }} }}")
        ngx = ws.nginx("proxy", f"""  upstream backend {{ server 127.0.0.1:{up_port}; keepalive 128; }}
  server {{ listen 127.0.0.1:{ngx_port};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}""")
        ws.redis(redis_port)
        ws.wait(up, "upstream", up_port)
        ws.wait(ngx, "proxy", ngx_port)

        def tollgate(name, sync, threads=1):
            port, admin = free_port(), free_port()
            p = ws.tollgate(binary, name, f"""
server: {{ listen: ["127.0.0.1:{port}"], threads: {threads}, pid_file: "{work}/{name}.pid", upgrade_sock: "{work}/{name}.sock" }}
admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ level: warn, access_log: false }}
redis: {{ url: "redis://127.0.0.1:{redis_port}", key_prefix: "{name}:" }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits: {{ sync: {sync}, claim_window: 1m, default: [{{ requests: 1000000000, window: 1m }}] }}
upstreams: {{ backend: {{ peers: ["127.0.0.1:{up_port}"] }} }}
routes:
  - {{ name: pass, path_prefix: /pass/, upstream: backend, auth: none }}
  - {{ name: api, path_prefix: /api/, upstream: backend }}
""", (port, admin))
            return p, port

        bare_port = free_port()
        bare = ws.spawn([bare_binary, f"127.0.0.1:{bare_port}", f"127.0.0.1:{up_port}"], "bare")
        ws.wait(bare, "bare", bare_port)

        ha_port = free_port()
        ha_conf = ws.write("haproxy.cfg", haproxy_config(work, ha_port, up_port, haproxy_maxconn()))
        check = subprocess.run(["haproxy", "-c", "-f", ha_conf], capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"HAProxy rejects its config:\n{check.stdout}{check.stderr}")
        # -db: foreground, no master process; one process with nbthread 1.
        ha = ws.spawn(["haproxy", "-db", "-f", ha_conf], "haproxy")
        ws.wait(ha, "haproxy", ha_port)
        hybrid, hybrid_port = tollgate("hybrid", "hybrid")
        exact, exact_port = tollgate("exact", "exact")
        # nginx's worker is the master's child.
        time.sleep(0.3)
        ngx_pids = children(ngx.pid) or [ngx.pid]

        far_tok = token(SECRET, "far-key")
        far = f"Authorization: Bearer {far_tok}"
        # Both sides must do the whole job before their numbers mean anything.
        probes = [
            ("HAProxy", ha_port, far_tok, 200),
            ("HAProxy", ha_port, token(OTHER_SECRET, "far-key"), 401),
            ("HAProxy", ha_port, token(SECRET, "far-key", ttl=-60), 401),
            ("tollgate", hybrid_port, far_tok, 200),
            ("tollgate", hybrid_port, token(OTHER_SECRET, "far-key"), 401),
        ]
        for name, port, tok, want in probes:
            got = http_status(port, "/api/x", {"Authorization": f"Bearer {tok}"})
            if got != want:
                raise SystemExit(f"sanity check failed: {name} answered {got}, expected {want} "
                                 f"(token {jwt.decode(tok, options={'verify_signature': False})})")
        stick_table = haproxy_table(f"{work}/haproxy.sock")
        if "key=far-key" not in stick_table or "http_req_rate(60000)=" not in stick_table:
            raise SystemExit(f"sanity check failed: HAProxy's stick-table does not track the api_key:\n{stick_table}")
        print("sanity: HAProxy and tollgate answer 200 to the bench token, 401 to a bad signature; "
              "HAProxy 401 to an expired token; its stick-table tracks far-key", file=sys.stderr)
        ha_pids = [ha.pid] + children(ha.pid)
        over_tok = token(SECRET, "over-key", rate_limit=1)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-H", f"Authorization: Bearer {over_tok}",
                        f"http://127.0.0.1:{hybrid_port}/api/x"], check=False)
        over = f"Authorization: Bearer {over_tok}"

        scenarios = [
            ("nginx", "nginx proxy_pass", f"http://127.0.0.1:{ngx_port}/x", (), ngx_pids),
            ("bare", "bare Pingora (no logic)", f"http://127.0.0.1:{bare_port}/x", (), [bare.pid]),
            ("haproxy", "HAProxy jwt_verify + stick-table", f"http://127.0.0.1:{ha_port}/api/x", (far,), ha_pids),
            ("passthrough", "tollgate passthrough", f"http://127.0.0.1:{hybrid_port}/pass/x", (), [hybrid.pid]),
            ("full", "tollgate full path (hybrid)", f"http://127.0.0.1:{hybrid_port}/api/x", (far,), [hybrid.pid]),
            ("exact", "tollgate full path (exact)", f"http://127.0.0.1:{exact_port}/api/x", (far,), [exact.pid]),
            ("limited", "tollgate 429 path", f"http://127.0.0.1:{hybrid_port}/api/x", (over,), [hybrid.pid]),
        ]
        # Warm-up: connections, pools, caches.
        for _, _, url, headers, _ in scenarios:
            wrk(url, 1, args.connections, headers)
        results = {key: [] for key, *_ in scenarios}
        for r in range(args.rounds):
            order = scenarios if r % 2 == 0 else list(reversed(scenarios))
            for key, label, url, headers, pids in order:
                res = cpu_per_request(pids, lambda: wrk(url, args.duration, args.connections, headers))
                results[key].append(res)
                print(f"round {r + 1} {label}: {res['rps']:.0f} rps, p50 {res['p50']:.3f} ms, "
                      f"p99 {res['p99']:.3f} ms, {res['cpu_us']:.1f} µs CPU/request, non-2xx {res['non2xx']}",
                      file=sys.stderr)

        def med(key, field):
            return statistics.median(x[field] for x in results[key])

        cpu_count = os.cpu_count()
        model = cpu_model()
        ha_version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split()
        ha_version = ha_version[2] if len(ha_version) > 2 else "?"
        print(f"Run on {time.strftime('%Y-%m-%d')}, {cpu_count} cores ({model}), wrk -t1 -c{args.connections} "
              f"-d{args.duration}s, {args.rounds} interleaved rounds, medians; one worker thread per proxy "
              f"(HAProxy {ha_version}: nbthread 1); nginx `return 200` upstream for every proxy.\n")
        print_table(["scenario", "requests/s", "p50 ms", "p99 ms", "proxy CPU µs/request"],
                    [(label, f"{med(key, 'rps'):.0f}", f"{med(key, 'p50'):.3f}", f"{med(key, 'p99'):.3f}",
                      f"{med(key, 'cpu_us'):.1f}") for key, label, *_ in scenarios])
        ratio = lambda a, b: med(a, "rps") / max(med(b, "rps"), 1e-9)

        def per_round(a, b):
            # Both scenarios of one round ran back to back: less exposed to
            # the machine's drift than the ratio of medians.
            rs = [x["rps"] / max(y["rps"], 1e-9) for x, y in zip(results[a], results[b])]
            return f"{min(rs):.2f}–{max(rs):.2f}"

        def by_cpu(a, b):
            # Throughput one proxy core would give: the inverse CPU cost ratio.
            return med(b, "cpu_us") / max(med(a, "cpu_us"), 1e-9)

        def cpu_per_round(a, b):
            rs = [x["cpu_us"] / max(y["cpu_us"], 1e-9) for x, y in zip(results[a], results[b])]
            return f"{min(rs):.2f}–{max(rs):.2f}"

        print()
        targets = []
        # (label, a, b, kind, goal): "rps" rows are a's requests/s over b's,
        # higher is better; the "cpu" row is a's CPU µs/request over b's,
        # lower is better.
        for label, a, b, kind, goal in [
            ("full path / bare Pingora", "full", "bare", "rps", 0.90),
            ("full path CPU / bare Pingora CPU", "full", "bare", "cpu", 1.11),
            ("passthrough / bare Pingora", "passthrough", "bare", "rps", 0.95),
            ("full path / HAProxy", "full", "haproxy", "rps", 0.90),
            ("full path / tollgate passthrough", "full", "passthrough", "rps", None),
            ("hybrid / exact", "full", "exact", "rps", None),
            ("429 path / passthrough", "limited", "passthrough", "rps", None),
            ("bare Pingora / nginx proxy_pass", "bare", "nginx", "rps", None),
            ("full path / nginx proxy_pass", "full", "nginx", "rps", None),
        ]:
            if kind == "cpu":
                value = med(a, "cpu_us") / max(med(b, "cpu_us"), 1e-9)
                rounds, cpu_col = cpu_per_round(a, b), "–"
                bound, ok = f" (≤ {goal:.2f})", value <= goal
            else:
                value = ratio(a, b)
                rounds, cpu_col = per_round(a, b), f"{by_cpu(a, b):.2f}"
                bound = f" (≥ {goal:.2f})" if goal is not None else " (no target)"
                ok = goal is not None and value >= goal
            met = "-" if goal is None else ("yes" if ok else "no")
            targets.append((f"{label}{bound}", f"{value:.2f}", rounds, cpu_col, met))
        print("\n".join(table(["target", "ratio (medians)", "per round", "by CPU µs/request", "met"], targets,
                             "lrrrl")))
        print("\nRatios are of requests/s medians (higher is better; per round: the two runs of one round, "
              "back to back), except the CPU row: CPU µs/request medians, lower is better. "
              "By CPU µs/request: the inverse ratio of CPU cost, what one proxy core would give.")

        # Latency at a load every proxy can carry: half of what the full path
        # reached above, the same rate for all three.
        fixed_rate = int(med("full", "rps") * 0.5)
        fixed_keys = ["bare", "haproxy", "full"]
        if not shutil.which("oha"):
            print("\np99 at a fixed 50% load: skipped (needs oha for a fixed request rate; wrk2 is not available).")
        elif fixed_rate < 1:
            raise SystemExit("the full path measured 0 requests/s: nothing to base the fixed load on")
        else:
            fixed = {k: [] for k in fixed_keys}
            by_key = {key: (label, url, headers, pids) for key, label, url, headers, pids in scenarios}
            for r in range(args.rounds):
                order = fixed_keys if r % 2 == 0 else list(reversed(fixed_keys))
                for key in order:
                    label, url, headers, pids = by_key[key]
                    o = cpu_per_request(pids, lambda: oha(url, args.duration, args.connections, headers,
                                                          extra=("-q", str(fixed_rate), "--latency-correction")))
                    if o is None or not o["requests"]:
                        raise SystemExit(f"oha failed at a fixed rate on {label} (no requests in its JSON)")
                    if o["non2xx"]:
                        raise SystemExit(f"{o['non2xx']} non-2xx answers from {label} at a fixed rate")
                    fixed[key].append(o)
                    print(f"fixed {fixed_rate}/s round {r + 1} {label}: {o['rps']:.0f} rps, p50 {o['p50']:.3f} ms, "
                          f"p99 {o['p99']:.3f} ms, {o['cpu_us']:.1f} µs CPU/request", file=sys.stderr)
            print(f"\np99 at a fixed 50% load: {fixed_rate} requests/s (half the full path's median above), "
                  f"oha -c {args.connections} -z {args.duration}s -q {fixed_rate} --latency-correction, "
                  f"{args.rounds} interleaved rounds, medians:\n")
            fm = lambda key, field: statistics.median(x[field] for x in fixed[key])
            print_table(["scenario", "requests/s reached", "p50 ms", "p99 ms", "proxy CPU µs/request"],
                        [(by_key[key][0], f"{fm(key, 'rps'):.0f}", f"{fm(key, 'p50'):.3f}", f"{fm(key, 'p99'):.3f}",
                          f"{fm(key, 'cpu_us'):.1f}") for key in fixed_keys])

        oha_rows = []
        for key, label, url, headers, _ in scenarios:
            o = oha(url, args.duration, args.connections, headers)
            if o:
                oha_rows.append((label, o))
        if oha_rows:
            print(f"\noha cross-check (oha -c {args.connections} -z {args.duration}s):\n")
            print_table(["scenario", "requests/s", "p50 ms", "p99 ms"],
                        [(label, f"{o['rps']:.0f}", f"{o['p50']:.3f}", f"{o['p99']:.3f}") for label, o in oha_rows])

        if not (args.smoke or args.skip_scaling):
            two, two_port = tollgate("hybrid2", "hybrid", threads=2)
            scale = []
            for label, url, headers, pids, script in [
                ("full path, 1 worker thread, 1 key", f"http://127.0.0.1:{hybrid_port}/api/x", (far,), [hybrid.pid], None),
                ("full path, 2 worker threads, 1 key", f"http://127.0.0.1:{two_port}/api/x", (far,), [two.pid], None),
            ]:
                scale.append((label, cpu_per_request(pids, lambda: wrk(url, args.duration, args.connections,
                                                                        headers))))
            for n in (1000, 100000):
                tokens_file = f"{work}/tokens-{n}.lua"
                with open(tokens_file, "w") as f:
                    f.write("tokens = {\n")
                    for i in range(n):
                        f.write(f'"{token(SECRET, f"key-{n}-{i}")}",\n')
                    f.write("}\ni = 0\nrequest = function()\n  i = i % #tokens + 1\n"
                            "  return wrk.format(nil, nil, {[\"Authorization\"] = \"Bearer \" .. tokens[i]})\nend\n")
                wrk(f"http://127.0.0.1:{hybrid_port}/api/x", 1, args.connections, (), tokens_file)
                res = cpu_per_request([hybrid.pid], lambda: wrk(f"http://127.0.0.1:{hybrid_port}/api/x",
                                                                args.duration, args.connections, (), tokens_file))
                scale.append((f"full path, 1 worker thread, {n} keys", res))
            print("\nScaling:\n")
            print_table(["run", "requests/s", "p50 ms", "p99 ms", "proxy CPU µs/request"],
                        [(label, f"{res['rps']:.0f}", f"{res['p50']:.3f}", f"{res['p99']:.3f}", f"{res['cpu_us']:.1f}")
                         for label, res in scale])
        failed = sum(x["non2xx"] for k in ("nginx", "bare", "haproxy", "passthrough", "full", "exact")
                     for x in results[k])
        if failed:
            raise SystemExit(f"{failed} non-2xx answers on paths that should all pass")


if __name__ == "__main__":
    main()
