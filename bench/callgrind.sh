#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: repeatable on a
# noisy machine, where requests/s and CPU time are not. Counts the proxy
# process only (user space), over a fixed number of requests after a warm-up:
#   bare Pingora (no logic), tollgate passthrough, tollgate full path (hybrid).
#   bench/callgrind.sh [REQUESTS]     default 20000; prints a markdown table
#   TOLLGATE_BIN=... BARE_BIN=... bench/callgrind.sh   measure given builds
#   (e.g. an older commit's, for a before/after comparison) instead of building
# Profiles are kept as bench/results/callgrind/NAME.callgrind for
# callgrind_annotate --inclusive=yes.
set -euo pipefail
cd "$(dirname "$0")/.."
# PyJWT comes from the test environment (scripts/setup.sh test makes .venv).
PATH="$PWD/.venv/bin:$PATH"
requests=${1:-20000}
for tool in valgrind callgrind_control nginx redis-server oha python3; do
  command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is required (bench/run.sh installs nginx and oha)" >&2; exit 1; }
done
tollgate_bin=${TOLLGATE_BIN:-target/release/tollgate}
bare_bin=${BARE_BIN:-target/release/examples/bare_pingora}
if [ -z "${TOLLGATE_BIN:-}" ] || [ -z "${BARE_BIN:-}" ]; then
  cargo build --release --quiet --bin tollgate --example bare_pingora
fi
out=bench/results/callgrind
mkdir -p "$out"
rm -f "$out"/*.out* "$out"/*.callgrind
work=$(mktemp -d /tmp/tollgate-callgrind-XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # URL: poll until it answers (valgrind starts slowly)
  for _ in $(seq 300); do curl -s -o /dev/null -m 1 "$1" && return 0; sleep 0.2; done
  echo "callgrind.sh: $1 never answered" >&2; exit 1
}

up=$(free_port); redis=$(free_port); port=$(free_port); admin=$(free_port)
cat > "$work/up.conf" <<EOF
worker_processes 1; daemon off; pid $work/up.pid; error_log $work/up.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:$up; location / { return 200 'ok'; } } }
EOF
nginx -c "$work/up.conf" -p "$work" & pids+=($!)
redis-server --port "$redis" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null & pids+=($!)
secret=bench-callgrind-secret-0123456789abcdef
cat > "$work/tollgate.yaml" <<EOF
server: { listen: ["127.0.0.1:$port"], threads: 1, pid_file: "$work/tg.pid", upgrade_sock: "$work/tg.sock" }
admin: { listen: "127.0.0.1:$admin" }
log: { level: warn, access_log: false }
redis: { url: "redis://127.0.0.1:$redis" }
auth: { jwt: { algorithms: [HS256], secret: "$secret" } }
limits: { sync: hybrid, claim_window: 1m, default: [{ requests: 1000000000, window: 1m }] }
upstreams: { backend: { peers: ["127.0.0.1:$up"] } }
routes:
  - { name: pass, path_prefix: /pass/, upstream: backend, auth: none }
  - { name: api, path_prefix: /api/, upstream: backend }
EOF
token=$(python3 -c "
import jwt, time
print(jwt.encode({'api_key': 'far', 'allowed_routes': ['/api/*'], 'exp': int(time.time()) + 7200}, '$secret', algorithm='HS256'))")
wait_http "http://127.0.0.1:$up/"

# measure NAME URL [oha args...]: instructions per request of the process under valgrind
measure() {
  local name=$1 url=$2 vpid total
  shift 2
  oha -n 2000 -c 8 --no-tui "$@" "$url" >/dev/null
  vpid=${pids[-1]}
  callgrind_control -z "$vpid" >/dev/null 2>&1
  oha -n "$requests" -c 8 --no-tui "$@" "$url" > "$work/$name.oha"
  grep -q "\[200\] $requests responses" "$work/$name.oha" || { echo "callgrind.sh: $name: not every answer was 200" >&2; cat "$work/$name.oha" >&2; exit 1; }
  callgrind_control --dump="$name" "$vpid" >/dev/null 2>&1
  # Each dump is a new numbered file next to the --callgrind-out-file.
  local dump
  dump=$(ls -t "$out"/*.out.* | head -1)
  mv "$dump" "$out/$name.callgrind"
  total=$(awk '/^summary:/ {print $2}' "$out/$name.callgrind")
  echo "$name $((total / requests))" >> "$work/results"
}

valgrind --tool=callgrind --callgrind-out-file="$out/bare.out" \
  "$bare_bin" "127.0.0.1:$port" "127.0.0.1:$up" >"$work/bare.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$port/x"
measure bare "http://127.0.0.1:$port/x"
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'
rm -f "$out"/bare.out

valgrind --tool=callgrind --callgrind-out-file="$out/tollgate.out" \
  "$tollgate_bin" serve -c "$work/tollgate.yaml" >"$work/tollgate.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$port/pass/x"
measure passthrough "http://127.0.0.1:$port/pass/x"
measure full "http://127.0.0.1:$port/api/x" -H "Authorization: Bearer $token"
rm -f "$out"/tollgate.out

echo "Instructions per request in the proxy process (callgrind, $requests requests, oha -c 8, $(date +%F)):"
echo
echo "| proxy | instructions/request | vs bare Pingora |"
echo "| --- | ---: | ---: |"
bare=$(awk '$1 == "bare" {print $2}' "$work/results")
while read -r name n; do
  python3 -c "print(f'| $name | {$n:,} | {$n / $bare:.2f}× |')"
done < "$work/results"
