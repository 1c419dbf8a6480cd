#!/usr/bin/env python3
"""Limit accuracy under Redis faults, window by window (issue 26).

Starts a private redis-server, a counting upstream and 3 tollgate instances
(threads 1, one Redis, `limits.default: [{requests: LIMIT, window: W}]`,
`sync: hybrid`, `redis.timeout: 20ms`), then offers one key far more than
its limit (by default 1,500 requests/s spread over the instances from
keep-alive clients) for consecutive windows, and injects one fault per
window:

  calm          nothing;
  stall         `DEBUG SLEEP 0.08` every 400 ms (Redis stalled 80 ms) from a
                side client, the whole window;
  kill-start    Redis killed (SIGKILL) at the window's start, restarted
                empty 30% of the window later (3 s of 10 s);
  kill-mid      Redis killed at 50% of the window, restarted empty at 80%;
  slow-once     one `DEBUG SLEEP 0.1` (past the 20 ms timeout) at 30%;
  sighup-storm  SIGHUP to every instance every 100 ms, the whole window.

Windows are aligned on Redis time (multiples of W since the epoch, as the
limiter counts them); the first window is a warm-up and not reported. What
reached the upstream is counted per window by its arrival time (converted to
Redis time), and reported next to the limit and the bound README states for
that fault (the BOUNDS dict below; None prints "–"). The clients' own counts
of answers (200 / 429 / 5xx) by send time are shown beside it, and the Redis
errors the fleet counted in the window (tollgate_redis_errors_total).

Needs a release build, redis-server (DEBUG enabled for local clients by
this script) and PyJWT. Markdown on stdout, progress on stderr.

usage: bench/faults.py [--bin target/release/tollgate] [--algorithm fixed_window|sliding_window|gcra]
                       [--on-failure local|closed|open] [--window 10] [--limit 300] [--rate 1500]
                       [--faults calm,stall,...] [--rounds 1] [--quick] [--logs DIR]
  --quick   2 s windows, limit 60 (a CI smoke of about 20 s; asserts nothing about figures)
"""
import argparse
import http.client
import http.server
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time

from common import (Workspace, exit_on_signals, free_port, release_binary, require, require_binary,
                    table, token, wait_port)

SECRET = "bench-faults-secret-0123456789abcdef"
KEY = "faults-key"
REDIS_TIMEOUT = "20ms"

# The bound README states for each fault (admitted per window minus the
# limit, or a formula as text); None prints "–". Filled from README's
# "Distributed limits" table.
BOUNDS = {
    "calm": None,
    "stall": None,
    "kill-start": None,
    "kill-mid": None,
    "slow-once": None,
    "sighup-storm": None,
}
FAULTS = list(BOUNDS)


def log(msg):
    print(f"faults: {msg}", file=sys.stderr, flush=True)


