"""The relay's compiled data path on 127.0.0.1: caller -> edge -> Noise tunnel -> agent's child -> code server,
with the Python relay (the real RelayServer, an in-memory queue and a GrpcReplayer agent) behind the edge.

The real `airlock-fastpath` binary runs, driven by the real owners (controlplane/relay/fastpath.py and
appliance/agent/fastpath.py). Which road a call took is observable: the Python road puts it in
`MemoryCalls.submitted`, the tunnel does not; the fake code server counts what reached it.
Build the binary first: `make fastpath` (`make test` and `make unit` do).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from appliance.agent.fastpath import RELAYED, FastPathTunnel, tunnel_address
from controlplane.relay import RelayLimits, RelayServer
from controlplane.relay.fastpath import FAST_METHODS, FastPathEdge
from controlplane.relay.scrub import CARRIES_INSTANCE_REF
from protocol.channel import Ephemeral, transcript
from protocol.dagster_grpc import SERVICE
from protocol.fastpath import find_binary
from protocol.grpc_calls import BY_PATH, METHODS, Arity
from tests.unit.grpc_fakes import OPTIONS, FakeCodeServer, MemoryCalls, run_agent, stream_answers, unary_answer

PING, STREAMING_PING = BY_PATH[f"/{SERVICE}/Ping"], BY_PATH[f"/{SERVICE}/StreamingPing"]
GET_SERVER_ID, START_RUN = BY_PATH[f"/{SERVICE}/GetServerId"], BY_PATH[f"/{SERVICE}/StartRun"]


@pytest.fixture(scope="module")
def binary() -> str:
    found = find_binary("auto")
    if found is None:
        pytest.fail("airlock-fastpath is not built: run `make fastpath` (cargo build --release in fastpath/)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class FastStack:
    """Python relay + edge in front of it on the loop thread; the agent's tunnel child; a caller channel."""

    def __init__(self, loop: asyncio.AbstractEventLoop, binary: str, code_server: str,
                 limits: RelayLimits | None = None) -> None:
        self.loop, self.binary, self.code_server = loop, binary, code_server
        self.calls = MemoryCalls()
        from appliance.agent.grpc_replay import GrpcReplayer

        self.replayer, self._stop = GrpcReplayer(), threading.Event()
        self._agent = threading.Thread(target=run_agent, args=(self.calls, self.replayer, code_server, self._stop))
        self._agent.start()
        self.relay = RelayServer("loc", self.calls, limits=limits)
        python_port = self.run(self.relay.start())
        self.edge = FastPathEdge(binary, "127.0.0.1:0", limits=limits, stats_seconds=0.2)
        self.run(self.edge.start())
        self.port = self.run(self.edge.listen("loc", f"127.0.0.1:{free_port()}", f"127.0.0.1:{python_port}", "prod",
                                              "default"))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=OPTIONS)
        self.key = os.urandom(32)
        self.tunnel = FastPathTunnel(binary)

    def run(self, coro: object, timeout: float = 15.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def on_loop(self, fn: object, *args: object) -> None:
        self.loop.call_soon_threadsafe(fn, *args)  # type: ignore[arg-type]

    def open_tunnel(self, channel: str = "chan-1", key: bytes | None = None, queues: tuple[str, ...] = ("default",)
                    ) -> None:
        self.on_loop(self.edge.ticket, channel, self.key, "prod", list(queues))
        self.tunnel.servers({"loc": self.code_server})
        self.tunnel.connect(channel, key or self.key, tunnel_address("https://127.0.0.1", self.edge.bound_port))

    def wait_up(self) -> None:
        wait_for(lambda: self.tunnel.up.is_set() and self.edge.tunnels_up, "the tunnel")

    def unary(self, path: str, request: bytes, timeout: float | None = 5.0) -> bytes:
        return self.channel.unary_unary(path)(request, timeout=timeout)

    def python_road(self) -> list[str]:
        return [payload["method"] for _, payload, _ in self.calls.submitted]

    def close(self) -> None:
        self.channel.close()
        self.tunnel.close()
        self.run(self.edge.stop())
        self.run(self.relay.stop(0))
        self._stop.set()
        self._agent.join(5)
        self.replayer.close()


@pytest.fixture
def fast(loop: asyncio.AbstractEventLoop, binary: str, code_server: tuple[FakeCodeServer, str]) -> Iterator[FastStack]:
    stack = FastStack(loop, binary, code_server[1])
    yield stack
    stack.close()


# ---- which calls may take the tunnel --------------------------------------------------------------------

def test_only_plain_relayed_methods_may_take_the_tunnel() -> None:
    fast = set(FAST_METHODS)
    assert f"/{SERVICE}/Ping" in fast and f"/{SERVICE}/StreamingExternalRepository" in fast
    for method in METHODS:
        if not method.relayed:  # refusals stay with the Python relay's table and its decision log
            assert method.path not in fast, method.path
    assert not fast & CARRIES_INSTANCE_REF  # the control plane's InstanceRef is scrubbed in Python only
    assert GET_SERVER_ID.path not in fast  # cached in Python
    assert f"/{SERVICE}/ReloadCode" not in fast  # drops that cache
    assert set(RELAYED) == {m.path for m in METHODS if m.relayed}  # the agent's own list: the replayer's rule


def test_both_ends_of_a_channel_derive_the_same_tunnel_key_and_the_frame_keys_did_not_change() -> None:
    import hashlib

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    agent, gateway = Ephemeral(), Ephemeral()
    signed = transcript("key-1", ["default"], agent.public, gateway.public, "chan-1")
    mine, theirs = agent.derive(gateway.public, signed), gateway.derive(agent.public, signed)
    assert mine == theirs and len(mine.fastpath) == 32
    assert len({mine.up, mine.down, mine.fastpath}) == 3
    # The frame keys are HKDF's first 64 bytes, exactly as before the tunnel key was added: an agent of the
    # previous release still talks to this gateway.
    shared = agent._private.exchange(gateway._private.public_key())
    okm64 = HKDF(hashes.SHA256(), 64, hashlib.sha256(signed).digest(), b"airlock-channel-v1 keys").derive(shared)
    assert mine.down + mine.up == okm64


# ---- the roads ------------------------------------------------------------------------------------------

def test_a_plain_call_takes_the_tunnel_and_gets_the_code_servers_exact_bytes(
        fast: FastStack, code_server: tuple[FakeCodeServer, str]) -> None:
    fast.open_tunnel()
    fast.wait_up()
    before = code_server[0].hits[PING.path]
    assert fast.unary(PING.path, b"hello") == unary_answer(PING.path, b"hello")
    stream = list(fast.channel.unary_stream(STREAMING_PING.path)(b"s", timeout=5))
    assert stream == stream_answers(STREAMING_PING.path, b"s")
    with pytest.raises(grpc.RpcError) as failed:  # the code server's own error, code and details, untouched
        fast.unary(PING.path, b"fail")
    assert failed.value.code() is grpc.StatusCode.NOT_FOUND and "no such thing" in failed.value.details()
    assert code_server[0].hits[PING.path] == before + 2
    assert fast.python_road() == []  # none of them was queued
    wait_for(lambda: fast.edge.roads["tunnel"] == 3, "the edge's report of the roads")
    assert fast.edge.roads["python"] == 0


@pytest.fixture(scope="module")
def tunnelled(loop: asyncio.AbstractEventLoop, binary: str,
              code_server: tuple[FakeCodeServer, str]) -> Iterator[FastStack]:
    stack = FastStack(loop, binary, code_server[1])
    stack.open_tunnel()
    stack.wait_up()
    yield stack
    stack.close()


@pytest.mark.parametrize("path", FAST_METHODS)
def test_every_fast_method_crosses_the_tunnel_untouched(tunnelled: FastStack, path: str) -> None:
    method = BY_PATH[path]
    request = b"request-" + path.encode()
    if method.arity is Arity.UNARY_STREAM:
        answer = list(tunnelled.channel.unary_stream(path)(request, timeout=5))
        assert answer == stream_answers(path, request)
    else:
        assert tunnelled.unary(path, request) == unary_answer(path, request)
    assert path not in tunnelled.python_road()


def test_the_methods_doc_names_each_methods_road() -> None:
    """docs/GRPC_METHODS.md's table says which road each method takes; it must say what the code does."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "GRPC_METHODS.md").read_text()
    roads = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in ("DagsterApi", "Health"):
            service = SERVICE if cells[0] == "DagsterApi" else "grpc.health.v1.Health"
            roads[f"/{service}/{cells[1]}"] = cells[4]
    assert {p for p, road in roads.items() if road == "fast path"} == set(FAST_METHODS)
    assert {p for p, road in roads.items() if road == "Python relay"} == set(RELAYED) - set(FAST_METHODS)


def test_every_other_call_takes_the_python_relay_and_its_verdicts(fast: FastStack) -> None:
    fast.open_tunnel()
    fast.wait_up()
    with pytest.raises(grpc.RpcError) as refused:
        fast.unary(START_RUN.path, b"x")
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "airlock relay refuses" in refused.value.details()
    assert fast.unary(GET_SERVER_ID.path, b"") == unary_answer(GET_SERVER_ID.path, b"")
    with pytest.raises(grpc.RpcError) as unknown:
        fast.unary("/api.DagsterApi/NoSuchMethod", b"")
    assert unknown.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert fast.python_road() == [GET_SERVER_ID.path]  # the refused and unknown ones were never queued


def test_without_a_tunnel_plain_calls_take_the_python_relay(fast: FastStack) -> None:
    assert fast.unary(PING.path, b"a") == unary_answer(PING.path, b"a")  # no channel has opened a tunnel
    fast.open_tunnel(queues=("other-queue",))  # a tunnel of an agent that does not serve this location's queue
    fast.wait_up()
    assert fast.unary(PING.path, b"b") == unary_answer(PING.path, b"b")
    assert fast.python_road() == [PING.path, PING.path]


def test_a_closed_channel_closes_its_tunnel(fast: FastStack) -> None:
    fast.open_tunnel()
    fast.wait_up()
    fast.unary(PING.path, b"a")
    fast.on_loop(fast.edge.revoke, "chan-1")
    wait_for(lambda: not fast.edge.tunnels_up, "the edge to close the tunnel")
    assert fast.unary(PING.path, b"b") == unary_answer(PING.path, b"b")
    assert fast.python_road() == [PING.path]
    time.sleep(0.5)  # the agent redials; the edge refuses a channel it no longer knows
    assert not fast.edge.tunnels_up


def test_a_tunnel_with_the_wrong_key_is_refused_and_the_right_key_is_accepted(
        fast: FastStack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="airlock.relay.fastpath")
    fast.open_tunnel(key=os.urandom(32))
    wait_for(lambda: "decision=refuse" in caplog.text, "the edge's refusal")
    assert "does not authenticate" in caplog.text
    assert not fast.edge.tunnels_up and not fast.tunnel.up.is_set()
    fast.unary(PING.path, b"a")
    assert fast.python_road() == [PING.path]
    fast.tunnel.connect("chan-1", fast.key, tunnel_address("https://127.0.0.1", fast.edge.bound_port))
    fast.wait_up()
    fast.unary(PING.path, b"b")
    assert fast.python_road() == [PING.path]


def test_the_agent_forwards_only_relayed_methods_and_only_to_its_own_code_servers(
        fast: FastStack, code_server: tuple[FakeCodeServer, str]) -> None:
    # An edge that would tunnel StartRun (a compromised or buggy control plane): the agent's child refuses it.
    fast.edge._send(op="methods", methods=[*FAST_METHODS, START_RUN.path])
    fast.open_tunnel()
    fast.wait_up()
    with pytest.raises(grpc.RpcError) as refused:
        fast.unary(START_RUN.path, b"x")
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "airlock agent refuses" in refused.value.details()
    assert code_server[0].hits[START_RUN.path] == 0
    fast.tunnel.servers({"elsewhere": fast.code_server})  # this appliance no longer serves "loc"
    refusals: list[grpc.RpcError] = []

    def refused_now() -> bool:  # the child applies the new map a moment after it is sent
        try:
            fast.unary(PING.path, b"y")
        except grpc.RpcError as exc:
            refusals.append(exc)
            return True
        return False

    wait_for(refused_now, "the agent's child to drop the location")
    assert refusals[0].code() is grpc.StatusCode.UNAVAILABLE
    assert "has no code server on this appliance" in refusals[0].details()


def test_deadlines_hold_on_the_tunnel(loop: asyncio.AbstractEventLoop, binary: str,
                                      code_server: tuple[FakeCodeServer, str]) -> None:
    stack = FastStack(loop, binary, code_server[1], limits=RelayLimits(default_wait=0.5))
    try:
        stack.open_tunnel()
        stack.wait_up()
        with pytest.raises(grpc.RpcError) as late:
            stack.unary(PING.path, b"sleep:1.0", timeout=0.3)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError) as unbounded:  # no deadline: the relay's default wait bounds it
            stack.unary(PING.path, b"sleep:1.5", timeout=None)
        assert unbounded.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "0.5" in unbounded.value.details() or "Deadline" in unbounded.value.details()
        with pytest.raises(grpc.RpcError) as absurd:  # "forever" (more than a day) is no deadline at all
            stack.unary(PING.path, b"sleep:1.5", timeout=10 * 86_400)
        assert absurd.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert stack.unary(PING.path, b"sleep:0.1", timeout=5) == unary_answer(PING.path, b"sleep:0.1")
        assert stack.python_road() == []
    finally:
        stack.close()


def test_a_tunnel_lost_before_the_answer_hands_the_call_to_the_python_relay(fast: FastStack) -> None:
    fast.open_tunnel()
    fast.wait_up()
    process = fast.tunnel._process
    assert process is not None
    threading.Timer(0.3, process.kill).start()  # the appliance's end dies while the code server works
    assert fast.unary(PING.path, b"sleep:1.0", timeout=10) == unary_answer(PING.path, b"sleep:1.0")
    assert fast.python_road() == [PING.path]


def test_a_dead_edge_is_started_again_and_told_everything_again(fast: FastStack) -> None:
    fast.open_tunnel()
    fast.wait_up()
    first = fast.edge._process
    assert first is not None
    first.kill()
    wait_for(lambda: fast.edge._process is not first and fast.edge.tunnels_up, "the edge back with the tunnel",
             timeout=20)
    assert fast.unary(PING.path, b"again") == unary_answer(PING.path, b"again")
    assert fast.python_road() == []


def test_a_request_over_dagsters_message_limit_is_refused(fast: FastStack) -> None:
    fast.open_tunnel()
    fast.wait_up()
    big = grpc.insecure_channel(f"127.0.0.1:{fast.port}", options=[("grpc.max_send_message_length", 200 << 20)])
    try:
        with pytest.raises(grpc.RpcError) as refused:
            big.unary_unary(PING.path)(b"x" * (100 * 1024 * 1024 + 1), timeout=30)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert big.unary_unary(PING.path)(b"x" * 1024, timeout=5) == unary_answer(PING.path, b"x" * 1024)
    finally:
        big.close()


def test_the_agent_takes_only_a_well_formed_offer_and_dials_the_gateways_own_host() -> None:
    from appliance.agent.channel import _offered_port

    key = b"k" * 32
    assert _offered_port({"fastpath": {"port": 8450}}, key) == (8450, key)
    for offer in ({}, {"fastpath": None}, {"fastpath": {"port": "8450"}}, {"fastpath": {"port": True}},
                  {"fastpath": {"port": 0}}, {"fastpath": {"port": 65536}}, {"fastpath": 8450}):
        assert _offered_port(offer, key) is None, offer
    assert tunnel_address("https://cp.example.internal:8443/base", 8450) == "cp.example.internal:8450"
    assert tunnel_address("https://[fd00::1]:8443", 8450) == "[fd00::1]:8450"
    with pytest.raises(ValueError):
        tunnel_address("https:///nohost", 8450)


def test_a_code_server_replaced_at_the_same_address_answers_the_next_call(fast: FastStack) -> None:
    """The tunnel end keeps one connection per code server; a new container at the same address (the agent's
    replacement keeps the name) must not cost a failed call."""
    from concurrent import futures

    port = free_port()

    def serve() -> grpc.Server:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=OPTIONS)
        server.add_generic_rpc_handlers([FakeCodeServer()])
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        return server

    first = serve()
    fast.code_server = f"127.0.0.1:{port}"
    fast.open_tunnel()
    fast.wait_up()
    assert fast.unary(PING.path, b"one") == unary_answer(PING.path, b"one")
    first.stop(0).wait()
    second = serve()
    try:
        time.sleep(0.2)  # the old connection's end has reached the tunnel end
        assert fast.unary(PING.path, b"two") == unary_answer(PING.path, b"two")
        assert fast.python_road() == []
    finally:
        second.stop(0)
