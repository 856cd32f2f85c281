#!/bin/sh
# Prepare the control plane's state directory, then hand over to supervisord (PID 1 is tini).
set -eu
state=${AIRLOCK_CP_STATE_DIR:-/var/lib/airlock-cp}
mkdir -p "$state/dagster" "$state/tls"
[ -e "$DAGSTER_HOME/dagster.yaml" ] || cp /etc/airlock-cp/dagster.yaml "$DAGSTER_HOME/dagster.yaml"
# The workspace is rendered from the registry; an empty one until locations are added.
/opt/airlock-cp/venv/bin/python -m controlplane.cli workspace render --out "$state/workspace.yaml"
exec "$@"
