#!/usr/bin/env python3
"""What tracing costs (issue 25), side by side in one run.

Three tollgate instances on the full path (JWT, hybrid limits over Redis, an
nginx `return 200` upstream), one worker thread each, identical but for
`telemetry.tracing`:

  off     no telemetry section
  0.01    tracing on, sample_ratio 0.01 (the default)
  1.0     tracing on, every request sampled

Tracing exports over OTLP/HTTP to a local receiver
(tests/support/otlp_receiver.py --discard: bodies read and answered, not
decoded). Measured, interleaved and repeated (medians of --rounds):

  full speed   wrk -t1 -c C: requests/s, p99, tollgate CPU µs/request
  50% load     h2load --h1 -c C --rps R/C at half the `off` instance's
               median requests/s: p99 from h2load's per-request log,
               tollgate CPU µs/request
  callgrind    instructions per request in tollgate's process (every
               thread, the exporter's included), each config alone under
               valgrind, h2load -n N after a warm-up (--callgrind N, 0 skips)

Spans exported and dropped (tollgate's own counters) are reported per
instance, so a "1.0" that dropped most of its spans is seen as such.
CPU is utime+stime from /proc/<pid>/stat over the run, divided by requests.
h2load keeps one request in flight per connection: a slow answer delays the
next request on its connection (the p99 at 50% load is a closed-loop p99).

Markdown report on stdout (progress on stderr).

usage: python3 bench/tracing.py [--bin target/release/tollgate] [--duration 10] [--rounds 3]
                                [--connections 16] [--callgrind 20000] [--quick] [--callgrind-only]
--quick: 2-second runs, one round, 2,000 callgrind requests (checks the
script works; the figures are rough).
Needs nginx, wrk, h2load (nghttp2-client), redis-server, PyJWT (.venv) and,
for the receiver, opentelemetry-proto and grpcio (make setup); valgrind for
the callgrind part.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from common import (ROOT, Workspace, cpu_model, cpu_per_request, exit_on_signals, free_port, http_status,
                    metric, release_binary, require, require_binary, run_tool, table, token, wrk)

SECRET = "bench-tracing-secret-0123456789abcdef"
CONFIGS = ("off", "0.01", "1.0")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def config(port, admin, redis_port, upstream, tracing):
    telemetry = ""
    if tracing is not None:
        telemetry = f"telemetry: {{ tracing: {tracing} }}\n"
    return f"""
