"""What the bench scripts share: ports, processes (nginx, redis-server,
tollgate) in a throw-away directory, CPU time from /proc, tokens, the load
generators' output and markdown tables.

Imported by the scripts in bench/ (run them as `python3 bench/<script>.py`:
Python puts bench/ on the path).
"""
import http.client
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jwt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def release_binary(name, example=False):
    """Where `cargo build --release` puts `name`: under $CARGO_TARGET_DIR when
    set (a relative one from the current directory, as cargo reads it), else
    the repository's target/."""
    target = os.path.abspath(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"))
    return os.path.join(target, "release", "examples" if example else "", name)


def require(tools, hint):
    for tool in tools:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is required ({hint})")


def require_binary(path, hint):
    if not os.access(path, os.X_OK):
        raise SystemExit(f"{path} not found: {hint}")


def exit_on_signals():
    """Ctrl-C, SIGTERM and SIGHUP unwind through the `finally`/`with` that
    stops every process (SIGINT explicitly: a shell starts background jobs
    ignoring it)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30, proc=None, log=None):
    """Waits for a listener; fails at once, with the log, if `proc` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                tail = open(log).read()[-2000:] if log else ""
                raise SystemExit(f"{proc.args[0]} exited with {proc.returncode} before opening port {port}:\n{tail}")
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


class Workspace:
    """A temporary directory and the processes started in it (each logging
    to <name>.log there). Leaving the `with` block stops every process still
    running, with its own stop signal, then removes the directory."""

    def __init__(self, prefix):
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()

    def path(self, name):
        return f"{self.dir}/{name}"

    def log(self, name):
        return self.path(f"{name}.log")

    def write(self, name, text):
        with open(self.path(name), "w") as f:
            f.write(text)
        return self.path(name)

    def spawn(self, cmd, name, stop=signal.SIGTERM):
        p = subprocess.Popen(cmd, stdout=open(self.log(name), "w"), stderr=subprocess.STDOUT)
        self.procs.append((p, stop))
        return p

    def wait(self, proc, name, *ports):
        """Waits for `ports` of the process spawned as `name`."""
        for port in ports:
            wait_port(port, proc=proc, log=self.log(name))

    def nginx(self, name, http_block, error_level=""):
        """One-worker nginx in the foreground; `http_block` is the body of
        its `http {}` section (access log off already)."""
        conf = self.write(f"{name}.conf", f"""worker_processes 1;
daemon off;
pid {self.dir}/{name}.pid;
error_log {self.dir}/{name}.error.log {error_level};
events {{ worker_connections 4096; }}
http {{
  access_log off;
{http_block}
}}
""")
        return self.spawn(["nginx", "-c", conf, "-p", self.dir], name)

    def redis(self, port):
        """A private redis-server without persistence, waited for."""
        p = self.spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", self.dir], "redis")
        self.wait(p, "redis", port)
        return p

    def tollgate(self, binary, name, config, ports, stop=signal.SIGTERM):
        """`tollgate serve` with `config` (YAML text), waited for on `ports`."""
        conf = self.write(f"{name}.yaml", config)
        p = self.spawn([binary, "serve", "-c", conf], name, stop=stop)
        self.wait(p, name, *ports)
        return p

    def close(self):
        for p, stop in self.procs:
            if p.poll() is None:
                p.send_signal(stop)
        for p, _ in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def cpu_ticks(pids):
    """utime + stime of `pids`, in clock ticks (CLK_TCK a second)."""
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


def client_cpu():
    """CPU seconds of every child waited for so far (the load generators)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        return ""


def token(secret, api_key, routes=("/api/*",), ttl=7200, **claims):
    """An HS256 JWT as tollgate's configs in bench/ expect it."""
    claims = {"api_key": api_key, "allowed_routes": list(routes), "exp": int(time.time()) + ttl, **claims}
    return jwt.encode(claims, secret, algorithm="HS256")


def http_status(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def metric(admin_port, series):
    """The value of one series (name and labels, as exported) on /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def run_tool(cmd, timeout):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return res.stdout


def parse_latency(value):
    """A wrk or h2load duration ("812.00us", "1.2ms", "3s") in ms."""
    units = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
    for unit in ("us", "ms", "s"):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * units[unit]
    return float(value)


def wrk(url, duration, connections, headers=(), script=None):
    """One wrk -t1 run: requests/s, p50/p99 ms, requests, non-2xx answers
    and socket errors."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script]
    out = run_tool(cmd + [url], duration + 60)
    res = {"rps": 0.0, "p50": 0.0, "p99": 0.0, "requests": 0, "non2xx": 0, "socket_errors": 0}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            res["rps"] = float(parts[1])
        # "50.000%" with wrk's HdrHistogram, "50%" without.
        elif len(parts) == 2 and parts[0] in ("50.000%", "50%"):
            res["p50"] = parse_latency(parts[1])
        elif len(parts) == 2 and parts[0] in ("99.000%", "99%"):
            res["p99"] = parse_latency(parts[1])
        elif "requests in" in line:
            res["requests"] = int(parts[0])
        elif line.strip().startswith("Non-2xx"):
            res["non2xx"] = int(parts[-1])
        elif line.strip().startswith("Socket errors:"):
            res["socket_errors"] = sum(int(n) for n in re.findall(r"\d+", line))
    return res


def table(headers, rows, align):
    """A markdown table: `align` has one letter a column, l or r."""
    out = ["| " + " | ".join(headers) + " |",
           "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def cpu_per_request(pids, run):
    """Runs `run()`, a load generator returning a dict with "requests" (or
    None), and adds "cpu_us": CPU µs that `pids` spent per request meanwhile."""
    before = cpu_ticks(pids)
    res = run()
    if res is not None:
        res["cpu_us"] = (cpu_ticks(pids) - before) * 1e6 / CLK_TCK / max(res["requests"], 1)
    return res
