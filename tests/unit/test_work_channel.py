"""The work channel: handshake and frame authentication (no network), then the real thing on 127.0.0.1 —
uvicorn over TLS with the gateway app, a relay listener on the same event loop, the real ConnectedAgent holding
a channel, and a fake code server. Each refusal is shown next to the same action succeeding where allowed."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from appliance.agent.channel import WorkChannel, channel_url
from appliance.agent.connected import ConnectedAgent, DesiredLocations
from appliance.agent.grpc_replay import CHANNEL_OPTIONS, GrpcReplayer
from appliance.agent.identity import ensure_enrolled, load_or_create_key
from appliance.agent.status import ApplianceStatus
from appliance.agent.transport import GatewayClient, GatewayError, https_client
from appliance.policy import load_policy
from controlplane.gateway import auth as gateway_auth
from controlplane.gateway import channel as gateway_channel
from controlplane.gateway.app import build_app
from controlplane.gateway.channel import ChannelLost
from controlplane.relay.calls import ChannelCalls
from controlplane.relay.server import RelayServer, WorkQueueCalls
from controlplane.tls import ensure_tls
from protocol.channel import (
    MAX_FRAME_BYTES,
    ChannelError,
    Ephemeral,
    FrameOpener,
    FrameSealer,
    accept_hello,
    decode_body,
    encode_body,
    gateway_hello,
)
from protocol.dagster_grpc import PING, decode_echo, encode_echo
from protocol.grpc_calls import GrpcResult
from protocol.signing import SigningKey, sign_request
from protocol.work import WorkKind

ROOT = Path(__file__).resolve().parents[2]


# ---- handshake and frames, no network --------------------------------------------------------------------

def _handshake(queues: tuple[str, ...] = ("default",)) -> tuple[Any, Any, SigningKey, dict[str, Any], Ephemeral]:
    cp, agent_ek = SigningKey.generate(), Ephemeral()
    hello, gateway_keys = gateway_hello(cp, "agent-key", list(queues), agent_ek.public)
    return gateway_keys, cp, cp, hello, agent_ek


def test_both_sides_derive_the_same_keys_and_a_different_pair_per_channel() -> None:
    gateway_keys, _, cp, hello, agent_ek = _handshake()
    channel_id, agent_keys = accept_hello(hello, cp.public_key, "agent-key", ["default"], agent_ek)
    assert channel_id == hello["channel"] and agent_keys == gateway_keys
    assert gateway_keys.up != gateway_keys.down
    assert _handshake()[0] != gateway_keys


@pytest.mark.parametrize("change", ["other pinned key", "other queues", "other agent key", "swapped ek",
                                    "forged signature", "old version"])
def test_a_hello_that_does_not_match_is_refused(change: str) -> None:
    _, _, cp, hello, agent_ek = _handshake()
    pinned, queues, agent_key = cp.public_key, ["default"], "agent-key"
    if change == "other pinned key":
        pinned = SigningKey.generate().public_key
    elif change == "other queues":
        queues = ["default", "gpu"]
    elif change == "other agent key":
        agent_key = "someone-else"
    elif change == "swapped ek":
        hello = {**hello, "ek": Ephemeral().public}
    elif change == "forged signature":
        hello = {**hello, "signature": SigningKey.generate().sign_bytes(b"x")}
    else:
        hello = {**hello, "v": 0}
    with pytest.raises(ChannelError):
        accept_hello(hello, pinned, agent_key, queues, agent_ek)


def test_frames_authenticate_in_order_and_nothing_else_passes() -> None:
    key = b"k" * 32
    sealer, opener = FrameSealer(key), FrameOpener(key)
    first, second = sealer.seal(b'{"a":1}'), sealer.seal(b'{"b":2}')
    assert opener.open(first) == b'{"a":1}' and opener.open(second) == b'{"b":2}'
    for bad in (second,  # replayed
                first[:-1] + b"}",  # same length, altered body
                FrameSealer(b"x" * 32).seal(b'{"c":3}'),  # another key
                b"short", '{"text": 1}'):
        with pytest.raises(ChannelError):
            FrameOpener(key).open(bad) if bad is second else opener.open(bad)
    reorder = FrameOpener(key)
    with pytest.raises(ChannelError, match="frame 0 failed"):
        reorder.open(second)  # the second frame first: its sequence number does not match


def test_frame_bodies_must_be_the_expected_list() -> None:
    assert decode_body(encode_body("work", [{"id": "1"}]), "work") == [{"id": "1"}]
    for body in (b"not json", b"[]", b'{"work": 1}', b'{"work": [1]}', b'{"results": []}'):
        with pytest.raises(ChannelError):
            decode_body(body, "work")


def test_channel_url_follows_the_control_plane_url() -> None:
    assert channel_url("https://cp.example:8443", ["a", "b"], "EK").startswith(
        "wss://cp.example:8443/v1/channel?queues=a%2Cb&ek=EK")
    assert channel_url("http://127.0.0.1:1/base/", ["a"], "E").startswith("ws://127.0.0.1:1/base/v1/channel?")
    with pytest.raises(ValueError):
        channel_url("ftp://x", ["a"], "E")


async def _never_answers(*_args: Any) -> None:
    raise ChannelLost("channel c1 closed")


class _Fallback:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], float]] = []

    async def call(self, location: str, payload: dict[str, Any], wait: float) -> GrpcResult | None:
        self.calls.append((location, payload, wait))
        return GrpcResult((b"from the queue",))


def test_a_call_whose_channel_closes_goes_to_the_queue_with_the_time_left() -> None:
    class LostChannel:
        agent = type("A", (), {"deployment": "prod"})()
        queues, in_flight = ["default"], 0
        call = staticmethod(_never_answers)

    class Hub:
        def pick(self, deployment: str, queue: str) -> Any:
            channel = LostChannel()
            channel.loop = asyncio.get_running_loop()  # type: ignore[attr-defined]
            return channel

    fallback = _Fallback()
    result = asyncio.run(ChannelCalls(Hub(), fallback, "prod", "default").call("loc", {"x": 1}, 30.0))  # type: ignore[arg-type]
    assert result == GrpcResult((b"from the queue",))
    assert fallback.calls[0][:2] == ("loc", {"x": 1}) and 29.0 < fallback.calls[0][2] <= 30.0


def test_unsigned_work_on_a_channel_may_only_be_a_relayed_call() -> None:
    class Stub:
        pinned = None

        def verify_work(self, raw: dict[str, Any]) -> Any:
            raise AssertionError("not reached")

    channel = WorkChannel(None, "c1", FrameSealer(b"k" * 32), FrameOpener(b"k" * 32), Stub())  # type: ignore[arg-type]
    item = {"id": "i1", "kind": "GRPC_CALL", "queue": "default", "payload": "{}", "attempt": 1}
    work = channel._verify(item)
    assert work.kind is WorkKind.GRPC_CALL and work.signed_by == "channel:c1"
    for kind in ("LAUNCH_RUN", "TERMINATE_RUN", "RECONCILE_LOCATIONS"):
        with pytest.raises(Exception, match="must carry the control plane's signature"):
            channel._verify({**item, "kind": kind})


# ---- the real thing on 127.0.0.1 -------------------------------------------------------------------------

class EchoCodeServer(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.seen = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != PING:
            return None

        def ping(request: bytes, _context: grpc.ServicerContext) -> bytes:
            self.seen += 1
            return request

        return grpc.unary_unary_rpc_method_handler(ping)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """Gateway + relay on one event loop (as serve_gateway runs them), one code server, agents on demand."""

    def __init__(self, tmp: Path) -> None:
        import uvicorn

        self.tmp = tmp
        self.app = build_app(sa.create_engine(f"sqlite:///{tmp}/cp.db"), SigningKey.generate(),
                             instance_factory=None)
        self.tls = ensure_tls(str(tmp / "tls"), ["127.0.0.1"])
        self.port = _free_port()
        self.base_url = f"https://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, ssl_certfile=str(self.tls.cert),
                                ssl_keyfile=str(self.tls.key), log_level="warning", ws_max_size=MAX_FRAME_BYTES,
                                ws_per_message_deflate=False, timeout_graceful_shutdown=2)
        gateway_auth.quiet_refused_upgrades()  # as serve_gateway does
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.served = asyncio.run_coroutine_threadsafe(self.server.serve(), self.loop)
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.code = EchoCodeServer()
        self.grpc = grpc.server(futures.ThreadPoolExecutor(4), options=CHANNEL_OPTIONS)
        self.grpc.add_generic_rpc_handlers([self.code])
        self.code_address = f"127.0.0.1:{self.grpc.add_insecure_port('127.0.0.1:0')}"
        self.grpc.start()
        calls = ChannelCalls(self.app.state.hub, WorkQueueCalls(self.app.state.queue, lambda _l: ("prod", "default")),
                             "prod", "default")
        self.relay = RelayServer("loc", calls)
        self.relay_port = self._on_loop(self.relay.start())
        self.stops: list[tuple[threading.Event, threading.Thread]] = []

    def _on_loop(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def client(self, name: str, queues: tuple[str, ...] = ("default",)) -> GatewayClient:
        state = self.tmp / name
        state.mkdir()
        client = GatewayClient(https_client(self.base_url, str(self.tls.ca_cert)), load_or_create_key(str(state)))
        ensure_enrolled(client, str(state), token=self.app.state.store.create_token("prod"), queues=list(queues))
        return client

    def ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.tls.ca_cert))

    def agent(self, name: str) -> tuple[ConnectedAgent, GatewayClient]:
        client = self.client(name)
        replayer = GrpcReplayer()

        class Idle:
            statuses: dict[str, Any] = {}

            def reconcile(self, _locations: object, **_: object) -> ApplianceStatus:
                return ApplianceStatus(name, time.time(), {})

        agent = ConnectedAgent(
            client, Idle(), DesiredLocations(str(self.tmp / name), load_policy(ROOT / "policy")),  # type: ignore[arg-type]
            queues=["default"], state_dir=str(self.tmp / name), reconcile_interval=0.5, heartbeat_interval=0.5,
            handlers={WorkKind.GRPC_CALL: lambda work: replayer.replay(json.loads(work.payload), self.code_address)},
            starters={WorkKind.GRPC_CALL: lambda work, done: replayer.start(json.loads(work.payload),
                                                                            self.code_address, done)},
            open_channel=lambda: WorkChannel.open(client, self.base_url, ["default"], ssl_context=self.ssl()))
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        thread.start()
        self.stops.append((stop, thread))
        return agent, client

    def wait_for_channels(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.app.state.hub) != count:
            assert time.monotonic() < deadline, f"{len(self.app.state.hub)} channel(s) open, expected {count}"
            time.sleep(0.02)

    def ping(self, text: str = "hello", timeout: float = 10.0) -> str:
        with grpc.insecure_channel(f"127.0.0.1:{self.relay_port}", options=CHANNEL_OPTIONS) as channel:
            return decode_echo(channel.unary_unary(PING)(encode_echo(text), timeout=timeout))

    def work_rows(self) -> int:
        with self.app.state.queue._engine.connect() as conn:
            return conn.exec_driver_sql("SELECT count(*) FROM airlock_work_items").scalar_one()

    def audit(self) -> list[Any]:
        return self.app.state.store.audit_entries(500)

    def close(self) -> None:
        for stop, _thread in self.stops:
            stop.set()
        for _stop, thread in self.stops:
            thread.join(10)
        self._on_loop(self.relay.stop(0))
        self.server.should_exit = True
        self.served.result(15)
        self.grpc.stop(0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    yield s
    s.close()


def test_a_relayed_call_goes_down_the_channel_without_touching_the_queue(stack: Stack) -> None:
    stack.agent("a1")
    stack.wait_for_channels(1)
    rows_before = stack.work_rows()
    assert [stack.ping(f"n{i}") for i in range(20)] == [f"n{i}" for i in range(20)]
    assert stack.code.seen == 20
    assert stack.work_rows() == rows_before  # no GRPC_CALL row: it never went through the database
    opened = [e for e in stack.audit() if e.operation.startswith("channel ") and "opened" in e.reason]
    assert opened and opened[0].accepted


def test_messages_far_over_the_gateways_body_limit_cross_the_channel(stack: Stack) -> None:
    """Dagster allows 100 MB messages; a 30 MB request and answer (base64 in JSON: ~40 MB frames) go through."""
    stack.agent("a1")
    stack.wait_for_channels(1)
    big = "x" * (30 * 1024 * 1024)
    assert stack.ping(big, timeout=60) == big


def test_without_a_channel_the_call_is_queued_and_a_channel_opened_later_takes_it(stack: Stack) -> None:
    answer: futures.Future[str] = futures.Future()
    threading.Thread(target=lambda: answer.set_result(stack.ping("late", timeout=20)), daemon=True).start()
    deadline = time.monotonic() + 5
    while stack.work_rows() == 0:
        assert time.monotonic() < deadline, "the call was not queued"
        time.sleep(0.02)
    stack.agent("a1")  # the pump claims the queued, signed item and the result completes it
    assert answer.result(20) == "late"


def test_durable_work_arrives_signed_over_the_channel_and_is_completed_in_the_queue(stack: Stack) -> None:
    stack.agent("a1")
    stack.wait_for_channels(1)
    queue = stack.app.state.queue
    item = queue.enqueue("prod", "default", "RECONCILE_LOCATIONS", {"locations": []})
    deadline = time.monotonic() + 10
    while (result := queue.result(item)) is None:
        assert time.monotonic() < deadline, "no result for the queued item"
        time.sleep(0.02)
    assert result.status == "done" and result.result == {"accepted": [], "refused": {}}


def test_a_channel_that_goes_away_is_reopened_and_calls_keep_working(stack: Stack) -> None:
    stack.agent("a1")
    stack.wait_for_channels(1)
    assert stack.ping("before") == "before"
    channel = stack.app.state.hub._channels[0]
    stack._on_loop(channel.websocket.close(code=1012))  # e.g. the gateway restarting
    deadline = time.monotonic() + 10
    while stack.app.state.hub._channels in ([], [channel]):
        assert time.monotonic() < deadline, "the agent did not reopen its channel"
        time.sleep(0.05)
    assert stack.ping("after") == "after"


def _upgrade(stack: Stack, client: GatewayClient | None, *, queues: str = "default",
             replay: tuple[str, dict[str, str]] | None = None) -> tuple[Any, tuple[str, dict[str, str]]]:
    url = f"wss://127.0.0.1:{stack.port}/v1/channel?queues={queues}&ek={Ephemeral().public}"
    headers = sign_request("GET", url.replace("wss", "https", 1), {}, b"", client.key) if client else {}
    url, headers = replay or (url, headers)
    return connect(url, ssl=stack.ssl(), additional_headers=headers, open_timeout=5, legacy=True), (url, headers)


def _refused(stack: Stack, client: GatewayClient | None, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as caught:
        _upgrade(stack, client, **kwargs)
    response = caught.value.response
    return response.status_code, json.loads(response.body)["errors"][0]["message"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_upgrades_that_are_not_an_enrolled_agents_are_refused_with_a_reason(stack: Stack) -> None:
    uvicorn_log = _Records()
    logging.getLogger("uvicorn.error").addHandler(uvicorn_log)
    try:
        client = stack.client("a1")
        connection, sent = _upgrade(stack, client)  # allowed: the same request, signed by an enrolled key
        assert json.loads(connection.recv(timeout=5))["channel"]
        connection.close()
        assert _refused(stack, None)[0] == 401  # unsigned
        status, message = _refused(stack, client, replay=sent)  # the same signed upgrade again
        assert status == 401 and "nonce" in message.lower()
        assert _refused(stack, client, queues="gpu") == (403, "queues ['gpu'] are not among this agent's labels")
        stranger = GatewayClient(https_client(stack.base_url, str(stack.tls.ca_cert)), SigningKey.generate())
        status, message = _refused(stack, stranger)
        assert status == 401 and "not registered" in message
        refused = [e for e in stack.audit() if e.operation == "GET /v1/channel" and not e.accepted]
        assert len(refused) == 4
        # A refusal is an answer, not a server error: nothing at ERROR in uvicorn's log (its sansio bug, filtered).
        assert [r.getMessage() for r in uvicorn_log.records if r.levelno >= logging.ERROR] == []
    finally:
        logging.getLogger("uvicorn.error").removeHandler(uvicorn_log)


def test_the_refused_upgrade_filter_drops_only_uvicorns_line_after_a_refusal() -> None:
    logger = logging.getLogger(f"test-quiet-{time.monotonic_ns()}")
    logger.propagate, seen = False, _Records()
    logger.addHandler(seen)
    gateway_auth.quiet_refused_upgrades(logger)
    gateway_auth.quiet_refused_upgrades(logger)
    assert len(logger.filters) == 1
    incomplete = "ASGI callable returned without completing handshake."

    def refused_connection() -> None:
        gateway_auth._upgrade_refused.set(True)
        logger.error(incomplete)  # dropped: this connection's upgrade was refused by the middleware
        logger.error("Exception in ASGI application")  # any other error still shows

    contextvars.copy_context().run(refused_connection)
    logger.error(incomplete)  # an app that really returned without answering: still an ERROR
    assert [r.getMessage() for r in seen.records] == ["Exception in ASGI application", incomplete]


def test_a_revoked_agent_cannot_open_a_channel_and_its_open_one_is_closed(stack: Stack, monkeypatch) -> None:
    monkeypatch.setattr(gateway_channel, "AGENT_RECHECK", 0.2)
    client = stack.client("a1")
    channel = WorkChannel.open(client, stack.base_url, ["default"], ssl_context=stack.ssl())
    agent = stack.app.state.store.by_key(client.key.key_id)
    stack.app.state.store.revoke(agent.id)
    with pytest.raises(Exception, match="closed"):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            channel.receive(timeout=0.2)
    with pytest.raises(GatewayError) as refused:
        WorkChannel.open(client, stack.base_url, ["default"], ssl_context=stack.ssl())
    assert refused.value.status == 403 and "revoked" in str(refused.value)


def test_a_forged_frame_closes_the_channel_and_a_genuine_one_is_taken(stack: Stack) -> None:
    client = stack.client("a1")
    stack.app.state.queue.enqueue("prod", "default", "RECONCILE_LOCATIONS", {"locations": []})
    genuine = WorkChannel.open(client, stack.base_url, ["default"], ssl_context=stack.ssl())
    deadline = time.monotonic() + 5
    while not (works := genuine.receive(timeout=0.5)):
        assert time.monotonic() < deadline
    assert genuine.send_results([{"id": works[0].id, "ok": True, "payload": "{}"}])  # allowed: a real frame
    while stack.app.state.queue.result(works[0].id) is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    forged_key = FrameSealer(b"\0" * 32)
    genuine.connection.send(forged_key.seal(encode_body("results", [{"id": "x", "ok": True}])))
    with pytest.raises(ConnectionClosed) as closed:
        genuine.connection.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    refused = [e for e in stack.audit() if e.operation == f"channel {genuine.id}" and not e.accepted]
    assert refused and "failed authentication" in refused[0].reason


def test_a_text_frame_after_the_hello_closes_the_channel(stack: Stack) -> None:
    client = stack.client("a1")
    channel = WorkChannel.open(client, stack.base_url, ["default"], ssl_context=stack.ssl())
    channel.connection.send('{"results": []}')
    with pytest.raises(ConnectionClosed) as closed:
        channel.connection.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    refused = [e for e in stack.audit() if e.operation == f"channel {channel.id}" and not e.accepted]
    assert refused and "not a binary frame" in refused[0].reason


def test_the_work_channel_setting_takes_channel_or_poll_only() -> None:
    from appliance.settings import Settings

    assert Settings.from_env({}).work_channel == "channel"
    assert Settings.from_env({"AIRLOCK_WORK_CHANNEL": "poll"}).work_channel == "poll"
    with pytest.raises(ValueError, match="AIRLOCK_WORK_CHANNEL='websocket'"):
        Settings.from_env({"AIRLOCK_WORK_CHANNEL": "websocket"})
