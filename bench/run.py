#!/usr/bin/env python3
"""Whole-system load benchmark, side by side in one run (driven by bench/run.sh).

Starts an nginx static upstream (`return 200`), an nginx proxy_pass baseline,
a private redis-server and tollgate instances, then measures, interleaved and
repeated (medians of --rounds):
  nginx        nginx proxy_pass (keep-alive upstream)
  bare         Pingora with no logic (examples/bare_pingora.rs): the floor
               any proxy built on Pingora's HTTP/1 path stands on
  passthrough  tollgate, route with auth: none and no limits
  full         tollgate, JWT + route permission + hybrid Redis limits, far from the limit
  exact        the same with sync: exact (one Redis script per request)
  limited      tollgate, a key over its limit (the 429 path)
Reports requests/s, p50/p99 latency (wrk) and the proxy's CPU time per
request (from /proc/<pid>/stat), the ratios the targets are stated in, an oha
cross-check, and a scaling section (1 vs 2 worker threads; 1, 1k and 100k
distinct keys). Prints a markdown report on stdout.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import jwt

SECRET = "bench-run-secret-0123456789abcdef"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total


def children(pid):
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    except OSError:
        return []


def token(api_key, rate_limit=None):
    claims = {"api_key": api_key, "allowed_routes": ["/api/*"], "exp": int(time.time()) + 7200}
    if rate_limit is not None:
        claims["rate_limit"] = rate_limit
    return jwt.encode(claims, SECRET, algorithm="HS256")


def parse_latency(value):
    units = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
    for unit in ("us", "ms", "s"):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * units[unit]
    return float(value)


def wrk(url, duration, connections, headers=(), script=None):
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = p50 = p99 = None
    total = 0
    non2xx = 0
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(parts[1])
        elif len(parts) == 2 and parts[0] == "50.000%":
            p50 = parse_latency(parts[1])
        elif len(parts) == 2 and parts[0] == "99.000%":
            p99 = parse_latency(parts[1])
        elif "requests in" in line:
            total = int(parts[0])
        elif line.strip().startswith("Non-2xx"):
            non2xx = int(parts[-1])
    if p50 is None:
        # wrk without HdrHistogram prints "50%  1.23ms".
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "50%":
                p50 = parse_latency(parts[1])
            if len(parts) == 2 and parts[0] == "99%":
                p99 = parse_latency(parts[1])
    return {"rps": rps or 0.0, "p50": p50 or 0.0, "p99": p99 or 0.0, "requests": total, "non2xx": non2xx}


def oha(url, duration, connections, headers=()):
    if not shutil.which("oha"):
        return None
    cmd = ["oha", "-z", f"{duration}s", "-c", str(connections), "--no-tui", "--output-format", "json"]
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
    return {
        "rps": data.get("summary", {}).get("requestsPerSec", 0.0),
        "p50": (pct.get("p50") or 0.0) * 1000,
        "p99": (pct.get("p99") or 0.0) * 1000,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/tollgate")
    ap.add_argument("--bare-bin", default="target/release/examples/bare_pingora")
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
    for tool in ("nginx", "wrk", "redis-server"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is required (bench/run.sh installs it)")

    work = tempfile.mkdtemp(prefix="tollgate-load-")
    procs = []

    def spawn(cmd, name):
        p = subprocess.Popen(cmd, stdout=open(f"{work}/{name}.log", "w"), stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    def nginx(name, server_block):
        conf = f"{work}/{name}.conf"
        with open(conf, "w") as f:
            f.write(f"""
worker_processes 1;
daemon off;
pid {work}/{name}.pid;
error_log {work}/{name}.error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  {server_block}
}}
""")
        return spawn(["nginx", "-c", conf, "-p", work], name)

    try:
        up_port, ngx_port, redis_port = free_port(), free_port(), free_port()
        nginx("upstream", f"server {{ listen 127.0.0.1:{up_port}; location / {{ return 200 'ok'; }} }}")
        ngx = nginx("proxy", f"""
