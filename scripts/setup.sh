#!/usr/bin/env bash
# Installs what is missing on Debian/Ubuntu, for one purpose:
#   scripts/setup.sh run    building and running: a C compiler and cmake
#                           (Pingora's zlib-ng), nothing else
#   scripts/setup.sh test   the above, plus what the tests drive: redis-server,
#                           promtool, curl, h2load, ss, openssl, and a Python
#                           virtual environment in .venv holding the packages
#                           of tests/requirements.txt (the system Python is
#                           left alone)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-test}
case "$mode" in run | test) ;; *) echo "usage: $0 run|test" >&2; exit 2 ;; esac

need=()
command -v cc >/dev/null || need+=(build-essential)
command -v cmake >/dev/null || need+=(cmake)
if [ "$mode" = test ]; then
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v promtool >/dev/null || need+=(prometheus)
  command -v python3 >/dev/null || need+=(python3)
  command -v curl >/dev/null || need+=(curl)
  command -v h2load >/dev/null || need+=(nghttp2-client)
  command -v ss >/dev/null || need+=(iproute2)
  command -v openssl >/dev/null || need+=(openssl)
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_install() {
  echo "setup: installing $*"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
# The Debian package starts a Prometheus server we do not want.
if [[ " ${need[*]:-} " == *" prometheus "* ]]; then
  ( systemctl stop prometheus 2>/dev/null || service prometheus stop 2>/dev/null ) >/dev/null 2>&1 || true
fi

if [ "$mode" = test ]; then
  if [ ! -x .venv/bin/python3 ]; then
    # Debian ships venv's pip bootstrap in a package of its own.
    if ! python3 -m venv .venv >/dev/null 2>&1; then
      rm -rf .venv
      apt_install python3-venv
      python3 -m venv .venv
    fi
  fi
  if ! .venv/bin/python3 -c 'import jwt, cryptography, grpc, websockets, h2, opentelemetry.proto' >/dev/null 2>&1; then
    echo "setup: installing tests/requirements.txt into .venv"
    .venv/bin/python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
  fi
fi
command -v cargo >/dev/null || { echo "setup: cargo is missing: install Rust from https://rustup.rs" >&2; exit 1; }