class Resp:
    """A minimal Redis client (RESP over one socket) for TIME and DEBUG SLEEP."""

    def __init__(self, port, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def close(self):
        self.file.close()
        self.sock.close()

    def cmd(self, *args):
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def _reply(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            return data[:-2].decode()
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply {line!r}")


def redis_time(port):
    """Redis' clock minus this machine's, in seconds (TIME, half a round trip in)."""
    r = Resp(port)
    try:
        before = time.time()
        secs, micros = r.cmd("TIME")
        after = time.time()
    finally:
        r.close()
    return int(secs) + int(micros) / 1e6 - (before + after) / 2


# --- the counting upstream (a process of its own) ---------------------------

def upstream_main(port, ready):
    stamps = []
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self):
            now = time.time()
            if self.path == "/__stamps":
                with lock:
                    body = json.dumps(stamps).encode()
            else:
                with lock:
                    stamps.append(now)
                body = b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    ready.set()
    server.serve_forever()


def upstream_stamps(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/__stamps")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


# --- the clients (one process per instance) ---------------------------------

def clients_main(port, tok, rate, threads, stop, results):
    """`threads` keep-alive clients paced to `rate` requests/s in all; puts
    [(send time, status)] in `results` once `stop` is set."""
    interval = threads / rate
    out = []
    lock = threading.Lock()

    def run():
        conn = None
        mine = []
        next_at = time.time()
        headers = {"Authorization": f"Bearer {tok}"}
        while not stop.is_set():
            now = time.time()
            if next_at > now:
                time.sleep(next_at - now)
            # Behind by more than 100 ms: do not burst to catch up.
            next_at = max(next_at + interval, time.time() - 0.1)
            sent = time.time()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/api/x", headers=headers)
                r = conn.getresponse()
                r.read()
                status = r.status
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                status = 0
                if conn is not None:
                    conn.close()
                conn = None
            mine.append((sent, status))
        with lock:
            out.extend(mine)

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    results.put(out)


# --- faults -------------------------------------------------------------------

class Fleet:
    """The redis-server (killed and restarted on its port) and the instances."""

    def __init__(self, work, redis_port):
        self.work = work
        self.redis_port = redis_port
        self.redis = None
        self.instances = []  # (process, port, admin port)

    def start_redis(self):
        self.redis = self.work.spawn(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.work.dir, "--enable-debug-command", "local"],
            "redis")
        self.work.wait(self.redis, "redis", self.redis_port)

    def kill_redis(self):
        self.redis.kill()
        self.redis.wait()

    def sighup_all(self):
        for p, _, _ in self.instances:
            p.send_signal(signal.SIGHUP)

    def redis_errors(self):
        total = 0.0
        for _, _, admin in self.instances:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode()
                conn.close()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("tollgate_redis_errors_total "):
                    total += float(line.split()[-1])
        return total


def sleep_until(t):
    while True:
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def stalls(fleet, start, end, every=0.4, seconds=0.08):
    """DEBUG SLEEP `seconds` every `every` s from a side client."""
    r = Resp(fleet.redis_port)
    try:
        at = start
        while at < end - seconds:
            sleep_until(at)
            r.cmd("DEBUG", "SLEEP", seconds)
            at += every
    finally:
        r.close()


def run_fault(fault, fleet, start, window):
    """Injects `fault` into the window [start, start + window) (local clock)."""
    end = start + window
    if fault == "calm":
        return
    if fault == "stall":
        stalls(fleet, start, end)
    elif fault == "kill-start":
        sleep_until(start)
        fleet.kill_redis()
        sleep_until(start + 0.3 * window)
        fleet.start_redis()
    elif fault == "kill-mid":
        sleep_until(start + 0.5 * window)
        fleet.kill_redis()
        sleep_until(start + 0.8 * window)
        fleet.start_redis()
    elif fault == "slow-once":
        sleep_until(start + 0.3 * window)
        r = Resp(fleet.redis_port)
        try:
            r.cmd("DEBUG", "SLEEP", 0.1)
        finally:
            r.close()
    elif fault == "sighup-storm":
        at = start
        while at < end:
            sleep_until(at)
            fleet.sighup_all()
            at += 0.1
    else:
        raise SystemExit(f"unknown fault {fault!r}")


def config(work, name, port, admin, redis_port, upstream_port, algorithm, on_failure, limit, window):
    return f"""
server: {{ listen: ["127.0.0.1:{port}"], threads: 1, grace_period: 1s, pid_file: "{work.dir}/{name}.pid", upgrade_sock: "{work.dir}/{name}.sock" }}
admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ level: warn, access_log: false }}
redis: {{ url: "redis://127.0.0.1:{redis_port}", timeout: {REDIS_TIMEOUT}, on_failure: {on_failure}, key_prefix: "faults:" }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{SECRET}" }} }}
limits:
  algorithm: {algorithm}
  sync: hybrid
  default: [{{ requests: {limit}, window: {window}s }}]
upstreams: {{ backend: {{ peers: ["127.0.0.1:{upstream_port}"] }} }}
routes: [{{ name: api, path_prefix: /api/, upstream: backend }}]
"""


def main():
    ap = argparse.ArgumentParser(description="limit accuracy under Redis faults, per window")
    ap.add_argument("--bin", default=release_binary("tollgate"))
    ap.add_argument("--algorithm", default="fixed_window", choices=["fixed_window", "sliding_window", "gcra"])
    ap.add_argument("--on-failure", default="local", choices=["local", "closed", "open"])
    ap.add_argument("--window", type=int, default=None, help="window in whole seconds (default 10, --quick 2)")
    ap.add_argument("--limit", type=int, default=None, help="requests per window (default 300, --quick 60)")
    ap.add_argument("--rate", type=float, default=1500, help="requests/s offered in all")
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4, help="keep-alive clients per instance")
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, in order")
    ap.add_argument("--rounds", type=int, default=1, help="run the list of faults this many times")
    ap.add_argument("--quick", action="store_true", help="2 s windows, limit 60: a CI smoke")
    ap.add_argument("--logs", help="copy every process's log into this directory at the end")
    args = ap.parse_args()
    window = args.window or (2 if args.quick else 10)
    limit = args.limit or (60 if args.quick else 300)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    for f in faults:
        if f not in BOUNDS:
            raise SystemExit(f"--faults: unknown fault {f!r} (one of {', '.join(FAULTS)})")
    if window < 1 or limit < 1 or args.rate <= 0 or args.instances < 1 or args.clients < 1:
        raise SystemExit("--window, --limit, --rate, --instances and --clients must be positive")
    binary = os.path.abspath(args.bin)
    require_binary(binary, "cargo build --release first")
    require(["redis-server"], "apt-get install redis-server")
    exit_on_signals()
    schedule = faults * args.rounds

    ctx = multiprocessing.get_context("fork")
    with Workspace("tollgate-faults-") as work:
        upstream_port = free_port()
        ready = ctx.Event()
        upstream = ctx.Process(target=upstream_main, args=(upstream_port, ready), daemon=True)
        upstream.start()
        ready.wait(10)
        wait_port(upstream_port)

        fleet = Fleet(work, free_port())
        fleet.start_redis()
        for i in range(args.instances):
            port, admin = free_port(), free_port()
            name = f"t{i}"
            p = work.tollgate(binary, name, config(work, name, port, admin, fleet.redis_port, upstream_port,
                                                   args.algorithm, args.on_failure, limit, window),
                              (port, admin))
            fleet.instances.append((p, port, admin))
        offset = redis_time(fleet.redis_port)
        log(f"redis clock - local clock: {offset * 1000:.1f} ms; {args.instances} instances, "
            f"limit {limit} per {window} s, {args.algorithm}, on_failure {args.on_failure}, "
            f"{args.rate:.0f} requests/s offered")

        tok = token(SECRET, KEY, ttl=3600 + len(schedule) * window * 2)
        stop = ctx.Event()
        results = ctx.Queue()
        per_instance = args.rate / args.instances
        loaders = [ctx.Process(target=clients_main, args=(port, tok, per_instance, args.clients, stop, results))
                   for _, port, _ in fleet.instances]
        for l in loaders:
            l.start()

        # The current window is a warm-up (leases taken, load steady); faults
        # start with the next boundary.
        now_redis = time.time() + offset
        first = int(now_redis // window) + 1
        windows = []  # (index, fault, local start)
        errors = []
        for n, fault in enumerate(schedule):
            index = first + n
            start = index * window - offset
            if n == 0:
                sleep_until(start)
                errors_before = fleet.redis_errors()
            log(f"window {index * window} (+{n}): {fault}")
            injector = threading.Thread(target=run_fault, args=(fault, fleet, start, window))
            injector.start()
            sleep_until(start + window)
            injector.join()
            errors_now = fleet.redis_errors()
            errors.append(errors_now - errors_before)
            errors_before = errors_now
            windows.append((index, fault, start))
        stop.set()
        sent = []
        for _ in loaders:
            sent.extend(results.get(timeout=60))
        for l in loaders:
            l.join(timeout=30)
        stamps = upstream_stamps(upstream_port)
        upstream.terminate()
        if args.logs:
            os.makedirs(args.logs, exist_ok=True)
            for name in os.listdir(work.dir):
                if name.endswith(".log"):
                    shutil.copy(work.path(name), args.logs)

    admitted = {}
    for t in stamps:
        i = int((t + offset) // window)
        admitted[i] = admitted.get(i, 0) + 1
    answers = {}
    for t, status in sent:
        i = int((t + offset) // window)
        a = answers.setdefault(i, {"200": 0, "429": 0, "5xx": 0, "other": 0})
        key = "200" if status == 200 else "429" if status == 429 else "5xx" if 500 <= status < 600 else "other"
        a[key] += 1

    rows = []
    for (index, fault, _), errs in zip(windows, errors):
        got = admitted.get(index, 0)
        a = answers.get(index, {"200": 0, "429": 0, "5xx": 0, "other": 0})
        bound = BOUNDS.get(fault)
        rows.append((fault, index * window, got, limit, f"{got / limit:.2f}", "–" if bound is None else bound,
                     f"{a['200']} / {a['429']} / {a['5xx']} / {a['other']}", f"{errs:.0f}"))
    print(f"{args.instances} instances, {args.algorithm}, sync hybrid, on_failure {args.on_failure}, "
          f"limit {limit} per {window} s, {args.rate:.0f} requests/s offered, redis.timeout {REDIS_TIMEOUT}\n")
    print("\n".join(table(
        ["fault", "window (Redis time)", "admitted (upstream)", "limit", "admitted / limit", "bound",
         "client answers 200 / 429 / 5xx / failed", "Redis errors (fleet)"],
        rows, "lrrrrrrr")))


if __name__ == "__main__":
    main()