upstream backend {{ server 127.0.0.1:{up_port}; keepalive 128; }}
server {{ listen 127.0.0.1:{ngx_port};
  location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}""")
        spawn(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", work], "redis")
        for p in (up_port, ngx_port, redis_port):
            wait_port(p)

        def tollgate(name, sync, threads=1):
            port, admin = free_port(), free_port()
            conf = f"{work}/{name}.yaml"
            with open(conf, "w") as f:
                f.write(f"""
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
""")
            p = spawn([binary, "serve", "-c", conf], name)
            wait_port(port)
            wait_port(admin)
            return p, port

        bare_port = free_port()
        bare = spawn([bare_binary, f"127.0.0.1:{bare_port}", f"127.0.0.1:{up_port}"], "bare")
        wait_port(bare_port)
        hybrid, hybrid_port = tollgate("hybrid", "hybrid")
        exact, exact_port = tollgate("exact", "exact")
        # nginx's worker is the master's child.
        time.sleep(0.3)
        ngx_pids = children(ngx.pid) or [ngx.pid]

        far = f"Authorization: Bearer {token('far-key')}"
        over_tok = token("over-key", rate_limit=1)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-H", f"Authorization: Bearer {over_tok}",
                        f"http://127.0.0.1:{hybrid_port}/api/x"], check=False)
        over = f"Authorization: Bearer {over_tok}"

        scenarios = [
            ("nginx", "nginx proxy_pass", f"http://127.0.0.1:{ngx_port}/x", (), ngx_pids),
            ("bare", "bare Pingora (no logic)", f"http://127.0.0.1:{bare_port}/x", (), [bare.pid]),
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
                before = cpu_ticks(pids)
                res = wrk(url, args.duration, args.connections, headers)
                ticks = cpu_ticks(pids) - before
                res["cpu_us"] = ticks * 1e6 / CLK_TCK / max(res["requests"], 1)
                results[key].append(res)
                print(f"round {r + 1} {label}: {res['rps']:.0f} rps, p50 {res['p50']:.3f} ms, "
                      f"p99 {res['p99']:.3f} ms, {res['cpu_us']:.1f} µs CPU/request, non-2xx {res['non2xx']}",
                      file=sys.stderr)

        def med(key, field):
            return statistics.median(x[field] for x in results[key])

        cpu_count = os.cpu_count()
        model = ""
        try:
            with open("/proc/cpuinfo") as f:
                model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
        except OSError:
            pass
        print(f"Run on {time.strftime('%Y-%m-%d')}, {cpu_count} cores ({model}), wrk -t1 -c{args.connections} "
              f"-d{args.duration}s, {args.rounds} interleaved rounds, medians; one worker thread per proxy; "
              f"nginx `return 200` upstream for both proxies.\n")
        print("| scenario | requests/s | p50 ms | p99 ms | proxy CPU µs/request |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for key, label, *_ in scenarios:
            print(f"| {label} | {med(key, 'rps'):.0f} | {med(key, 'p50'):.3f} | {med(key, 'p99'):.3f} | {med(key, 'cpu_us'):.1f} |")
        ratio = lambda a, b: med(a, "rps") / max(med(b, "rps"), 1e-9)

        def per_round(a, b):
            # Both scenarios of one round ran back to back: less exposed to
            # the machine's drift than the ratio of medians.
            rs = [x["rps"] / max(y["rps"], 1e-9) for x, y in zip(results[a], results[b])]
            return f"{min(rs):.2f}–{max(rs):.2f}"

        def by_cpu(a, b):
            # Throughput one proxy core would give: the inverse CPU cost ratio.
            return med(b, "cpu_us") / max(med(a, "cpu_us"), 1e-9)

        print("\n| target | ratio (rps medians) | per round | by CPU µs/request | met |")
        print("| --- | ---: | ---: | ---: | --- |")
        for label, a, b, goal in [
            ("full path / tollgate passthrough", "full", "passthrough", 0.90),
            ("full path / nginx proxy_pass", "full", "nginx", 0.75),
            ("hybrid / exact", "full", "exact", 1.0),
            ("429 path / passthrough", "limited", "passthrough", 1.0),
            ("full path / bare Pingora (no target)", "full", "bare", None),
            ("bare Pingora / nginx proxy_pass (no target)", "bare", "nginx", None),
        ]:
            value = ratio(a, b)
            bound = f" (≥ {goal:.2f})" if goal is not None else ""
            met = "-" if goal is None else ("yes" if value >= goal else "no")
            print(f"| {label}{bound} | {value:.2f} | {per_round(a, b)} | {by_cpu(a, b):.2f} | {met} |")

        oha_rows = []
        for key, label, url, headers, _ in scenarios:
            o = oha(url, args.duration, args.connections, headers)
            if o:
                oha_rows.append((label, o))
        if oha_rows:
            print(f"\noha cross-check (oha -c {args.connections} -z {args.duration}s):\n")
            print("| scenario | requests/s | p50 ms | p99 ms |")
            print("| --- | ---: | ---: | ---: |")
            for label, o in oha_rows:
                print(f"| {label} | {o['rps']:.0f} | {o['p50']:.3f} | {o['p99']:.3f} |")

        if not (args.smoke or args.skip_scaling):
            two, two_port = tollgate("hybrid2", "hybrid", threads=2)
            scale = []
            for label, url, headers, pids, script in [
                ("full path, 1 worker thread, 1 key", f"http://127.0.0.1:{hybrid_port}/api/x", (far,), [hybrid.pid], None),
                ("full path, 2 worker threads, 1 key", f"http://127.0.0.1:{two_port}/api/x", (far,), [two.pid], None),
            ]:
                before = cpu_ticks(pids)
                res = wrk(url, args.duration, args.connections, headers)
                res["cpu_us"] = (cpu_ticks(pids) - before) * 1e6 / CLK_TCK / max(res["requests"], 1)
                scale.append((label, res))
            for n in (1000, 100000):
                tokens_file = f"{work}/tokens-{n}.lua"
                with open(tokens_file, "w") as f:
                    f.write("tokens = {\n")
                    for i in range(n):
                        f.write(f'"{token(f"key-{n}-{i}")}",\n')
                    f.write("}\ni = 0\nrequest = function()\n  i = i % #tokens + 1\n"
                            "  return wrk.format(nil, nil, {[\"Authorization\"] = \"Bearer \" .. tokens[i]})\nend\n")
                wrk(f"http://127.0.0.1:{hybrid_port}/api/x", 1, args.connections, (), tokens_file)
                before = cpu_ticks([hybrid.pid])
                res = wrk(f"http://127.0.0.1:{hybrid_port}/api/x", args.duration, args.connections, (), tokens_file)
                res["cpu_us"] = (cpu_ticks([hybrid.pid]) - before) * 1e6 / CLK_TCK / max(res["requests"], 1)
                scale.append((f"full path, 1 worker thread, {n} keys", res))
            print("\nScaling:\n")
            print("| run | requests/s | p50 ms | p99 ms | proxy CPU µs/request |")
            print("| --- | ---: | ---: | ---: | ---: |")
            for label, res in scale:
                print(f"| {label} | {res['rps']:.0f} | {res['p50']:.3f} | {res['p99']:.3f} | {res['cpu_us']:.1f} |")
        failed = sum(x["non2xx"] for k in ("nginx", "bare", "passthrough", "full", "exact") for x in results[k])
        if failed:
            raise SystemExit(f"{failed} non-2xx answers on paths that should all pass")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
