"""Hardened container specs: policy + location -> the exact arguments of a Docker container create.

Every user container (code server, run, probe) is built here, so the hardening defaults cannot be
forgotten by a caller; sockguard checks the same rules again on the wire.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from docker.types import Mount

from appliance import artifacts, labels
from appliance.policy import Limits, Location, Policy
from protocol.dagster_grpc import DEFAULT_PORT
from protocol.locations import ARTIFACTS_DIR

EGRESS_ALIAS = "airlock-egress"  # the appliance's DNS names on every location network
METADATA_ALIAS = "airlock-metadata"
METADATA_PORT = 7070
METADATA_URL = f"http://{METADATA_ALIAS}:{METADATA_PORT}"


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


def _location_env(location: Location, egress_port: int) -> dict[str, str]:
    proxy = f"http://{EGRESS_ALIAS}:{egress_port}"
    return dict(location.env) | {
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "http_proxy": proxy,
        "https_proxy": proxy,
        "NO_PROXY": f"localhost,127.0.0.1,{METADATA_ALIAS}",
        "no_proxy": f"localhost,127.0.0.1,{METADATA_ALIAS}",
        "DAGSTER_HOME": "/tmp/dagster_home",
        "HOME": "/home/dagster",
    }


def artifacts_mount(appliance_id: str, location: str) -> Mount:
    """The location's artifact volume at ARTIFACTS_DIR; no_copy, so Docker never re-owns it from an image."""
    return Mount(ARTIFACTS_DIR, artifacts.volume_name(appliance_id, location), type="volume", no_copy=True)


def code_server_spec(location: Location, policy: Policy, *, appliance_id: str, image_id: str,
                     egress_port: int, storage_token: str | None = None) -> ContainerSpec:
    """A code server: `dagster api grpc` for one location, on that location's internal network.

    With `storage_token` (connected mode: a read-only location token), sensors and schedules evaluated
    here get an instance whose storage reads go through the metadata relay."""
    target = ["--module-name", location.module] if location.module else ["--package-name", str(location.package)]
    env = _location_env(location, egress_port)
    if storage_token:
        env |= {"AIRLOCK_METADATA_URL": METADATA_URL, "AIRLOCK_LOCATION_TOKEN": storage_token}
    network = network_name(appliance_id, location.name)
    kwargs: dict[str, Any] = {
        "image": image_id,
        # Lazy load: a location whose code fails to import still serves its error (with the traceback) to
        # Dagster instead of exiting, so the UI shows why; the agent reads the same error for its status.
        "command": ["dagster", "api", "grpc", "--host", "0.0.0.0", "--port", str(DEFAULT_PORT),
                    "--lazy-load-user-code", *target],
        "environment": env,
        "network": network,
        "mounts": [artifacts_mount(appliance_id, location.name)],
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


def run_container_name(appliance_id: str, run_id: str) -> str:
    return f"airlock-{appliance_id}-run-{run_id}"


def run_spec(location: Location, policy: Policy, *, appliance_id: str, image_id: str, run_id: str,
             execute_run_args: str, token: str, egress_port: int) -> ContainerSpec:
    """One run: `dagster api execute_run` in its own container, on the location's network, hardened the same.

    Its storage goes to the appliance's metadata relay with `token`, a capability for this run only; the
    container gets nothing else of the appliance's (no key, no Docker socket, no state volume).
    """
    env = _location_env(location, egress_port) | {"AIRLOCK_METADATA_URL": METADATA_URL, "AIRLOCK_RUN_TOKEN": token}
    kwargs: dict[str, Any] = {
        "image": image_id,
        "command": ["dagster", "api", "execute_run", execute_run_args],
        "environment": env,
        "network": network_name(appliance_id, location.name),
        "mounts": [artifacts_mount(appliance_id, location.name)],
        **hardened_kwargs(policy, location.limits, location.runtime),
    }
    digest = spec_hash({k: v for k, v in kwargs.items() if k != "environment"})
    name = run_container_name(appliance_id, run_id)
    kwargs["labels"] = {
        labels.MANAGED: "true",
        labels.ROLE: labels.ROLE_RUN,
        labels.LOCATION: location.name,
        labels.APPLIANCE_ID: appliance_id,
        labels.RUN_ID: run_id,
        labels.SPEC_HASH: digest,
    }
    kwargs["name"] = name
    kwargs["hostname"] = f"run-{run_id[:8]}"
    return ContainerSpec(name=name, kwargs=kwargs, spec_hash=digest)


def artifacts_prep_spec(location: Location, policy: Policy, *, appliance_id: str, image_id: str) -> ContainerSpec:
    """A container that is created and removed, never started: creating it makes Docker copy the image's /tmp
    owner and mode onto the still-empty artifact volume, so the non-root user can write there. Hardened like
    every other, with no network at all."""
    kwargs = hardened_kwargs(policy, location.limits, location.runtime)
    kwargs["tmpfs"] = {k: v for k, v in kwargs["tmpfs"].items() if k != artifacts.PREP_TARGET}
    volume = artifacts.volume_name(appliance_id, location.name)
    kwargs |= {"image": image_id, "command": ["true"], "network_mode": "none",
               "mounts": [Mount(artifacts.PREP_TARGET, volume, type="volume", no_copy=False)]}
    digest = spec_hash(kwargs)
    name = f"{volume}-prep-{digest[:8]}"
    kwargs["labels"] = {labels.MANAGED: "true", labels.ROLE: labels.ROLE_ARTIFACTS_PREP,
                        labels.LOCATION: location.name, labels.APPLIANCE_ID: appliance_id, labels.SPEC_HASH: digest}
    kwargs["name"] = name
    return ContainerSpec(name=name, kwargs=kwargs, spec_hash=digest)
