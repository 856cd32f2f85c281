#!/bin/sh
# Make sure the base has python3 with venv and tini. The offline airlock/base already has them;
# an official Debian base (BASE_IMAGE=debian:bookworm-slim) gets them from its own apt sources.
set -eu
if command -v python3 >/dev/null && python3 -c 'import ensurepip, venv' 2>/dev/null && [ -x /usr/bin/tini ]; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends python3 python3-venv tini ca-certificates
rm -rf /var/lib/apt/lists/*
