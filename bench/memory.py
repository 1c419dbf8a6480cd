#!/usr/bin/env python3
"""Memory per limited key, and how much of it comes back once the windows end.

Starts an nginx `return 200` upstream, a private redis-server and one
tollgate (threads 1, sync: hybrid, `limits.default: [{requests: 1000000,
window: 20s}]`; the tokens carry no rate_limit claim, so every key gets that
window, far from its limit; `auth.jwt.cache_size` stays at its default), then:
  warm   wrk -c32 for 2 s with one key, then tollgate's VmRSS (/proc/PID/status);
  load   wrk -t1 -c32 drives --keys distinct tokens (api_key key-0..key-N-1)
         round robin until at least 2x keys answers came back, all 200 and
         without socket errors: every key was used at least once (wrk's Lua
         script cycles a token table and stops a pass at its quota; a pass
         that ends early is continued from where it stopped). Checked against
         tollgate's own count of allowed decisions. VmRSS is sampled every
         100 ms: peak = the highest sample;
  after  waits until every window has ended (window + 5 s after the last
         request), sends a few requests with one fresh key (so a sweep that
         runs on the request path gets its chance), waits 3 s, reads VmRSS.
Also reports what held Redis for 5 ms or more during the load (Redis' own
latency monitor): a stall past `redis.timeout` fails the lease calls waiting
on it, and `on_failure: local` then counts a second's keys in-process.
Reports bytes per key = (peak - warm) / keys and the share given back =
(peak - after) / (peak - warm), against the targets (<= 256 bytes per key at
200,000 keys; >= 50% given back). Markdown on stdout and in
bench/results/memory.md; progress on stderr. Needs nginx, wrk, redis-server
and PyJWT.

usage: bench/memory.py [--bin target/release/tollgate] [--keys 200000] [--quick] [--redis-rt] [--no-redis]
  --quick   20,000 keys, 5 s windows: under a minute
"""
import argparse
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jwt

from common import free_port, require, require_binary, wait_port

SECRET = "bench-memory-secret-0123456789abcdef"
CONNECTIONS = 32


def log(msg):
    print(f"memory: {msg}", file=sys.stderr, flush=True)


