#!/bin/sh
# Make sure the base has PostgreSQL 15 and tini, then leave an empty data directory for the entrypoint.
# The offline airlock/postgres-rootfs already has the packages; an official Debian base
# (BASE_IMAGE=debian:bookworm-slim) gets them from its own apt sources.
set -eu
if [ ! -x /usr/lib/postgresql/15/bin/postgres ] || [ ! -x /usr/bin/tini ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends postgresql-15 tini
  rm -rf /var/lib/apt/lists/*
fi
# The package's postinst may have made a "main" cluster under /etc/postgresql; the entrypoint's initdb owns
# the data directory instead, so a container is configured only by its environment.
if command -v pg_dropcluster >/dev/null && [ -d /etc/postgresql/15/main ]; then
  pg_dropcluster 15 main
fi
install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data
install -d -o postgres -g postgres -m 2775 /run/postgresql
