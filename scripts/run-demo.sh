#!/usr/bin/env bash
# Demo: the echo upstream on 127.0.0.1:8081 and tollgate on :8080 (admin :9090).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/tollgate
[ -x "$bin" ] || cargo build --release
"$bin" echo --listen 127.0.0.1:8081 &
echo_pid=$!
trap 'kill $echo_pid 2>/dev/null || true' EXIT
cat <<MSG
tollgate demo: try
  curl -i http://127.0.0.1:8080/public/hello
  curl -s http://127.0.0.1:9090/metrics | grep tollgate_requests_total
MSG
"$bin" serve -c conf/tollgate.yaml
