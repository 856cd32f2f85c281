"""The control plane's settings: environment variables -> one frozen value."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ControlPlaneSettings:
    state_dir: str  # keys, TLS material, the SQLite database
    database_url: str
    gateway_host: str
    gateway_port: int
    tls_hostnames: tuple[str, ...]
    deployment: str
    relay_host: str  # where the relay listeners bind; the webserver and daemon are in the same container
    key_grace_seconds: float = 24 * 3600  # an agent's old key keeps working this long after a rotation

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ControlPlaneSettings:
        env = os.environ if env is None else env
        state = env.get("AIRLOCK_CP_STATE_DIR", "/var/lib/airlock-cp")
        return cls(
            state_dir=state,
            database_url=env.get("AIRLOCK_CP_DB", f"sqlite:///{state}/cp.db"),
            gateway_host=env.get("AIRLOCK_CP_GATEWAY_HOST", "0.0.0.0"),
            gateway_port=int(env.get("AIRLOCK_CP_GATEWAY_PORT", "8443")),
            tls_hostnames=_names(env.get("AIRLOCK_CP_TLS_HOSTNAMES", "controlplane,localhost")),
            deployment=env.get("AIRLOCK_CP_DEPLOYMENT", "default"),
            relay_host=env.get("AIRLOCK_CP_RELAY_HOST", "127.0.0.1"),
            key_grace_seconds=float(env.get("AIRLOCK_CP_KEY_GRACE_SECONDS", str(24 * 3600))),
        )


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())