def rss_bytes(pid):
    """VmRSS and VmHWM (the kernel's own peak) of a process, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, kib, _unit = line.split()
                values[name[:-1]] = int(kib) * 1024
    return values["VmRSS"], values["VmHWM"]


def token(api_key):
    claims = {"api_key": api_key, "allowed_routes": ["/api/*"], "exp": int(time.time()) + 7200}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def redis_stalls(redis_port):
    """Redis' own record of what held it for 5 ms or more: {event: (times, max ms)}."""
    out = subprocess.run(["redis-cli", "-p", str(redis_port), "LATENCY", "LATEST"],
                         capture_output=True, text=True, timeout=10).stdout
    fields = out.split()
    stalls = {}
    # Four fields per event: name, unix time of the latest, latest ms, max ms.
    for i in range(0, len(fields) - 3, 4):
        stalls[fields[i]] = (int(fields[i + 3]),)
    for event in stalls:
        hist = subprocess.run(["redis-cli", "-p", str(redis_port), "LATENCY", "HISTORY", event],
                              capture_output=True, text=True, timeout=10).stdout.split()
        stalls[event] = (len(hist) // 2, stalls[event][0])
    return stalls


def metrics(admin_port):
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def metric_sum(text, name, **labels):
    """Sum of every series of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        if series != name and not series.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def wrk(url, duration, script=None, script_args=(), headers=()):
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}s"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    if script_args:
        cmd += ["--", *map(str, script_args)]
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
            # Socket errors: connect 0, read 0, write 0, timeout 0
            errors = sum(int(x) for x in parts[3::2])
    return {"requests": total, "non2xx": non2xx, "errors": errors, "out": res.stdout}


# Round robin over a token file, from index args[1]; a pass stops taking
# answers at args[2] (wrk still runs out its -d, idle).
LUA = """
local tokens = {}
for line in io.lines("%s") do tokens[#tokens + 1] = line end
local i, quota, seen = 0, 0, 0
function init(args)
  i = tonumber(args[1]) or 0
  quota = tonumber(args[2]) or 0
end
function request()
  local t = tokens[i %% #tokens + 1]
  i = i + 1
  return wrk.format(nil, nil, {["Authorization"] = "Bearer " .. t})
end
function response(status)
  seen = seen + 1
  if quota > 0 and seen >= quota then wrk.thread:stop() end
end
"""


class RssSampler(threading.Thread):
    """Highest VmRSS seen while the load runs."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid)[0])
            except OSError:
                return
            self.stop.wait(0.1)


def main():
    ap = argparse.ArgumentParser(description="tollgate memory per limited key")
    ap.add_argument("--bin", default="target/release/tollgate")
    ap.add_argument("--keys", type=int, default=None, help="distinct keys (default 200000, --quick 20000)")
    ap.add_argument("--window", type=int, default=None, help="limit window in seconds (default 20, --quick 5)")
    ap.add_argument("--quick", action="store_true", help="20,000 keys, 5 s windows (under a minute)")
    ap.add_argument("--out", default="bench/results/memory.md")
    ap.add_argument("--redis-timeout", default=None,
                    help="redis.timeout (default: tollgate's, 20ms); a longer one keeps lease calls from timing "
                         "out behind large analytics flushes, so no key falls back to the local store")
    ap.add_argument("--redis-rt", action="store_true",
                    help="run redis-server at real-time priority (chrt -r 10; needs root), as if on a core of its "
                         "own: on a 2-core machine shared with wrk, nginx and tollgate it otherwise waits for "
                         "CPU longer than the 20 ms redis.timeout now and then")
    ap.add_argument("--no-redis", action="store_true",
                    help="no redis section: the limits are counted in the in-process store alone (what a key "
                         "costs there, e.g. while Redis is away with on_failure: local)")
    ap.add_argument("--no-limits", action="store_true",
                    help="diagnostic: no window at all, so no lease state (what every other part costs per key)")
    ap.add_argument("--cache-size", type=int, default=None, help="auth.jwt.cache_size (default: tollgate's)")
    args = ap.parse_args()
    keys = args.keys or (20_000 if args.quick else 200_000)
    window = args.window or (5 if args.quick else 20)
    if keys < 1:
        raise SystemExit("--keys must be at least 1")
    binary = os.path.abspath(args.bin)
    require_binary(binary, "cargo build --release --bin tollgate")
    require(("nginx", "wrk", "redis-server"), "bench/run.sh installs nginx and wrk")
    # Ctrl-C, SIGTERM and SIGHUP unwind through the finally that stops every
    # process (SIGINT explicitly: a shell starts background jobs ignoring it).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))

    work = tempfile.mkdtemp(prefix="tollgate-memory-")
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
        # Redis records every event that holds it for 5 ms or more (LATENCY LATEST at the end).
        rt = ["chrt", "-r", "10"] if args.redis_rt else []
        redis = spawn(rt + ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no", "--dir", work, "--latency-monitor-threshold", "5"], "redis")
        wait_port(up_port, proc=up, log=f"{work}/up.log")
        wait_port(redis_port, proc=redis, log=f"{work}/redis.log")
        timeout = f", timeout: {args.redis_timeout}" if args.redis_timeout else ""
        windows = "" if args.no_limits else f"{{ requests: 1000000, window: {window}s }}"
        cache = f", cache_size: {args.cache_size}" if args.cache_size is not None else ""
        redis_section = "" if args.no_redis else \
            f'redis: {{ url: "redis://127.0.0.1:{redis_port}", key_prefix: "mem:"{timeout} }}\n'

        with open(f"{work}/tollgate.yaml", "w") as f:
            f.write(f"""
server: {{ listen: ["127.0.0.1:{port}"], threads: 1, pid_file: "{work}/tg.pid", upgrade_sock: "{work}/tg.sock" }}
admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ level: warn, access_log: false }}
{redis_section}auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}"{cache} }} }}
limits: {{ sync: hybrid, claim_window: 1m, default: [{windows}] }}
upstreams: {{ backend: {{ peers: ["127.0.0.1:{up_port}"] }} }}
routes: [{{ name: api, path_prefix: /api/, upstream: backend }}]
""")
        tg = spawn([binary, "serve", "-c", f"{work}/tollgate.yaml"], "tollgate")
        wait_port(port, proc=tg, log=f"{work}/tollgate.log")
        wait_port(admin, proc=tg, log=f"{work}/tollgate.log")
        url = f"http://127.0.0.1:{port}/api/x"

        log(f"minting {keys} tokens")
        tokens_file = f"{work}/tokens.txt"
        with open(tokens_file, "w") as f:
            for i in range(keys):
                f.write(token(f"key-{i}") + "\n")
        script = f"{work}/keys.lua"
        with open(script, "w") as f:
            f.write(LUA % tokens_file)

        # Warm-up with one key: connections, buffers, pools, the runtime.
        warm_run = wrk(url, 2, headers=(f"Authorization: Bearer {token('warm-key')}",))
        if warm_run["requests"] == 0 or warm_run["non2xx"] or warm_run["errors"]:
            raise SystemExit(f"warm-up failed:\n{warm_run['out']}")
        time.sleep(1)
        warm, _ = rss_bytes(tg.pid)
        hot_rate = warm_run["requests"] / 2
        log(f"warm: RSS {warm / 2**20:.1f} MiB ({hot_rate:.0f} requests/s with one key)")

        allowed_before = metric_sum(metrics(admin), "tollgate_ratelimit_decisions_total", decision="allowed")
        acquire_before = metric_sum(metrics(admin), "tollgate_redis_calls_total", op="acquire")
        sampler = RssSampler(tg.pid)
        sampler.start()
        wanted, done, start, passes = 2 * keys, 0, 0, 0
        # New keys cost a cold token check and a lease each: guess half the
        # one-key rate for the first pass, then use what was measured.
        rate = max(hot_rate / 2, 1000)
        while done < wanted:
            passes += 1
            if passes > 20:
                raise SystemExit(f"only {done} of {wanted} answers after 20 passes")
            left = wanted - done
            duration = int(min(max(left / rate * 1.2 + 1, 2), 120))
            res = wrk(url, duration, script, (start, left))
            if res["non2xx"] or res["errors"]:
                raise SystemExit(f"pass {passes}: {res['non2xx']} non-2xx answers, {res['errors']} socket "
                                 f"errors: not every key is known to be used\n{res['out']}")
            done += res["requests"]
            start = (start + res["requests"]) % keys
            rate = max(res["requests"] / duration, 100)
            log(f"pass {passes}: {res['requests']} answers in {duration} s, {done}/{wanted}")
        last_request = time.time()
        sampler.stop.set()
        sampler.join()
        now_rss, hwm = rss_bytes(tg.pid)
        peak = max(sampler.peak, now_rss)
        text = metrics(admin)
        allowed = metric_sum(text, "tollgate_ratelimit_decisions_total", decision="allowed") - allowed_before
        acquires = metric_sum(text, "tollgate_redis_calls_total", op="acquire") - acquire_before
        # Each error starts a second of on_failure (local store by default).
        redis_errors = metric_sum(text, "tollgate_redis_errors_total")
        stalls = redis_stalls(redis_port)
        if allowed < wanted and not args.no_limits:
            raise SystemExit(f"tollgate counted {allowed:.0f} allowed decisions, expected at least {wanted}")
        log(f"peak: RSS {peak / 2**20:.1f} MiB (VmHWM {hwm / 2**20:.1f} MiB); tollgate allowed {allowed:.0f}, "
            f"{acquires:.0f} lease calls for {keys} keys")

        wait = window + 5
        log(f"waiting {wait} s for every window to end")
        time.sleep(max(0.0, last_request + wait - time.time()))
        fresh = token("fresh-key-after-the-windows")
        for _ in range(10):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/x", headers={"Authorization": f"Bearer {fresh}"})
            status = conn.getresponse().status
            conn.close()
            if status != 200:
                raise SystemExit(f"the fresh key got {status}, expected 200")
        time.sleep(3)
        after, _ = rss_bytes(tg.pid)
        if tg.poll() is not None:
            raise SystemExit("tollgate exited during the run")
        log(f"after: RSS {after / 2**20:.1f} MiB")
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

    grown = peak - warm
    per_key = grown / keys
    given_back = (peak - after) / grown if grown > 0 else 0.0
    mib = lambda b: f"{b / 2**20:.1f}"
    lines = [
        f"Run on {time.strftime('%Y-%m-%d')}{' (--quick)' if args.quick else ''}: one tollgate "
        f"(threads 1, hybrid, limit 1,000,000 per {window} s, default auth.jwt.cache_size), "
        f"wrk -t1 -c{CONNECTIONS} round robin over {keys} keys, {done} answers (every one 200), "
        f"{acquires:.0f} lease calls, {redis_errors:.0f} Redis errors (each sends the next second to the "
        f"local store){'' if not args.redis_timeout else f', redis.timeout {args.redis_timeout}'}"
        f"{', redis-server at real-time priority' if args.redis_rt else ''}"
        f"{', NO REDIS (limits in the in-process store)' if args.no_redis else ''}"
        f", Redis held for 5 ms or more: "
        f"{', '.join(f'{e} in {n} s (max {ms} ms)' for e, (n, ms) in sorted(stalls.items())) or 'never'}"
        f"{'' if args.cache_size is None else f', auth.jwt.cache_size {args.cache_size}'}"
        f"{', NO LIMITS (diagnostic: no lease state)' if args.no_limits else ''}; RSS = VmRSS; after = {wait} s past the last request, "
        f"10 requests of a fresh key, 3 s.",
        "",
        "| keys | warm MiB | peak MiB | bytes/key | after MiB | share given back |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {keys} | {mib(warm)} | {mib(peak)} | {per_key:.0f} | {mib(after)} | {given_back:.0%} |",
        "",
        "| target | value | met |",
        "| --- | ---: | --- |",
        f"| ≤ 256 bytes per key at 200,000 keys{'' if keys == 200_000 else f' (measured at {keys} keys)'} "
        f"| {per_key:.0f} | {'yes' if per_key <= 256 else 'no'} |",
        f"| RSS given back ≥ 50% | {given_back:.0%} | {'yes' if given_back >= 0.5 else 'no'} |",
    ]
    report = "\n".join(lines) + "\n"
    print(report, end="")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)
    log(f"written to {args.out}")


if __name__ == "__main__":
    main()
