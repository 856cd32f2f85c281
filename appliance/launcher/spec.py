"""Hardened container specs: policy + location -> the exact arguments of a Docker container create.

Every user container (code server, run, probe) is built here, so the hardening defaults cannot be
forgotten by a caller; sockguard checks the same rules again on the wire.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from appliance import labels
from appliance.policy import Limits, Location, Policy
from protocol.dagster_grpc import DEFAULT_PORT

EGRESS_ALIAS = "airlock-egress"  # the appliance's DNS name on every location network


@dataclass(frozen=True)
class ContainerSpec:
    """Keyword arguments for docker-py's `containers.create`, plus the hash that identifies them."""

    name: str
    kwargs: dict[str, Any]
    spec_hash: str


def network_name(appliance_id: str, location: str) -> str:
    return f"airlock-{appliance_id}-{location}"


def hardened_kwargs(policy: Policy, limits: Limits, runtime: str) -> dict[str, Any]:
    """The security-relevant part of every user container, straight from policy/hardening.yaml."""
    h = policy.hardening
    return {
        "user": h.user,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true", f"seccomp={h.seccomp_profile}"],
        "read_only": True,
        "tmpfs": dict(h.tmpfs),
        "mem_limit": limits.memory,
        "memswap_limit": limits.memory,
        "nano_cpus": limits.nano_cpus,
        "pids_limit": limits.pids,
        "init": True,
        "runtime": runtime,
        "log_config": {"Type": "json-file", "Config": {"max-size": h.log_max_size, "max-file": str(h.log_max_file)}},
        "ipc_mode": "private",
    }


def spec_hash(kwargs: dict[str, Any]) -> str:
    text = json.dumps(kwargs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_server_spec(location: Location, policy: Policy, *, appliance_id: str, image_id: str,
                     egress_port: int) -> ContainerSpec:
    """A code server: `dagster api grpc` for one location, on that location's internal network."""
    target = ["--module-name", location.module] if location.module else ["--package-name", str(location.package)]
    proxy = f"http://{EGRESS_ALIAS}:{egress_port}"
    env = dict(location.env) | {
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "http_proxy": proxy,
        "https_proxy": proxy,
        "NO_PROXY": "localhost,127.0.0.1",
        "no_proxy": "localhost,127.0.0.1",
        "DAGSTER_HOME": "/tmp/dagster_home",
        "HOME": "/home/dagster",
    }
    network = network_name(appliance_id, location.name)
    kwargs: dict[str, Any] = {
        "image": image_id,
        # Lazy load: a location whose code fails to import still serves its error (with the traceback) to
        # Dagster instead of exiting, so the UI shows why; the agent reads the same error for its status.
        "command": ["dagster", "api", "grpc", "--host", "0.0.0.0", "--port", str(DEFAULT_PORT),
                    "--lazy-load-user-code", *target],
        "environment": env,
        "network": network,
        "restart_policy": {"Name": "on-failure", "MaximumRetryCount": policy.hardening.restart_max_retries},
        "healthcheck": {
            "test": ["CMD", "dagster", "api", "grpc-health-check", "--port", str(DEFAULT_PORT)],
            "interval": 30_000_000_000,
            "timeout": 20_000_000_000,
            "start_period": 60_000_000_000,
            "retries": 3,
        },
        **hardened_kwargs(policy, location.limits, location.runtime),
    }
    digest = spec_hash(kwargs)
    kwargs["labels"] = {
        labels.MANAGED: "true",
        labels.ROLE: labels.ROLE_CODE_SERVER,
        labels.LOCATION: location.name,
        labels.APPLIANCE_ID: appliance_id,
        labels.SPEC_HASH: digest,
    }
    name = f"airlock-{appliance_id}-{location.name}-{digest[:8]}"
    kwargs["name"] = name
    kwargs["hostname"] = f"{location.name}-code-server"
    return ContainerSpec(name=name, kwargs=kwargs, spec_hash=digest)
