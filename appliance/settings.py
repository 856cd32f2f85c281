"""The appliance's settings: environment variables -> one frozen Settings value."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    appliance_id: str
    docker_host: str  # the agent's Docker endpoint: sockguard's filtered socket
    policy_dir: str
    locations_file: str
    state_dir: str
    egress_routes: str
    egress_port: int
    container_id: str  # this appliance's own container (Docker sets HOSTNAME to its short id)
    reconcile_interval: float
    # Connected mode (the control plane is the source of desired locations); empty = standalone.
    control_plane_url: str = ""
    enroll_token: str = ""
    control_plane_fingerprint: str = ""  # expected control-plane key id, pinned at enrollment
    ca_file: str = ""  # trust only this CA for the gateway's TLS certificate
    queues: tuple[str, ...] = ("default",)
    # How work arrives: "channel" (a WebSocket held open; the default) or "poll" (signed long polls), e.g.
    # behind a proxy that does not pass WebSockets.
    work_channel: str = "channel"
    metadata_control_socket: str = "/run/airlock/metadata/control.sock"
    # The relay's compiled data path (docs/FASTPATH.md): "auto" uses airlock-fastpath when it is installed and
    # the gateway offers it, "off" never, a path runs that binary. Only with the work channel.
    fastpath: str = "auto"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        appliance_id = env.get("AIRLOCK_APPLIANCE_ID", "default")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", appliance_id):
            raise ValueError(f"AIRLOCK_APPLIANCE_ID={appliance_id!r}: use 1-31 of a-z, 0-9 and '-'")
        work_channel = env.get("AIRLOCK_WORK_CHANNEL", "channel")
        if work_channel not in ("channel", "poll"):
            raise ValueError(f"AIRLOCK_WORK_CHANNEL={work_channel!r}: use 'channel' or 'poll'")
        return cls(
            appliance_id=appliance_id,
            docker_host=env.get("AIRLOCK_DOCKER_HOST", "unix:///run/airlock/sockguard/docker.sock"),
            policy_dir=env.get("AIRLOCK_POLICY_DIR", "/etc/airlock/policy"),
            locations_file=env.get("AIRLOCK_LOCATIONS", "/etc/airlock/locations.yaml"),
            state_dir=env.get("AIRLOCK_STATE_DIR", "/var/lib/airlock"),
            egress_routes=env.get("AIRLOCK_EGRESS_ROUTES", "/run/airlock/egress/routes.json"),
            egress_port=int(env.get("AIRLOCK_EGRESS_PORT", "3128")),
            container_id=env.get("AIRLOCK_CONTAINER_ID") or env.get("HOSTNAME") or socket.gethostname(),
            reconcile_interval=float(env.get("AIRLOCK_RECONCILE_INTERVAL", "5")),
            control_plane_url=env.get("AIRLOCK_CONTROL_PLANE_URL", "").rstrip("/"),
            enroll_token=_secret(env, "AIRLOCK_ENROLL_TOKEN"),
            control_plane_fingerprint=env.get("AIRLOCK_CONTROL_PLANE_FINGERPRINT", ""),
            ca_file=env.get("AIRLOCK_CA_FILE", ""),
            queues=tuple(q for q in env.get("AIRLOCK_QUEUES", "default").split(",") if q),
            work_channel=work_channel,
            fastpath=env.get("AIRLOCK_FASTPATH", "auto"),
        )


def _secret(env: Mapping[str, str], name: str) -> str:
    """A secret from NAME, or from the file NAME_FILE points at (so it need not sit in the environment)."""
    path = env.get(f"{name}_FILE")
    if path:
        with open(path) as f:
            return f.read().strip()
    return env.get(name, "")
