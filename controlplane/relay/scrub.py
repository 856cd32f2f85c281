"""Keep the control plane's InstanceRef on the control plane.

Schedule, sensor, partition and execution-plan requests from the daemon and webserver carry the control
plane's own `InstanceRef` (its storage paths, and for Postgres its connection settings). Relaying those
bytes untouched would hand them to user code. Before a call is queued, the relay decodes the request's
serialized arguments with Dagster's serdes (never pickle) and puts the userland ref in its place
(controlplane/runs/instance_ref.py: class names only). The code server opens it with its location token, so
a sensor or schedule that reads the instance reads through the appliance's relay, within what a location
may read.

Dagster is imported lazily: it is installed in the control plane image, where the relay runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from protocol.dagster_grpc import SERVICE, decode_echo, encode_echo
from protocol.errors import PermanentError

# Dagster's client calls the unary Sync* forms first (the streaming ones only as a fallback on UNIMPLEMENTED);
# both take the same request message.
CARRIES_INSTANCE_REF = frozenset(f"/{SERVICE}/{name}" for name in (
    "ExternalScheduleExecution", "SyncExternalScheduleExecution", "ExternalSensorExecution",
    "SyncExternalSensorExecution", "ExternalPartitionSetExecutionParams", "ExternalPartitionConfig",
    "ExternalPartitionTags", "ExternalPartitionNames", "ExecutionPlanSnapshot",
))


class ScrubError(PermanentError, ValueError):
    """The request's arguments could not be decoded; it is refused rather than relayed with the ref."""


def _with_instance_ref(args: Any, ref: Any) -> Any:
    """A copy built through the type's own constructor, so its checks run on the new value."""
    from dagster._record import copy  # Dagster's @record / IHaveNew argument types

    try:
        return copy(args, instance_ref=ref)
    except (TypeError, AttributeError, KeyError):
        if dataclasses.is_dataclass(args):
            return dataclasses.replace(args, instance_ref=ref)  # type: ignore[type-var]
        return args._replace(instance_ref=ref)  # a plain NamedTuple


def scrub_instance_ref(method: str, request: bytes) -> bytes:
    """The request with its InstanceRef replaced by the userland one; other methods pass through unchanged."""
    if method not in CARRIES_INSTANCE_REF:
        return request
    import dagster._grpc.types  # noqa: F401 - registers the argument types with serdes
    from dagster._serdes import deserialize_value, serialize_value

    try:
        args = deserialize_value(decode_echo(request))  # every such request is {string serialized_args = 1}
    except Exception as exc:  # serdes raises its own family; any failure means "cannot vouch for it"
        raise ScrubError(f"cannot decode the arguments of {method}: {exc}") from exc
    if getattr(args, "instance_ref", None) is None:
        return request
    from controlplane.runs.instance_ref import userland_instance_ref

    return encode_echo(serialize_value(_with_instance_ref(args, userland_instance_ref())))
