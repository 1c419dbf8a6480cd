#!/usr/bin/env python3
"""Distributed rate-limit accuracy and Redis cost, for 1, 3 and 8 instances.

For every algorithm and sync mode it starts N tollgate processes sharing one
private redis-server, then:
  near: sends 3x the limit (limit 300 per minute), spread evenly over the
        instances from concurrent keep-alive clients -> admitted vs limit;
  far:  sends 3000 requests for a key with a limit of 1,000,000 per minute
        -> Redis calls per admitted request (from tollgate_redis_calls_total).
Then the same for limits.rules keys (fixed_window): a per-IP rule on a
public route, a header rule, a monthly calendar quota on the api key, and
"far" for a token whose request is also counted by two rules (three scopes,
four windows). Prints markdown tables. Needs a release build, redis-server
and PyJWT.

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


def hammer(ports, tok, total, clients_per_instance=2, path="/api/x", headers=None):
    if headers is None:
        headers = {"Authorization": f"Bearer {tok}"}
    per_client = total // (len(ports) * clients_per_instance)
    counts = {"ok": 0, "limited": 0, "other": 0}
    lock = threading.Lock()

    def run(port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        ok = limited = other = 0
        for _ in range(per_client):
            conn.request("GET", path, headers=headers)
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

        rule_rows = rules_runs(work, binary, redis_port, echo_port, counts, run_id)

    print("\n".join(table(
        ["sync", "algorithm", "instances", "limit", "sent", "admitted", "admitted / limit",
         "Redis calls per request, far from the limit"],
        [(sync, algorithm, n, limit, sent, ok, f"{ok / limit:.3f}", f"{per_request:.4f}")
         for sync, algorithm, n, limit, sent, ok, far_ok, per_request in rows],
        "llrrrrrr")))
    print()
    print("\n".join(table(
        ["key", "sync", "instances", "limit", "sent", "admitted", "admitted / limit",
         "Redis calls per request, far from every limit"],
        rule_rows, "llrrrrrr")))


RULES = {
    # key kind: (rule, near request (path, headers), far request)
    "client_ip (per-IP rule, public route)": (
        "{ name: per-ip, key: client_ip, routes: [public], windows: [{ requests: LIMIT, window: 1h }] }",
        lambda run: ("/public/x", {"X-Forwarded-For": f"198.51.100.{run % 250 + 1}"}),
    ),
    "header:X-Tenant (public route)": (
        "{ name: tenant, key: \"header:X-Tenant\", routes: [public], windows: [{ requests: LIMIT, window: 1h }] }",
        lambda run: ("/public/x", {"X-Tenant": f"tenant-{run}"}),
    ),
    "api_key, calendar: month": (
        "{ name: monthly, key: api_key, routes: [api], windows: [{ requests: LIMIT, calendar: month }] }",
        lambda run: ("/api/x", {"Authorization": f"Bearer {limited_token(f'month-{run}', 1_000_000_000)}"}),
    ),
}


def rules_runs(work, binary, redis_port, echo_port, counts, run_id):
    """Accuracy of rule keys near their limit, and the Redis cost of a
    request counted by a token and two rules far from every limit."""
    rows = []
    for sync in ["hybrid", "exact"]:
        for kind, (rule, request) in RULES.items():
            for n in counts:
                run_id += 1
                near_limit = 300
                instances = start_fleet(work, binary, n, run_id, redis_port, echo_port, sync,
                                        f"  rules: [{rule.replace('LIMIT', str(near_limit))}]")
                ports = [port for _, port, _ in instances]
                avoid_minute_edge()
                path, headers = request(run_id)
                near, sent = hammer(ports, None, 3 * near_limit, path=path, headers=headers)
                rows.append((kind, sync, n, near_limit, sent, near["ok"], f"{near['ok'] / near_limit:.3f}", "–"))
                print(f"{sync:6} {kind} x{n}: admitted {near['ok']}/{near_limit} (sent {sent})", file=sys.stderr)
                stop_fleet(instances)
        # Far from every limit: a token (1,000,000/min claim) also counted by
        # a per-IP rule and a monthly quota.
        for n in counts:
            run_id += 1
            rules = ("  rules:\n"
                     "    - { name: per-ip, key: client_ip, windows: [{ requests: 1000000000, window: 1h }] }\n"
                     "    - { name: monthly, key: api_key, windows: [{ requests: 1000000000, calendar: month }] }")
            instances = start_fleet(work, binary, n, run_id, redis_port, echo_port, sync, rules)
            ports = [port for _, port, _ in instances]
            before = sum(metric(a, 'tollgate_redis_calls_total{op="acquire"}') for _, _, a in instances)
            far, sent = hammer(ports, limited_token(f"far-rules-{run_id}", 1_000_000), 3000)
            after = sum(metric(a, 'tollgate_redis_calls_total{op="acquire"}') for _, _, a in instances)
            per_request = (after - before) / max(far["ok"], 1)
            rows.append(("token + per-IP rule + monthly rule", sync, n, "–", sent, far["ok"], "–",
                         f"{per_request:.4f}"))
            print(f"{sync:6} token+2 rules x{n}: far: {per_request:.4f} Redis calls per request", file=sys.stderr)
            stop_fleet(instances)
    return rows


def start_fleet(work, binary, n, run_id, redis_port, echo_port, sync, rules):
    instances = []
    for i in range(n):
        port, admin = free_port(), free_port()
        name = f"r{run_id}-{i}"
        p = work.tollgate(binary, name, f"""
server: {{ listen: ["127.0.0.1:{port}"], threads: 1, pid_file: "{work.dir}/{name}.pid", upgrade_sock: "{work.dir}/{name}.sock", trusted_proxies: ["127.0.0.1/32"] }}
admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ level: warn, access_log: false }}
redis: {{ url: "redis://127.0.0.1:{redis_port}", timeout: 200ms, key_prefix: "b{run_id}:" }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits:
  algorithm: fixed_window
  sync: {sync}
  claim_window: 1m
{rules}
upstreams: {{ backend: {{ peers: ["127.0.0.1:{echo_port}"] }} }}
routes:
  - {{ name: api, path_prefix: /api/, upstream: backend }}
  - {{ name: public, path_prefix: /public/, upstream: backend, auth: none }}
""", (port, admin))
        instances.append((p, port, admin))
    return instances


def stop_fleet(instances):
    for p, _, _ in instances:
        p.terminate()
    for p, _, _ in instances:
        p.wait(timeout=30)


if __name__ == "__main__":
    main()