server: {{ listen: ["127.0.0.1:{port}"], threads: 1, pid_file: "/tmp/tollgate-bench-tracing-{port}.pid", upgrade_sock: "/tmp/tollgate-bench-tracing-{port}.sock" }}
admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ level: warn, access_log: false }}
redis: {{ url: "redis://127.0.0.1:{redis_port}" }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits: {{ sync: hybrid, claim_window: 1m, default: [{{ requests: 1000000000, window: 1m }}] }}
upstreams: {{ backend: {{ peers: ["127.0.0.1:{upstream}"] }} }}
routes:
  - {{ name: api, path_prefix: /api/, upstream: backend }}
{telemetry}"""


def tracing_block(label, receiver_port):
    if label == "off":
        return None
    return (f'{{ endpoint: "http://127.0.0.1:{receiver_port}", protocol: http, sample_ratio: {label}, '
            f'service_name: bench }}')


def h2load_fixed(url, duration, connections, rate, headers, log_path):
    """h2load over HTTP/1.1 at `rate` requests/s in all: requests and the
    p99 of the per-request times it logged."""
    per_client = max(rate // connections, 1)
    if os.path.exists(log_path):
        os.remove(log_path)
    cmd = ["h2load", "--h1", "-c", str(connections), "-D", str(duration), "--rps", str(per_client),
           "--log-file", log_path]
    for h in headers:
        cmd += ["-H", h]
    run_tool(cmd + [url], duration + 60)
    times = []
    ok = 0
    with open(log_path) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3:
                if parts[1] == "200":
                    ok += 1
                times.append(int(parts[2]) / 1000.0)
    if not times:
        raise SystemExit(f"h2load logged no request for {url}")
    times.sort()
    return {"requests": len(times), "ok": ok, "p99": times[min(len(times) - 1, int(len(times) * 0.99))],
            "rps": len(times) / duration}


def callgrind(binary, ws, label, receiver_port, redis_port, upstream, requests, auth_header):
    """Instructions per request of one config under valgrind."""
    port, admin = free_port(), free_port()
    conf = ws.write(f"cg-{label}.yaml", config(port, admin, redis_port, upstream,
                                               tracing_block(label, receiver_port)))
    out = ws.path(f"cg-{label}.out")
    p = ws.spawn(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, "serve", "-c", conf],
                 f"cg-{label}")
    deadline = time.time() + 120
    while True:
        try:
            if http_status(port, "/api/x", {"Authorization": auth_header.split(": ", 1)[1]}) == 200:
                break
        except OSError:
            pass
        if time.time() > deadline or p.poll() is not None:
            raise SystemExit(f"tollgate under valgrind ({label}) never answered")
        time.sleep(0.5)
    url = f"http://127.0.0.1:{port}/api/x"
    base = ["h2load", "--h1", "-c", "8", "-H", auth_header]
    run_tool(base + ["-n", "2000", url], 600)
    subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True)
    res = run_tool(base + ["-n", str(requests), url], 1200)
    if f"{requests} succeeded" not in res:
        raise SystemExit(f"callgrind run {label}: not every request succeeded:\n{res[-1500:]}")
    subprocess.run(["callgrind_control", f"--dump={label}", str(p.pid)], capture_output=True)
    dumps = sorted((f for f in os.listdir(ws.dir) if f.startswith(f"cg-{label}.out.")),
                   key=lambda f: os.path.getmtime(ws.path(f)))
    if not dumps:
        raise SystemExit(f"callgrind wrote no dump for {label}")
    total = 0
    with open(ws.path(dumps[-1])) as f:
        for line in f:
            if line.startswith("summary:"):
                total = int(line.split()[1])
    p.terminate()
    p.wait(timeout=60)
    return total / requests


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default=release_binary("tollgate"))
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--callgrind", type=int, default=20000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--callgrind-only", action="store_true",
                        help="only the instruction counts (steady on a shared machine)")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds, args.callgrind = 2, 1, min(args.callgrind, 2000)
    exit_on_signals()
    require(["nginx", "wrk", "h2load", "redis-server"], "bench/run.sh installs nginx and wrk; make setup the rest")
    if args.callgrind and not shutil.which("valgrind"):
        log("valgrind missing: callgrind part skipped")
        args.callgrind = 0
    require_binary(args.bin, "cargo build --release")

    python = os.path.join(ROOT, ".venv", "bin", "python3")
    if not os.path.exists(python):
        python = sys.executable
    with Workspace("tollgate-bench-tracing-") as ws:
        upstream, redis_port = free_port(), free_port()
        up = ws.nginx("upstream", f"server {{ listen 127.0.0.1:{upstream}; location / {{ return 200 'ok'; }} }}")
        ws.wait(up, "upstream", upstream)
        ws.redis(redis_port)
        receiver_port = free_port()
        rec = ws.spawn([python, os.path.join(ROOT, "tests", "support", "otlp_receiver.py"), ws.path("spans"),
                        "--http-port", str(receiver_port), "--discard", "--forever"], "receiver")
        ws.wait(rec, "receiver", receiver_port)

        instances = {}
        for label in CONFIGS:
            port, admin = free_port(), free_port()
            p = ws.tollgate(args.bin, f"tollgate-{label}",
                            config(port, admin, redis_port, upstream, tracing_block(label, receiver_port)),
                            [port, admin])
            instances[label] = (port, admin, p)
        auth = f"Authorization: Bearer {token(SECRET, 'bench-tracing')}"
        for label, (port, _, _) in instances.items():
            status = http_status(port, "/api/x", {"Authorization": auth.split(": ", 1)[1]})
            if status != 200:
                raise SystemExit(f"{label}: tollgate answered {status} on the full path")

        full = {label: [] for label in CONFIGS}
        fixed = {label: [] for label in CONFIGS}
        rate = 0
        for r in range(0 if args.callgrind_only else args.rounds):
            for label in CONFIGS:
                port, _, p = instances[label]
                log(f"round {r + 1}/{args.rounds}: full speed, {label}")
                res = cpu_per_request([p.pid], lambda: wrk(f"http://127.0.0.1:{port}/api/x", args.duration,
                                                           args.connections, [auth]))
                if res["non2xx"] or res["socket_errors"]:
                    raise SystemExit(f"{label}: {res['non2xx']} non-2xx, {res['socket_errors']} socket errors")
                full[label].append(res)
        if not args.callgrind_only:
            rate = int(statistics.median(r["rps"] for r in full["off"]) / 2)
        for r in range(0 if args.callgrind_only else args.rounds):
            for label in CONFIGS:
                port, _, p = instances[label]
                log(f"round {r + 1}/{args.rounds}: {rate} requests/s, {label}")
                res = cpu_per_request([p.pid], lambda: h2load_fixed(
                    f"http://127.0.0.1:{port}/api/x", args.duration, args.connections, rate, [auth],
                    ws.path(f"h2load-{label}.log")))
                if res["ok"] != res["requests"]:
                    raise SystemExit(f"{label}: {res['requests'] - res['ok']} answers were not 200")
                fixed[label].append(res)
        # Let the exporters send what they hold before reading their counters.
        time.sleep(1)
        spans = {}
        for label, (_, admin, _) in instances.items():
            spans[label] = (metric(admin, "tollgate_trace_spans_exported_total") or 0,
                            metric(admin, "tollgate_trace_spans_dropped_total") or 0)

        cg = {}
        if args.callgrind:
            for label in CONFIGS:
                log(f"callgrind: {label}, {args.callgrind} requests")
                cg[label] = callgrind(args.bin, ws, label, receiver_port, redis_port, upstream, args.callgrind, auth)

    if args.callgrind_only:
        print(f"Instructions per request (callgrind, {args.callgrind} requests, full path, "
              f"{time.strftime('%Y-%m-%d')}):\n")
        print("\n".join(table(["tracing", "instructions/req", "vs off"],
                               [(label, f"{cg[label]:,.0f}", f"{(cg[label] / cg['off'] - 1) * 100:+.1f}%")
                                for label in CONFIGS], "lrr")))
        return
    med = lambda rows, key: statistics.median(r[key] for r in rows)
    base_cpu = med(full["off"], "cpu_us")
    base_fixed_cpu = med(fixed["off"], "cpu_us")
    print(f"# Tracing cost ({time.strftime('%Y-%m-%d')}, {cpu_model() or 'unknown CPU'}, {os.cpu_count()} CPUs)\n")
    print(f"`python3 bench/tracing.py{' --quick' if args.quick else ''} --duration {args.duration} "
          f"--rounds {args.rounds} --connections {args.connections} --callgrind {args.callgrind}`: full path "
          f"(JWT, hybrid limits over Redis, nginx upstream), one worker thread, medians of {args.rounds} "
          f"interleaved round(s), OTLP/HTTP to a local receiver.\n")
    rows = []
    for label in CONFIGS:
        f, x = full[label], fixed[label]
        rows.append((label, f"{med(f, 'rps'):.0f}", f"{med(f, 'p99'):.2f}", f"{med(f, 'cpu_us'):.1f}",
                     f"{(med(f, 'cpu_us') / base_cpu - 1) * 100:+.1f}%",
                     f"{med(x, 'p99'):.2f}", f"{med(x, 'cpu_us'):.1f}",
                     f"{(med(x, 'cpu_us') / base_fixed_cpu - 1) * 100:+.1f}%",
                     f"{cg[label]:,.0f}" if label in cg else "-",
                     f"{(cg[label] / cg['off'] - 1) * 100:+.1f}%" if label in cg else "-",
                     f"{spans[label][0]:.0f} / {spans[label][1]:.0f}"))
    print("\n".join(table(["tracing", "req/s (full speed)", "p99 ms", "CPU µs/req", "vs off",
                 f"p99 ms at {rate} req/s", "CPU µs/req", "vs off", "instructions/req", "vs off",
                 "spans exported / dropped"],
                rows, "l" + "r" * 10)))


if __name__ == "__main__":
    main()
