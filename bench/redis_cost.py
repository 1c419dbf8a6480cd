#!/usr/bin/env python3
"""Redis cost per proxied request, for 1, 100 and 1000 distinct keys.

Starts an nginx `return 200` upstream, a private redis-server and one
tollgate (threads 1, sync: hybrid, every key limited to 10^9 per 60 s, so no
key is near its limit). The background: the same duration with no load
(readiness PINGs, analytics flushes), once before and once after the loaded
runs, gives Redis CPU and calls per second at rest (both are printed; their
mean is subtracted). For each key count: wrk -t1 -c32 round robin over that many tokens
(a wrk Lua script; a key set of its own per count), a warm-up (3 s), then the
measured run (--duration, 10 s):
  Redis CPU µs/request   on-CPU time of every redis-server thread
                         (/proc/PID/task/*/schedstat, ns) over the run, per
                         proxied request; gross, and net of the idle rate
                         times the run's length (at 1 key the idle share is
                         most of the gross figure: compare the two idle
                         samples: half their difference, per request, is
                         printed as the net figure's ± and a target inside
                         it is reported as unclear rather than met or not). utime+stime (/proc/PID/stat)
                         is the same quantity in 10 ms ticks, too coarse at
                         these rates (0.03 µs x 450,000 requests is 13.5 ms):
                         it is shown beside it as a cross-check;
  lease scripts/request  tollgate_redis_calls_total{op="acquire"} delta per
                         request, and at Redis every EVAL/EVALSHA (INFO
                         commandstats: leases, analytics, charges) per request,
                         net of the idle rate;
  µs per script          commandstats usec delta / calls delta of the scripts.
Prints a markdown table with the targets (net: <= 0.10 µs/request at 1,000
keys, <= 0.03 at 1 key) on stdout and writes it to
bench/results/redis_cost.md; progress on stderr. Needs nginx, wrk,
redis-server and PyJWT.

usage: bench/redis_cost.py [--bin target/release/tollgate] [--baseline OLD_BINARY] [--rounds N]
                           [--keys 1,100,1000] [--duration 10] [--quick]
  --baseline  a second build (say main's release binary; default
              $TOLLGATE_BASELINE_BIN) measured the same way in the same run,
              each on a fresh redis-server; the table has a row per build
  --rounds    measure each build N times, alternating which goes first
  --quick     3 s runs after 1 s warm-ups: under a minute per build
A control run (skip it with --no-control) drives the same load through this
build with no window at all: Redis then sees only the background traffic
(analytics flushes, readiness probes); "net of the control" subtracts its
figure, leaving what the leases cost.
Leases now last up to the rest of a 60 s window, so their calls bunch at
window starts: use --duration 60 (and --idle 10) to include one.
The analytics flush runs once a second whatever the load, so a run holds one
more or one fewer flush than its length in seconds: with 1,000 keys, where a
flush is the largest script, that is a few % of the net figure at 10 s.
"""
import argparse
import glob
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jwt

from common import free_port, require, require_binary, wait_port

SECRET = "bench-redis-cost-secret-0123456789abcdef"
CONNECTIONS = 32
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONTROL = "no limits (control)"


def log(msg):
    print(f"redis_cost: {msg}", file=sys.stderr, flush=True)


