"""A location that does not run on the appliance shows airlock's reason in Dagster, as its load error.

Dagster loads a location with ListRepositories first. Where no code server runs (an image the appliance
refused, a start that failed), the agent answers that call with a SerializableErrorInfo carrying the reason;
Dagster's own client (GrpcServerCodeLocation, the webserver's loader) raises it as the location's load error.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

dagster = pytest.importorskip("dagster")

from appliance.agent.grpc_handler import grpc_call_handler  # noqa: E402
from appliance.agent.status import LocationStatus, State  # noqa: E402
from controlplane.relay.server import RelayServer  # noqa: E402
from protocol.dagster_grpc import LIST_REPOSITORIES, PING, load_error_reply  # noqa: E402
from protocol.grpc_calls import GrpcCall, GrpcResult  # noqa: E402
from protocol.work import SignedWork, WorkKind  # noqa: E402

REASON = "refused by this appliance: image sha256:2222 (acme/etl:1.4) is not allowed; on the appliance run " \
         "`airlock images allow acme/etl`"


def _statuses() -> dict[str, LocationStatus]:
    return {"refused": LocationStatus("refused", State.ERROR, error=REASON),
            "starting": LocationStatus("starting", State.LOADING)}


class AgentCalls:
    """The relay's CallQueue answered by the real agent handler, as if the work item crossed the channel."""

    def __init__(self) -> None:
        self.handle = grpc_call_handler(replayer=None, statuses=_statuses)  # type: ignore[arg-type]

    async def call(self, location: str, payload: dict[str, Any], wait: float) -> GrpcResult | None:
        work = SignedWork("w1", WorkKind.GRPC_CALL, "default", json.dumps(payload), 1, "", "")
        return GrpcResult.from_result(self.handle(work))


def test_the_reply_is_what_dagster_deserializes_as_a_serializable_error() -> None:
    from dagster._grpc.__generated__.dagster_api_pb2 import ListRepositoriesReply
    from dagster._serdes import deserialize_value
    from dagster._utils.error import SerializableErrorInfo

    reply = ListRepositoriesReply.FromString(load_error_reply("the reason\nline two"))
    info = deserialize_value(reply.serialized_list_repositories_response_or_error, SerializableErrorInfo)
    assert info.message == "the reason\nline two" and info.cls_name == "AirlockLocationError"


def test_only_list_repositories_of_a_location_in_error_gets_the_reason() -> None:
    handle = AgentCalls().handle

    def answer(location: str, method: str) -> GrpcResult:
        payload = GrpcCall(location, method, b"", 5.0).to_payload()
        return GrpcResult.from_result(handle(SignedWork("w", WorkKind.GRPC_CALL, "q", json.dumps(payload), 1, "", "")))

    assert answer("refused", LIST_REPOSITORIES).ok
    assert answer("refused", PING).code == "UNAVAILABLE"  # liveness stays honest: nothing runs
    for location in ("starting", "unknown"):  # no reason to give: still starting, or not ours
        assert answer(location, LIST_REPOSITORIES).code == "UNAVAILABLE"


def test_dagsters_own_loader_shows_the_reason_as_the_locations_load_error() -> None:
    from dagster._core.errors import DagsterUserCodeProcessError
    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin

    loop = asyncio.new_event_loop()
    relay = RelayServer("refused", AgentCalls())
    try:
        port = loop.run_until_complete(relay.start())
        import threading

        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        origin = GrpcServerCodeLocationOrigin(host="127.0.0.1", port=port, location_name="refused")
        with pytest.raises(DagsterUserCodeProcessError) as err, dagster.DagsterInstance.ephemeral() as instance:
            origin.create_location(instance)
        assert "airlock: code location 'refused' is not running on this appliance" in str(err.value)
        assert "airlock images allow acme/etl" in str(err.value)
    finally:
        asyncio.run_coroutine_threadsafe(relay.stop(0), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)


# -- the Dagster version window ----------------------------------------------------------------------------
def _list_repositories_reply(version: str) -> GrpcResult:
    from dagster._grpc.types import ListRepositoriesResponse
    from dagster._serdes import serialize_value

    from protocol.dagster_grpc import encode_echo

    response = ListRepositoriesResponse([], dagster_library_versions={"dagster": version})
    return GrpcResult((encode_echo(serialize_value(response)),))


@pytest.mark.parametrize(("location", "ok"), [("1.13.27", True), ("1.13.0", True), ("1.10.3", True),
                                              ("1.9.11", False), ("1.14.0", False), ("2.0.0", False)])
def test_a_location_outside_the_dagster_window_loads_with_that_reason(location: str, ok: bool) -> None:
    from dagster._grpc.__generated__.dagster_api_pb2 import ListRepositoriesReply

    from controlplane.relay.compat import check_answer

    answer = _list_repositories_reply(location)
    checked = check_answer(LIST_REPOSITORIES, answer, control_plane="1.13.27")
    assert (checked is answer) is ok
    if not ok:
        text = ListRepositoriesReply.FromString(checked.responses[0]).serialized_list_repositories_response_or_error
        assert f"runs Dagster {location}" in text and "1.10.0 to 1.13.x" in text and "AirlockVersionError" in text
    assert check_answer(PING, answer, control_plane="1.13.27") is answer  # other methods are never touched
