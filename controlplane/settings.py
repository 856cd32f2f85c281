"""The control plane's settings: environment variables -> one frozen value.

The airlock tables live in SQLite under the state directory unless AIRLOCK_CP_DB names another database, or
AIRLOCK_CP_POSTGRES_HOST is set (on-prem, compose/onprem.yml): then they go to that Postgres server's
AIRLOCK_CP_POSTGRES_DB, with the password read from AIRLOCK_CP_POSTGRES_PASSWORD_FILE, so it is in no
environment that `docker inspect` shows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa


@dataclass(frozen=True)
class ControlPlaneSettings:
    state_dir: str  # keys, TLS material, the SQLite database
    database_url: str  # with the password in it: never log it (sa.make_url(...) hides it)
    gateway_host: str
    gateway_port: int
    tls_hostnames: tuple[str, ...]
    deployment: str
    relay_host: str  # where the relay listeners bind; the webserver and daemon are in the same container
    key_grace_seconds: float = 24 * 3600  # an agent's old key keeps working this long after a rotation
    tls_dir: str = ""  # ca.pem, gateway.pem, gateway.key (`airlock-cp tls init`); default <state_dir>/tls
    # The relay's compiled data path (docs/FASTPATH.md): "auto" runs airlock-fastpath if it is installed, "off"
    # never, a path runs that binary. Agents dial the tunnel port from outside: publish it like the gateway's.
    fastpath: str = "auto"
    fastpath_listen: str = "0.0.0.0:8450"
    fastpath_port: int | None = None  # the port agents are told to dial, if a proxy or NAT maps it elsewhere
    fastpath_stats_seconds: float = 60.0  # how often the gateway logs which road relayed calls took

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ControlPlaneSettings:
        env = os.environ if env is None else env
        state = env.get("AIRLOCK_CP_STATE_DIR", "/var/lib/airlock-cp")
        return cls(
            state_dir=state,
            database_url=_database_url(env, state),
            gateway_host=env.get("AIRLOCK_CP_GATEWAY_HOST", "0.0.0.0"),
            gateway_port=int(env.get("AIRLOCK_CP_GATEWAY_PORT", "8443")),
            tls_hostnames=_names(env.get("AIRLOCK_CP_TLS_HOSTNAMES", "controlplane,localhost")),
            deployment=env.get("AIRLOCK_CP_DEPLOYMENT", "default"),
            relay_host=env.get("AIRLOCK_CP_RELAY_HOST", "127.0.0.1"),
            key_grace_seconds=float(env.get("AIRLOCK_CP_KEY_GRACE_SECONDS", str(24 * 3600))),
            tls_dir=env.get("AIRLOCK_CP_TLS_DIR", f"{state}/tls"),
            fastpath=env.get("AIRLOCK_CP_FASTPATH", "auto"),
            fastpath_listen=env.get("AIRLOCK_CP_FASTPATH_LISTEN", "0.0.0.0:8450"),
            fastpath_port=int(env["AIRLOCK_CP_FASTPATH_PORT"]) if env.get("AIRLOCK_CP_FASTPATH_PORT") else None,
            fastpath_stats_seconds=float(env.get("AIRLOCK_CP_FASTPATH_STATS_SECONDS", "60")),
        )


def _database_url(env: Mapping[str, str], state_dir: str) -> str:
    if env.get("AIRLOCK_CP_DB"):
        return env["AIRLOCK_CP_DB"]
    if env.get("AIRLOCK_CP_POSTGRES_HOST"):
        return postgres_url(env, env.get("AIRLOCK_CP_POSTGRES_DB", "airlock"))
    return f"sqlite:///{state_dir}/cp.db"


def postgres_url(env: Mapping[str, str], database: str) -> str:
    """SQLAlchemy URL of `database` on the AIRLOCK_CP_POSTGRES_* server (password quoted as URLs need)."""
    password_file = env.get("AIRLOCK_CP_POSTGRES_PASSWORD_FILE")
    if password_file:
        with open(password_file, encoding="utf-8") as f:
            password = f.read().strip()
    else:
        password = env.get("AIRLOCK_CP_POSTGRES_PASSWORD", "")
    url = sa.URL.create("postgresql+psycopg2", username=env.get("AIRLOCK_CP_POSTGRES_USER", "airlock"),
                        password=password or None, host=env["AIRLOCK_CP_POSTGRES_HOST"],
                        port=int(env.get("AIRLOCK_CP_POSTGRES_PORT", "5432")), database=database)
    return url.render_as_string(hide_password=False)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())
