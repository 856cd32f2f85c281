#!/usr/bin/env bash
# Install what the host needs to build images and run the tests: debootstrap, docker-registry (Debian) and the
# hash-locked Python test requirements; check for cargo (the relay's fast path is Rust: fastpath/). Idempotent;
# fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v debootstrap >/dev/null; then
  echo "[setup] installing debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
# The registry pull tests start Debian's docker-registry on loopback, with an htpasswd (bcrypt) login.
if ! command -v docker-registry >/dev/null || ! command -v htpasswd >/dev/null; then
  echo "[setup] installing docker-registry and apache2-utils (htpasswd)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry apache2-utils >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "[setup] cargo is not installed: the relay's fast path (fastpath/) is Rust. Install a toolchain" \
       "(rustup, or Debian's cargo-web) and run again" >&2
  exit 2
fi
if ! docker info >/dev/null 2>&1; then
  echo "[setup] the Docker engine is not reachable (is dockerd running, and may this user use it?)" >&2
  exit 2
fi
stamp=.cache/dev-requirements.$(sha256sum requirements/dev.lock | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "[setup] installing the host's Python requirements (requirements/dev.lock)"
  python3 -m pip install -q --require-hashes -r requirements/dev.lock
  mkdir -p .cache && touch "$stamp"
fi
