#!/bin/sh
# Prepare the control plane's state directory, then hand over to supervisord (PID 1 is tini).
#
# AIRLOCK_CP_ROLE=all (default): gateway, sync, dagster-webserver and dagster-daemon. AIRLOCK_CP_ROLE=gateway:
# only the agent API gateway - a replica sharing the database and the state volume (only one dagster-daemon
# may run per instance). AIRLOCK_CP_POSTGRES_HOST set: Dagster's storage on that Postgres (dagster-postgres.yaml).
set -eu
state=${AIRLOCK_CP_STATE_DIR:-/var/lib/airlock-cp}
mkdir -p "$state/dagster" "$state/tls"
case ${AIRLOCK_CP_ROLE:=all} in
  all) export AIRLOCK_CP_DAGSTER_PROGRAMS=true ;;
  gateway) export AIRLOCK_CP_DAGSTER_PROGRAMS=false ;;
  *) echo "airlock-cp: AIRLOCK_CP_ROLE must be all or gateway, not '$AIRLOCK_CP_ROLE'" >&2; exit 2 ;;
esac
export AIRLOCK_CP_ROLE
instance=/etc/airlock-cp/dagster.yaml
if [ -n "${AIRLOCK_CP_POSTGRES_HOST:-}" ]; then
  instance=/etc/airlock-cp/dagster-postgres.yaml
  export AIRLOCK_CP_POSTGRES_USER="${AIRLOCK_CP_POSTGRES_USER:-airlock}" \
         AIRLOCK_CP_DAGSTER_DB="${AIRLOCK_CP_DAGSTER_DB:-dagster}"
  if [ -n "${AIRLOCK_CP_POSTGRES_PASSWORD_FILE:-}" ]; then
    AIRLOCK_CP_POSTGRES_PASSWORD=$(cat "$AIRLOCK_CP_POSTGRES_PASSWORD_FILE")
    export AIRLOCK_CP_POSTGRES_PASSWORD  # for dagster.yaml's {env: ...}; not in `docker inspect`
  fi
fi
if [ ! -e "$DAGSTER_HOME/dagster.yaml" ]; then
  cp "$instance" "$DAGSTER_HOME/dagster.yaml"
elif [ "$instance" != /etc/airlock-cp/dagster.yaml ] && ! grep -q '^storage:' "$DAGSTER_HOME/dagster.yaml"; then
  echo "airlock-cp: warning: $DAGSTER_HOME/dagster.yaml (kept from an earlier start) has no Postgres storage;" \
       "remove it to use $instance" >&2
fi
if [ "$AIRLOCK_CP_ROLE" = all ]; then
  # Dagster's storage is created (or, after an upgrade, migrated) here, once, before anything opens it. Started
  # together on a new SQLite instance, the webserver, the daemon and the gateway would each create it on first
  # use, and two of them can stamp different alembic revisions into schedules.db: from then on every storage
  # call fails with "more than one head present".
  if ! migrated=$(/opt/airlock-cp/venv/bin/dagster instance migrate 2>&1); then
    printf '%s\n' "$migrated" >&2
    echo "airlock-cp: dagster instance migrate failed (above); Dagster's storage is not ready" >&2
    exit 1
  fi
  echo "airlock-cp: Dagster's storage is ready (dagster instance migrate)"
  # The workspace is rendered from the registry; an empty one until locations are added.
  /opt/airlock-cp/venv/bin/python -m controlplane.cli workspace render --out "$state/workspace.yaml"
fi
exec "$@"
