"""GRPC_CALL work: replay the control plane's raw Dagster call against this location's code server."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from appliance.agent.dispatcher import Handler, Starter
from appliance.agent.grpc_replay import GrpcReplayer
from appliance.agent.status import LocationStatus, State
from protocol.dagster_grpc import DEFAULT_PORT, LIST_REPOSITORIES, load_error_reply
from protocol.grpc_calls import GrpcResult
from protocol.work import SignedWork


def grpc_call_handler(replayer: GrpcReplayer, statuses: Callable[[], dict[str, LocationStatus]]) -> Handler:
    """`statuses` gives the reconciler's current view: which container serves which location."""

    def handle(work: SignedWork) -> dict[str, Any]:
        payload = json.loads(work.payload)
        address = _address(payload, statuses)
        if isinstance(address, GrpcResult):
            return address.to_result()
        return replayer.replay(payload, address)

    return handle


def grpc_call_starter(replayer: GrpcReplayer, statuses: Callable[[], dict[str, LocationStatus]]) -> Starter:
    """The same, without a worker thread for unary calls: gRPC answers on its own thread (streams: False)."""

    def start(work: SignedWork, on_value: Callable[[dict[str, Any]], None]) -> bool:
        payload = json.loads(work.payload)
        address = _address(payload, statuses)
        if isinstance(address, GrpcResult):
            on_value(address.to_result())
            return True
        return replayer.start(payload, address, on_value)

    return start


def code_server_addresses(statuses: Mapping[str, LocationStatus]) -> dict[str, str]:
    """host:port of each location's code server on this appliance (its container on the location network)."""
    return {name: f"{status.container}:{DEFAULT_PORT}" for name, status in statuses.items() if status.container}


def _address(payload: dict[str, Any], statuses: Callable[[], dict[str, LocationStatus]]) -> str | GrpcResult:
    location = payload.get("location")
    current = statuses()
    address = code_server_addresses(current).get(location) if isinstance(location, str) else None
    status = current.get(location) if isinstance(location, str) else None
    if address is None and status is not None and status.state is State.ERROR and status.error \
            and payload.get("method") == LIST_REPOSITORIES:
        # Dagster loads a location with ListRepositories first: answering with the reason makes it the
        # location's load error in the UI, instead of "code server unreachable".
        return GrpcResult((load_error_reply(f"airlock: code location {location!r} is not running on this "
                                            f"appliance: {status.error}"),))
    if address is None:
        return GrpcResult.failure("UNAVAILABLE", f"location {location!r} has no code server on this appliance "
                                                 "(not desired here, or still starting)")
    return address
