#!/bin/sh
# Prepare the appliance's runtime directories, then hand over to supervisord (PID 1 is tini).
#
# Who may touch what:
#   /var/run/docker.sock          the real socket: only sockguard's process gets its group
#   /run/airlock/sockguard/       sockguard's filtered socket: airlock-agent group only
#   /run/airlock/egress/          routes the agent writes for the egress proxy: airlock-egress reads
#   /run/airlock/metadata/        the metadata relay's control socket: airlock-agent only (agent + relay)
#   /var/lib/airlock              the agent's state (keys, status, run spool): airlock-agent only, 0700
set -eu

upstream=${AIRLOCK_UPSTREAM_SOCKET:-/var/run/docker.sock}
if [ ! -S "$upstream" ]; then
  echo "airlock: no Docker socket at $upstream; start the appliance with -v /var/run/docker.sock:$upstream" >&2
  exit 2
fi
AIRLOCK_DOCKER_GID=$(stat -c %g "$upstream")
export AIRLOCK_DOCKER_GID

install -d -o root -g root -m 0755 /run/airlock
install -d -o airlock-sockguard -g airlock-agent -m 0750 /run/airlock/sockguard
install -d -o airlock-agent -g airlock-egress -m 0750 /run/airlock/egress
install -d -o airlock-agent -g airlock-agent -m 0700 /run/airlock/metadata
install -d -o airlock-agent -g airlock-agent -m 0700 "${AIRLOCK_STATE_DIR:-/var/lib/airlock}"

if [ ! -r "${AIRLOCK_LOCATIONS:-/etc/airlock/locations.yaml}" ]; then
  echo "airlock: no locations file at ${AIRLOCK_LOCATIONS:-/etc/airlock/locations.yaml}; the agent will run with none" >&2
fi
# Refuse to start on a bad policy or locations file: the error names file, field and problem.
/usr/local/bin/airlock check-config

exec "$@"