def cpu_ns(pid):
    """On-CPU time of every thread of a process, in ns (sum_exec_runtime)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, every thread


def redis_info(port, section):
    """INFO <section> over a bare RESP connection: {name: {field: number}}."""
    cmd = f"*2\r\n$4\r\nINFO\r\n${len(section)}\r\n{section}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(cmd)
        f = s.makefile("rb")
        header = f.readline()
        if not header.startswith(b"$"):
            raise SystemExit(f"unexpected answer to INFO from Redis: {header!r}")
        body = f.read(int(header[1:]) + 2).decode()
    stats = {}
    for line in body.splitlines():
        if line.startswith("cmdstat_"):
            name, fields = line.split(":", 1)
            stats[name[len("cmdstat_"):]] = {
                k: float(v) for k, v in (kv.split("=") for kv in fields.split(","))}
    return stats


def script_calls(stats):
    """(calls, usec) of every script command: eval, evalsha, eval_ro, evalsha_ro."""
    rows = [v for k, v in stats.items() if k.startswith("eval")]
    return sum(r["calls"] for r in rows), sum(r["usec"] for r in rows)


def all_calls(stats):
    return sum(v["calls"] for v in stats.values())


def acquire_calls(admin_port):
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith('tollgate_redis_calls_total{op="acquire"} '):
            return float(line.split()[-1])
    return 0.0


def token(api_key):
    claims = {"api_key": api_key, "allowed_routes": ["/api/*"], "exp": int(time.time()) + 7200}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def wrk(url, duration, script):
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}s", "-s", script, url]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"wrk failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    total = non2xx = errors = 0
    for line in res.stdout.splitlines():
        parts = line.replace(",", "").split()
        if "requests in" in line:
            total = int(parts[0])
        elif line.strip().startswith("Non-2xx"):
            non2xx = int(parts[-1])
        elif line.strip().startswith("Socket errors:"):
            errors = sum(int(x) for x in parts[3::2])
    if total == 0 or non2xx or errors:
        raise SystemExit(f"wrk: {total} requests, {non2xx} non-2xx, {errors} socket errors:\n{res.stdout}")
    return total


LUA = """
local tokens = {}
for line in io.lines("%s") do tokens[#tokens + 1] = line end
local i = 0
function request()
  i = i %% #tokens + 1
  return wrk.format(nil, nil, {["Authorization"] = "Bearer " .. tokens[i]})
end
"""


class Snapshot:
    """Everything a run is measured by, read at one instant. Redis CPU is
    read after INFO, so the INFO calls fall outside the measured interval."""

    def __init__(self, redis_pid, redis_port, admin_port):
        stats = redis_info(redis_port, "commandstats")
        self.scripts, self.script_usec = script_calls(stats)
        self.commands = all_calls(stats)
        self.acquire = acquire_calls(admin_port)
        self.ns = cpu_ns(redis_pid)
        self.ticks = cpu_ticks(redis_pid)
        self.at = time.monotonic()

    def delta(self, later):
        return {
            "seconds": later.at - self.at,
            "cpu_us": (later.ns - self.ns) / 1000,
            "tick_us": (later.ticks - self.ticks) * 1e6 / CLK_TCK,
            "scripts": later.scripts - self.scripts,
            "script_usec": later.script_usec - self.script_usec,
            "commands": later.commands - self.commands,
            "acquire": later.acquire - self.acquire,
        }


def measure(binary, label, counts, duration, warmup, limited=True, idle_for=None):
    """One build's runs on a private nginx, redis-server and tollgate:
    (idle samples before/after, [(keys, requests, delta)]). Without
    `limited`, no window applies: Redis sees only the background traffic
    (analytics flushes, readiness probes) of the same load."""
    work = tempfile.mkdtemp(prefix="tollgate-redis-cost-")
    procs = []

    def spawn(cmd, name):
        p = subprocess.Popen(cmd, stdout=open(f"{work}/{name}.log", "w"), stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        up_port, redis_port, port, admin = free_port(), free_port(), free_port(), free_port()
        with open(f"{work}/up.conf", "w") as f:
            f.write(f"""
worker_processes 1; daemon off; pid {work}/up.pid; error_log {work}/up.err;
events {{ worker_connections 4096; }}
http {{ access_log off; server {{ listen 127.0.0.1:{up_port}; location / {{ return 200 'ok'; }} }} }}
""")
        up = spawn(["nginx", "-c", f"{work}/up.conf", "-p", work], "up")
        redis = spawn(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no", "--dir", work], "redis")
        wait_port(up_port, proc=up, log=f"{work}/up.log")
        wait_port(redis_port, proc=redis, log=f"{work}/redis.log")
        windows = "{ requests: 1000000000, window: 60s }" if limited else ""
        with open(f"{work}/tollgate.yaml", "w") as f:
            f.write(f"""
server: {{ listen: ["127.0.0.1:{port}"], threads: 1, pid_file: "{work}/tg.pid", upgrade_sock: "{work}/tg.sock" }}
admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ level: warn, access_log: false }}
redis: {{ url: "redis://127.0.0.1:{redis_port}", key_prefix: "cost:" }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits: {{ sync: hybrid, claim_window: 1m, default: [{windows}] }}
upstreams: {{ backend: {{ peers: ["127.0.0.1:{up_port}"] }} }}
routes: [{{ name: api, path_prefix: /api/, upstream: backend }}]
""")
        tg = spawn([binary, "serve", "-c", f"{work}/tollgate.yaml"], "tollgate")
        wait_port(port, proc=tg, log=f"{work}/tollgate.log")
        wait_port(admin, proc=tg, log=f"{work}/tollgate.log")
        url = f"http://127.0.0.1:{port}/api/x"

        scripts = {}
        for n in counts:
            with open(f"{work}/tokens-{n}.txt", "w") as f:
                for i in range(n):
                    f.write(token(f"cost-{n}-{i}") + "\n")
            scripts[n] = f"{work}/keys-{n}.lua"
            with open(scripts[n], "w") as f:
                f.write(LUA % f"{work}/tokens-{n}.txt")

        def snap():
            return Snapshot(redis.pid, redis_port, admin)

        def idle_run(when):
            log(f"{label}: idle ({when}): {idle_for or duration} s without load")
            before = snap()
            time.sleep(idle_for or duration)
            d = before.delta(snap())
            log(f"{label}: idle ({when}): {d['cpu_us'] / d['seconds']:.0f} µs Redis CPU/s, "
                f"{d['scripts'] / d['seconds']:.2f} scripts/s, {d['commands'] / d['seconds']:.2f} commands/s")
            return d

        # Idle: after one short burst (Redis connections, scripts loaded) and
        # the analytics flush that follows it.
        wrk(url, 1, scripts[counts[0]])
        time.sleep(2.5)
        idle = [idle_run("before")]
        runs = []
        for n in counts:
            log(f"{label}: {n} keys: {warmup} s warm-up, {duration} s measured")
            if warmup:
                wrk(url, warmup, scripts[n])
            before = snap()
            requests = wrk(url, duration, scripts[n])
            d = before.delta(snap())
            runs.append((n, requests, d))
            log(f"{label}: {n} keys: {requests / duration:.0f} requests/s, Redis CPU {d['cpu_us'] / requests:.4f} µs/request "
                f"gross; {d['acquire']:.0f} lease calls, {d['scripts']:.0f} scripts")
        time.sleep(1.5)  # the last analytics flush of the load
        idle.append(idle_run("after"))
        if tg.poll() is not None or redis.poll() is not None:
            raise SystemExit("tollgate or redis-server exited during the run")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)

    return idle, runs


def main():
    ap = argparse.ArgumentParser(description="Redis cost per request through tollgate")
    ap.add_argument("--bin", default="target/release/tollgate")
    ap.add_argument("--keys", default="1,100,1000", help="comma-separated key counts")
    ap.add_argument("--duration", type=int, default=None, help="measured seconds per run (default 10, --quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="seconds before each run (default 3, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="3 s runs after 1 s warm-ups (under a minute)")
    ap.add_argument("--idle", type=int, default=None, help="seconds of each idle sample (default: --duration)")
    ap.add_argument("--out", default="bench/results/redis_cost.md")
    ap.add_argument("--baseline", default=os.environ.get("TOLLGATE_BASELINE_BIN"),
                    help="a second binary measured the same way in the same run (default: $TOLLGATE_BASELINE_BIN)")
    ap.add_argument("--no-control", action="store_true",
                    help="skip the run with no limits (background traffic alone)")
    ap.add_argument("--rounds", type=int, default=1, help="measure every build this many times, alternating the order")
    args = ap.parse_args()
    duration = args.duration or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    try:
        counts = [int(n) for n in args.keys.split(",")]
    except ValueError:
        raise SystemExit(f"--keys: expected numbers like 1,100,1000, got {args.keys!r}")
    if not counts or min(counts) < 1:
        raise SystemExit("--keys: every count must be at least 1")
    binary = os.path.abspath(args.bin)
    require_binary(binary, "cargo build --release --bin tollgate")
    require(("nginx", "wrk", "redis-server"), "bench/run.sh installs nginx and wrk")
    if not os.path.exists(f"/proc/{os.getpid()}/schedstat"):
        raise SystemExit("/proc/PID/schedstat is missing (kernel without CONFIG_SCHED_INFO): no ns CPU times")
    # Ctrl-C, SIGTERM and SIGHUP unwind through the finally that stops every
    # process (SIGINT explicitly: a shell starts background jobs ignoring it).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))

    builds = []
    if args.baseline:
        baseline = os.path.abspath(args.baseline)
        if not os.access(baseline, os.X_OK):
            raise SystemExit(f"--baseline {baseline}: not an executable")
        builds.append(("baseline", baseline))
    builds.append(("this build", binary))
    # Each build on its own fresh redis-server, nginx and tollgate, one after
    # the other in the same run; --rounds alternates the order.
    results = {label: [] for label, _ in builds}
    for r in range(args.rounds):
        order = builds if r % 2 == 0 else builds[::-1]
        for label, path in order:
            log(f"round {r + 1}/{args.rounds}: {label} ({path})")
            results[label].append(measure(path, label, counts, duration, warmup, idle_for=args.idle))

    # The same load with no window: analytics and probes only, to split the
    # lease cost from the background traffic that every build shares.
    if not args.no_control:
        log("control: this build with no limits (analytics and probes only)")
        results[CONTROL] = [measure(binary, CONTROL, counts, duration, warmup, limited=False,
                                       idle_for=args.idle)]
        builds.append((CONTROL, binary))

    def per_s(field, runs):
        return sum(d[field] for d in runs) / sum(d["seconds"] for d in runs)

    def rows_of(label):
        rows = []
        for idle, runs in results[label]:
            for n, requests, d in runs:
                rows.append({
                    "keys": n,
                    "rps": requests / duration,
                    "gross": d["cpu_us"] / requests,
                    "net": (d["cpu_us"] - per_s("cpu_us", idle) * d["seconds"]) / requests,
                    "noise": abs(per_s("cpu_us", idle[:1]) - per_s("cpu_us", idle[1:])) / 2 * d["seconds"] / requests,
                    "ticks": d["tick_us"] / requests,
                    "acquire": d["acquire"] / requests,
                    "scripts": (d["scripts"] - per_s("scripts", idle) * d["seconds"]) / requests,
                    "us_per_script": f"{d['script_usec'] / d['scripts']:.1f}" if d["scripts"] else "–",
                })
        return rows

    control = {r["keys"]: r for r in rows_of(CONTROL)} if CONTROL in results else {}

    def lease_only(r):
        c = control.get(r["keys"])
        if c is None:
            return "–"
        return f"{r['net'] - c['net']:.4f} ± {r['noise'] + c['noise']:.4f}"

    all_idle = [d for label in results for idle, _ in results[label] for d in idle]
    lines = [
        f"Run on {time.strftime('%Y-%m-%d')}{' (--quick)' if args.quick else ''}: one tollgate "
        f"(threads 1, hybrid, every key 10^9 per 60 s), wrk -t1 -c{CONNECTIONS} round robin over the keys, "
        f"{warmup} s warm-up, {duration} s measured; {' and '.join(l for l, _ in builds)} measured one "
        f"after the other in this run ({args.rounds} round{'s' if args.rounds > 1 else ''}, each on a fresh "
        f"redis-server). Redis CPU: on-CPU time of redis-server "
        f"(/proc/PID/task/*/schedstat); net = minus that build's mean idle rate "
        f"(around {per_s('cpu_us', all_idle):.0f} µs/s) times the run's length; "
        f"scripts at Redis = EVAL/EVALSHA (leases, analytics, charges), net of idle.",
        "",
        "| build | keys | requests/s | Redis CPU µs/request, gross | net of idle | net of idle and of the control "
        "| lease scripts/request (tollgate acquire) "
        "| scripts/request at Redis (net) | µs per script | utime+stime µs/request (10 ms ticks) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, _ in builds:
        for idle, _ in results[label]:
            idle_script_us = (f"{sum(d['script_usec'] for d in idle) / sum(d['scripts'] for d in idle):.1f}"
                              if sum(d["scripts"] for d in idle) else "–")
            both = lambda field, fmt: " / ".join(format(per_s(field, [d]), fmt) for d in idle)
            lines.append(
                f"| {label} | idle, no load (before / after, {args.idle or duration} s each) | 0 | {both('cpu_us', '.0f')} µs/s | – | – "
                f"| {both('acquire', '.2f')} /s | {both('scripts', '.2f')} /s ({both('commands', '.1f')} commands/s) "
                f"| {idle_script_us} | {both('tick_us', '.0f')} µs/s |")
        for r in sorted(rows_of(label), key=lambda r: r["keys"]):
            lines.append(f"| {label} | {r['keys']} | {r['rps']:.0f} | {r['gross']:.4f} | {r['net']:.4f} ± {r['noise']:.4f} "
                         f"| {lease_only(r)} "
                         f"| {r['acquire']:.5f} "
                         f"| {r['scripts']:.5f} | {r['us_per_script']} | {r['ticks']:.3f} |")
    lines += ["", "| target | build | net Redis CPU µs/request | met | net of the control too | met |",
              "| --- | --- | ---: | --- | ---: | --- |"]
    for keys, goal in ((1000, 0.10), (1000, 0.05), (1, 0.03)):
        target = f"≤ {goal:.2f} µs/request at {keys:,} key{'s' if keys > 1 else ''}"
        for label, _ in builds:
            if label == CONTROL:
                continue
            found = [r for r in rows_of(label) if r["keys"] == keys]
            if not found:
                lines.append(f"| {target} | {label} | not measured | - | - | - |")
                continue
            # The worst round counts.
            r = max(found, key=lambda r: r["net"])
            verdict = lambda net, noise: ("yes" if net + noise <= goal else "no" if net - noise > goal
                                          else "unclear (within idle noise)")
            net, noise = r["net"], r["noise"]
            c = control.get(keys)
            if c is None:
                lease, lease_met = "–", "–"
            else:
                lease = f"{net - c['net']:.4f} ± {noise + c['noise']:.4f}"
                lease_met = verdict(net - c["net"], noise + c["noise"])
            lines.append(f"| {target} | {label} | {net:.4f} ± {noise:.4f} | {verdict(net, noise)} "
                         f"| {lease} | {lease_met} |")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)
    log(f"written to {args.out}")


if __name__ == "__main__":
    main()
