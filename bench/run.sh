#!/usr/bin/env bash
# Whole-system benchmark: nginx proxy_pass, bare Pingora and tollgate
# (passthrough, full path hybrid and exact, 429 path), in one interleaved
# run. Writes the report to bench/results/latest.md and prints it.
#   bench/run.sh            full run (about 6 minutes)
#   bench/run.sh --smoke    1-second runs, to check the script works (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  # The package starts a system nginx we do not want.
  ( systemctl stop nginx 2>/dev/null || service nginx stop 2>/dev/null || pkill -x nginx ) >/dev/null 2>&1 || true
fi
if ! command -v oha >/dev/null && [ "${1:-}" != "--smoke" ]; then
  cargo install oha --locked >/dev/null 2>&1 || echo "bench: oha not installed; the oha cross-check is skipped" >&2
fi
cargo build --release --quiet --bin tollgate --example bare_pingora
mkdir -p bench/results
python3 bench/run.py "$@" | tee bench/results/latest.md
