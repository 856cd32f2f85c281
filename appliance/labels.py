"""Docker labels that mark what airlock owns. sockguard lets the agent touch only labelled objects."""

from __future__ import annotations

MANAGED = "airlock.managed"  # "true" on every container and network the appliance creates
ROLE = "airlock.role"  # code-server | run | probe | network | appliance | artifacts | artifacts-layer | ...
LOCATION = "airlock.location"
SPEC_HASH = "airlock.spec-hash"
APPLIANCE_ID = "airlock.appliance-id"
RUN_ID = "airlock.run-id"  # on run containers: the Dagster run they execute

ROLE_APPLIANCE = "appliance"
ROLE_CODE_SERVER = "code-server"
ROLE_RUN = "run"
ROLE_PROBE = "probe"
ROLE_NETWORK = "network"
ROLE_ARTIFACTS = "artifacts"  # a location's artifact volume: the noexec overlay its containers mount
ROLE_ARTIFACTS_LAYER = "artifacts-layer"  # the plain volumes under that overlay; never mounted in a container
ROLE_ARTIFACTS_PREP = "artifacts-prep"  # created (never started) once so Docker makes the volume writable


def is_managed(labels: dict[str, str] | None) -> bool:
    return (labels or {}).get(MANAGED) == "true"


def is_appliance(labels: dict[str, str] | None) -> bool:
    return (labels or {}).get(ROLE) == ROLE_APPLIANCE
