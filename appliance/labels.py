"""Docker labels that mark what airlock owns. sockguard lets the agent touch only labelled objects."""

from __future__ import annotations

MANAGED = "airlock.managed"  # "true" on every container and network the appliance creates
ROLE = "airlock.role"  # code-server | run | probe | network | appliance
LOCATION = "airlock.location"
SPEC_HASH = "airlock.spec-hash"
APPLIANCE_ID = "airlock.appliance-id"
RUN_ID = "airlock.run-id"  # on run containers: the Dagster run they execute

ROLE_APPLIANCE = "appliance"
ROLE_CODE_SERVER = "code-server"
ROLE_RUN = "run"
ROLE_PROBE = "probe"
ROLE_NETWORK = "network"


def is_managed(labels: dict[str, str] | None) -> bool:
    return (labels or {}).get(MANAGED) == "true"


def is_appliance(labels: dict[str, str] | None) -> bool:
    return (labels or {}).get(ROLE) == ROLE_APPLIANCE
