"""Which Dagster versions a code location may run against this control plane, checked where it loads.

The webserver and the daemon speak Dagster's gRPC API to every location; that API keeps working across a
window of Dagster releases, not forever. ListRepositories (the first call of every load) reports the
location's own `dagster` version; a location outside the window is answered with a load error that says so,
so the UI shows the reason instead of failing later on a call the two versions disagree about.
"""

from __future__ import annotations

import json

from packaging.version import InvalidVersion, Version

from protocol.dagster_grpc import LIST_REPOSITORIES, decode_echo, load_error_reply
from protocol.grpc_calls import GrpcResult

__all__ = ["OLDEST_SUPPORTED", "check_answer", "supported_window", "version_problem"]

OLDEST_SUPPORTED = Version("1.10.0")  # the oldest Dagster a location may run (docs/USER_CODE.md)


def supported_window(control_plane: str | None = None) -> tuple[Version, Version]:
    """[oldest, newest minor] a location may run: from OLDEST_SUPPORTED to the control plane's own minor."""
    if control_plane is None:
        from dagster.version import __version__ as control_plane
    own = Version(control_plane)
    return OLDEST_SUPPORTED, Version(f"{own.major}.{own.minor}")


def version_problem(location: str, control_plane: str | None = None) -> str | None:
    """Why a location on Dagster `location` cannot serve this control plane, or None if it can."""
    oldest, newest = supported_window(control_plane)
    try:
        version = Version(location)
    except InvalidVersion:
        return f"the location reports Dagster version {location!r}, which is not a version"
    minor = Version(f"{version.major}.{version.minor}")
    if version < oldest or minor > newest:
        return (f"the location runs Dagster {location}; this control plane supports locations on Dagster "
                f"{oldest} to {newest}.x (docs/USER_CODE.md): build the image with a Dagster in that range")
    return None


def check_answer(method: str, result: GrpcResult, control_plane: str | None = None) -> GrpcResult:
    """A location's ListRepositories answer, or a load error naming the version problem."""
    if method != LIST_REPOSITORIES or not result.ok or len(result.responses) != 1:
        return result
    try:
        data = json.loads(decode_echo(result.responses[0]))
    except (ValueError, UnicodeDecodeError):
        return result  # not ours to judge: Dagster reports what it cannot read
    versions = data.get("dagster_library_versions") if isinstance(data, dict) else None
    version = versions.get("dagster") if isinstance(versions, dict) else None
    if data.get("__class__") != "ListRepositoriesResponse" or not isinstance(version, str):
        return result
    problem = version_problem(version, control_plane)
    if problem is None:
        return result
    return GrpcResult((load_error_reply(f"airlock: {problem}", cls_name="AirlockVersionError"),))
