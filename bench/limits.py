#!/usr/bin/env python3
"""Distributed rate-limit accuracy and Redis cost, for 1, 3 and 8 instances.

For every algorithm and sync mode it starts N tollgate processes sharing one
private redis-server, then:
  near: sends 3x the limit (limit 300 per minute), spread evenly over the
        instances from concurrent keep-alive clients -> admitted vs limit;
  far:  sends 3000 requests for a key with a limit of 1,000,000 per minute
        -> Redis calls per admitted request (from tollgate_redis_calls_total).
Prints a markdown table. Needs a release build, redis-server and PyJWT.

usage: bench/limits.py [--bin ${CARGO_TARGET_DIR:-target}/release/tollgate] [--instances 1,3,8] [--quick]
"""
import argparse
import http.client
import os
import sys
import threading
import time

from common import Workspace, free_port, metric, release_binary, require, require_binary, table, token

SECRET = "bench-limits-secret-0123456789abcdef"


def limited_token(api_key, rate_limit):
    return token(SECRET, api_key, routes=("/*",), ttl=3600, rate_limit=rate_limit)


def avoid_minute_edge(margin=12):
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.1)


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
    ap.add_argument("--bin", default=release_binary("tollgate"))
    ap.add_argument("--instances", default="1,3,8")
    ap.add_argument("--quick", action="store_true", help="one algorithm, 1 and 3 instances (CI smoke)")
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    require_binary(binary, "cargo build --release first")
    require(["redis-server"], "apt-get install redis-server")

    counts = [int(n) for n in args.instances.split(",")]
    algorithms = ["fixed_window", "sliding_window", "gcra"]
    if args.quick:
        counts, algorithms = [1, 3], ["fixed_window"]

    rows = []
    with Workspace("tollgate-bench-") as work:
        redis_port = free_port()
        work.redis(redis_port)
        echo_port = free_port()
        echo = work.spawn([binary, "echo", "--listen", f"127.0.0.1:{echo_port}"], "echo")
        work.wait(echo, "echo", echo_port)
        run_id = 0
        for sync in ["hybrid", "exact"]:
            for algorithm in algorithms:
                for n in counts:
                    run_id += 1
                    instances = []
                    for i in range(n):
                        port, admin = free_port(), free_port()
                        name = f"t{run_id}-{i}"
                        p = work.tollgate(binary, name, f"""
server: {{ listen: ["127.0.0.1:{port}"], threads: 1, pid_file: "{work.dir}/{name}.pid", upgrade_sock: "{work.dir}/{name}.sock" }}
admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ level: warn, access_log: false }}
redis: {{ url: "redis://127.0.0.1:{redis_port}", timeout: 200ms, key_prefix: "b{run_id}:" }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits: {{ algorithm: {algorithm}, sync: {sync}, claim_window: 1m }}
upstreams: {{ backend: {{ peers: ["127.0.0.1:{echo_port}"] }} }}
routes: [{{ name: api, path_prefix: /api/, upstream: backend }}]
""", (port, admin))
                        instances.append((p, port, admin))
                    ports = [port for _, port, _ in instances]
                    avoid_minute_edge()
                    near_limit = 300
                    near, sent = hammer(ports, limited_token(f"near-{run_id}", near_limit), 3 * near_limit)
                    calls_before = sum(metric(a, 'tollgate_redis_calls_total{op="acquire"}') for _, _, a in instances)
                    far, far_sent = hammer(ports, limited_token(f"far-{run_id}", 1_000_000), 3000)
                    calls_after = sum(metric(a, 'tollgate_redis_calls_total{op="acquire"}') for _, _, a in instances)
                    per_request = (calls_after - calls_before) / max(far["ok"], 1)
                    rows.append((sync, algorithm, n, near_limit, sent, near["ok"], far["ok"], per_request))
                    print(f"{sync:6} {algorithm:14} x{n}: admitted {near['ok']}/{near_limit} "
                          f"(sent {sent}), far: {per_request:.4f} Redis calls per request", file=sys.stderr)
                    for p, _, _ in instances:
                        p.terminate()
                    for p, _, _ in instances:
                        p.wait(timeout=30)

    print("\n".join(table(
        ["sync", "algorithm", "instances", "limit", "sent", "admitted", "admitted / limit",
         "Redis calls per request, far from the limit"],
        [(sync, algorithm, n, limit, sent, ok, f"{ok / limit:.3f}", f"{per_request:.4f}")
         for sync, algorithm, n, limit, sent, ok, far_ok, per_request in rows],
        "llrrrrrr")))


if __name__ == "__main__":
    main()
