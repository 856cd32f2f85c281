#!/bin/sh
# airlock/postgres: on an empty data volume, initdb and create the application role and its databases; then run
# the server on every interface of the container's networks, password (SCRAM) logins only over TCP.
#
#   AIRLOCK_PG_PASSWORD_FILE  the application role's password (a secret file; or AIRLOCK_PG_PASSWORD)
#   AIRLOCK_PG_USER           the application role (default airlock)
#   AIRLOCK_PG_DATABASES      databases it owns (default "airlock dagster": the control plane's tables, Dagster's)
#
# The superuser `postgres` logs in only over the local socket as the OS user postgres (peer), so
# `docker exec <container> psql` works and nothing on the network can become superuser.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
user=${AIRLOCK_PG_USER:-airlock}
databases=${AIRLOCK_PG_DATABASES:-airlock dagster}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -n "${AIRLOCK_PG_PASSWORD_FILE:-}" ]; then
    password=$(cat "$AIRLOCK_PG_PASSWORD_FILE")
  else
    password=${AIRLOCK_PG_PASSWORD:-}
  fi
  if [ -z "$password" ]; then
    echo "airlock-postgres: the data directory is empty and no password is set;" \
         "give AIRLOCK_PG_PASSWORD_FILE (or AIRLOCK_PG_PASSWORD)" >&2
    exit 2
  fi
  echo "airlock-postgres: initialising $PGDATA (role $user, databases: $databases)"
  initdb -D "$PGDATA" --username=postgres --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 \
    --locale=C.UTF-8 >/dev/null
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  # Socket only while setting up: a health check over TCP stays red until the role and databases exist.
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w -s start
  psql -q -v ON_ERROR_STOP=1 -v user="$user" -v pw="$password" -d postgres <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'pw';
SQL
  for db in $databases; do
    psql -q -v ON_ERROR_STOP=1 -v user="$user" -v db="$db" -d postgres <<'SQL'
CREATE DATABASE :"db" OWNER :"user";
SQL
  done
  pg_ctl -D "$PGDATA" -m fast -w -s stop
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
