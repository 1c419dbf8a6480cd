#!/usr/bin/env python3
"""Distributed rate-limit accuracy and Redis cost, for 1, 3 and 8 instances.

For every algorithm and sync mode it starts N tollgate processes sharing one
private redis-server, then:
  near: sends 3x the limit (limit 300 per minute), spread evenly over the
        instances from concurrent keep-alive clients -> admitted vs limit;
  far:  sends 3000 requests for a key with a limit of 1,000,000 per minute
        -> Redis calls per admitted request (from tollgate_redis_calls_total).
Prints a markdown table. Needs a release build, redis-server and PyJWT.

usage: bench/limits.py [--bin target/release/tollgate] [--instances 1,3,8] [--quick]
"""
import argparse
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import jwt

SECRET = "bench-limits-secret-0123456789abcdef"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"port {port} never opened")


def token(api_key, rate_limit):
    claims = {"api_key": api_key, "rate_limit": rate_limit, "allowed_routes": ["/*"],
              "exp": int(time.time()) + 3600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def avoid_minute_edge(margin=12):
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.1)


def metric(admin_port, series):
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def hammer(ports, tok, total, clients_per_instance=2):
    per_client = total // (len(ports) * clients_per_instance)
    counts = {"ok": 0, "limited": 0, "other": 0}
    lock = threading.Lock()

    def run(port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        ok = limited = other = 0
        for _ in range(per_client):
            conn.request("GET", "/api/x", headers={"Authorization": f"Bearer {tok}"})
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                ok += 1
            elif r.status == 429:
                limited += 1
            else:
                other += 1
        with lock:
            counts["ok"] += ok
            counts["limited"] += limited
            counts["other"] += other

    threads = [threading.Thread(target=run, args=(p,)) for p in ports for _ in range(clients_per_instance)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts, per_client * len(threads)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/tollgate")
    ap.add_argument("--instances", default="1,3,8")
    ap.add_argument("--quick", action="store_true", help="one algorithm, 1 and 3 instances (CI smoke)")
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"{binary} not found: cargo build --release first")
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is required")

    counts = [int(n) for n in args.instances.split(",")]
    algorithms = ["fixed_window", "sliding_window", "gcra"]
    if args.quick:
        counts, algorithms = [1, 3], ["fixed_window"]

    work = tempfile.mkdtemp(prefix="tollgate-bench-")
    procs = []

    def spawn(cmd, log):
        p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    rows = []
    try:
        redis_port = free_port()
        spawn(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", work], f"{work}/redis.log")
        wait_port(redis_port)
        echo_port = free_port()
        spawn([binary, "echo", "--listen", f"127.0.0.1:{echo_port}"], f"{work}/echo.log")
        wait_port(echo_port)
        run_id = 0
        for sync in ["hybrid", "exact"]:
            for algorithm in algorithms:
                for n in counts:
                    run_id += 1
                    instances = []
                    for i in range(n):
                        port, admin = free_port(), free_port()
                        conf = f"{work}/t{run_id}-{i}.yaml"
                        with open(conf, "w") as f:
                            f.write(f"""
server: {{ listen: ["127.0.0.1:{port}"], threads: 1, pid_file: "{work}/t{run_id}-{i}.pid", upgrade_sock: "{work}/t{run_id}-{i}.sock" }}
admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ level: warn, access_log: false }}
redis: {{ url: "redis://127.0.0.1:{redis_port}", timeout: 200ms, key_prefix: "b{run_id}:" }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits: {{ algorithm: {algorithm}, sync: {sync}, claim_window: 1m }}
upstreams: {{ backend: {{ peers: ["127.0.0.1:{echo_port}"] }} }}
routes: [{{ name: api, path_prefix: /api/, upstream: backend }}]
""")
                        p = spawn([binary, "serve", "-c", conf], f"{work}/t{run_id}-{i}.log")
                        instances.append((p, port, admin))
                    for _, port, admin in instances:
                        wait_port(port)
                        wait_port(admin)
                    ports = [port for _, port, _ in instances]
                    avoid_minute_edge()
                    near_limit = 300
                    near, sent = hammer(ports, token(f"near-{run_id}", near_limit), 3 * near_limit)
                    calls_before = sum(metric(a, 'tollgate_redis_calls_total{op="acquire"}') for _, _, a in instances)
                    far, far_sent = hammer(ports, token(f"far-{run_id}", 1_000_000), 3000)
                    calls_after = sum(metric(a, 'tollgate_redis_calls_total{op="acquire"}') for _, _, a in instances)
                    per_request = (calls_after - calls_before) / max(far["ok"], 1)
                    rows.append((sync, algorithm, n, near_limit, sent, near["ok"], far["ok"], per_request))
                    print(f"{sync:6} {algorithm:14} x{n}: admitted {near['ok']}/{near_limit} "
                          f"(sent {sent}), far: {per_request:.4f} Redis calls per request", file=sys.stderr)
                    for p, _, _ in instances:
                        p.terminate()
                    for p, _, _ in instances:
                        p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)

    print("| sync | algorithm | instances | limit | sent | admitted | admitted / limit | Redis calls per request, far from the limit |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for sync, algorithm, n, limit, sent, ok, far_ok, per_request in rows:
        print(f"| {sync} | {algorithm} | {n} | {limit} | {sent} | {ok} | {ok / limit:.3f} | {per_request:.4f} |")


if __name__ == "__main__":
    main()
