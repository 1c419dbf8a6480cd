#!/usr/bin/env bash
# Installs what building and testing tollgate needs on Debian/Ubuntu, when missing:
# a C toolchain and cmake (Pingora's zlib-ng), redis-server and promtool (tests).
set -euo pipefail
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v cmake >/dev/null || need+=(cmake)
command -v redis-server >/dev/null || need+=(redis-server)
command -v promtool >/dev/null || need+=(prometheus)
command -v python3 >/dev/null || need+=(python3 python3-pip)
# Real clients the edge-protocol tests drive: curl (HTTP/2), h2load, ss.
command -v curl >/dev/null || need+=(curl)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v ss >/dev/null || need+=(iproute2)
command -v openssl >/dev/null || need+=(openssl)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Debian package starts a Prometheus server we do not want.
if [[ " ${need[*]} " == *" prometheus "* ]]; then
  ( systemctl stop prometheus 2>/dev/null || service prometheus stop 2>/dev/null || pkill -x prometheus ) >/dev/null 2>&1 || true
fi
pip_install() {
  python3 -m pip install --quiet "$@" 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages "$@"
}
# PyJWT mints the tokens the tests check tollgate against (an independent implementation).
if ! python3 -c 'import jwt, cryptography' >/dev/null 2>&1; then
  echo "setup: installing PyJWT and cryptography"
  if [ "$(command -v python3)" = /usr/bin/python3 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive ${SUDO:-} apt-get install -y -qq python3-jwt python3-cryptography >/dev/null || true
  fi
  if ! python3 -c 'import jwt, cryptography' >/dev/null 2>&1; then
    pip_install pyjwt cryptography
  fi
fi
# grpcio and websockets: the real gRPC and WebSocket peers of tests/edge.rs.
if ! python3 -c 'import grpc, websockets' >/dev/null 2>&1; then
  echo "setup: installing grpcio and websockets"
  pip_install grpcio websockets
fi
# h2 (hyperframe, hpack): the frame-level HTTP/2 client of tests/support/h2_peer.py.
if ! python3 -c 'import hyperframe, hpack' >/dev/null 2>&1; then
  echo "setup: installing h2"
  pip_install h2
fi
command -v cargo >/dev/null || { echo "setup: cargo is missing: install Rust from https://rustup.rs" >&2; exit 1; }
