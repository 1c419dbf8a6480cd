#!/usr/bin/env bash
# Whole-system benchmark: nginx proxy_pass, bare Pingora, HAProxy (jwt_verify +
# stick-table) and tollgate (passthrough, full path hybrid and exact, 429
# path), in one interleaved run, then p99 at a fixed 50% load. Writes the
# report to bench/results/latest.md and prints it.
#   bench/run.sh            full run (about 8 minutes)
#   bench/run.sh --smoke    1-second runs, to check the script works (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
# The bench scripts import PyJWT from the test environment (.venv).
PATH="$PWD/.venv/bin:$PATH"
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
command -v haproxy >/dev/null || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  # The packages start a system nginx and haproxy we do not want.
  if [[ " ${need[*]} " == *" nginx-light "* ]]; then
    ( systemctl stop nginx 2>/dev/null || service nginx stop 2>/dev/null || pkill -x nginx ) >/dev/null 2>&1 || true
  fi
  if [[ " ${need[*]} " == *" haproxy "* ]]; then
    ( systemctl stop haproxy 2>/dev/null || service haproxy stop 2>/dev/null ) >/dev/null 2>&1 || true
  fi
fi
if ! command -v oha >/dev/null && [[ " $* " != *" --smoke "* ]]; then
  cargo install oha --locked >/dev/null 2>&1 \
    || echo "bench: oha not installed; the fixed-load p99 section and the oha cross-check are skipped" >&2
fi
cargo build --release --quiet --bin tollgate --example bare_pingora
if [[ " $* " == *" --smoke "* ]]; then
  # Smoke numbers mean nothing: print them, keep the last real report.
  python3 bench/run.py "$@"
else
  mkdir -p bench/results
  # Replaced only by a run that finished.
  python3 bench/run.py "$@" | tee bench/results/latest.md.partial
  mv bench/results/latest.md.partial bench/results/latest.md
fi
