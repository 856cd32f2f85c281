"""sockguard end to end without Docker: the real docker SDK -> sockguard -> a fake engine on a unix socket."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import docker
import docker.errors
import h11
import pytest

from appliance.labels import MANAGED, ROLE
from appliance.policy import load_policy
from appliance.policy.operator import LiveImages, OperatorImages, parse_reference, write_operator_images
from appliance.sockguard import load_table, rules
from appliance.sockguard.app import Sockguard

REPO_POLICY = Path(__file__).resolve().parents[2] / "policy"
MINE, NET, CREATED = "a" * 64, "d" * 64, "9" * 64
IMAGE = "airlock/example-location:latest"
USER_IMAGE, USER_IMAGE_ID = "acme/etl:1.4", "sha256:" + "2" * 64


@dataclass
class Seen:
    connection: int
    method: str
    target: str
    body: bytes

    @property
    def path(self) -> str:
        return re.sub(r"^/v\d+\.\d+", "", urlsplit(self.target).path)


@dataclass
class FakeEngine:
    """Just enough of dockerd: answers look-ups, accepts creates, streams logs; records every request."""

    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    connections: int = 0
    hung_up: list[int] = field(default_factory=list)
    close_after_answer: bool = False  # an engine whose keep-alive ends right after each answer
    unanswered: dict[str, int] = field(default_factory=dict)  # "METHOD /path": read, then drop, this many times

    def docs(self, path: str) -> Any:
        if re.fullmatch(r"/containers/(appliance|c{64})/json", path):
            return {"Id": "c" * 64, "Config": {"Labels": {ROLE: "appliance"}, "Tty": False}}
        containers = {"mine": MINE, MINE: MINE, CREATED: CREATED}
        if m := re.fullmatch(r"/containers/([^/]+)/json", path):
            if m[1] not in containers:
                return None
            return {"Id": containers[m[1]], "Name": "/x", "Config": {"Labels": {MANAGED: "true"}, "Tty": False}}
        networks = {"airlock-net": NET, NET: NET, CREATED: CREATED}
        if m := re.fullmatch(r"/networks/([^/]+)", path):
            found = m[1] in networks
            return {"Id": networks.get(m[1]), "Internal": True, "Labels": {MANAGED: "true"}} if found else None
        if path == f"/images/{IMAGE}/json":
            return {"Id": "sha256:" + "1" * 64, "RepoTags": [IMAGE], "RepoDigests": []}
        if path == f"/images/{USER_IMAGE}/json":  # a user's own image: not in the baked-in policy
            return {"Id": USER_IMAGE_ID, "RepoTags": [USER_IMAGE], "RepoDigests": []}
        return {
            "/version": {"ApiVersion": "1.41", "Version": "20.10.24", "MinAPIVersion": "1.12"},
            "/containers/json": [],
            "/networks": [],
        }.get(path)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, conn = self.connections, h11.Connection(h11.SERVER)
        try:
            while isinstance(request := await _next(conn, reader), h11.Request):
                body = b""
                while isinstance(event := await _next(conn, reader), h11.Data):
                    body += event.data
                seen = Seen(number, request.method.decode(), request.target.decode(), body)
                self.seen.append(seen)
                if self.unanswered.get(key := f"{seen.method} {seen.path}", 0) > 0:
                    self.unanswered[key] -= 1
                    return
                await self.answer(conn, reader, writer, seen)
                if self.close_after_answer:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
    ) -> None:
        if seen.path.endswith("/logs"):
            writer.write(conn.send(h11.Response(status_code=200, headers=[
                ("content-type", "application/vnd.docker.multiplexed-stream")])))
            writer.write(conn.send(h11.Data(data=_frame(b"first\n"))))
            await writer.drain()
            for _ in range(500):  # the second frame only once the client has seen the first: proves streaming
                if self.release.is_set():
                    break
                if reader.at_eof():
                    self.hung_up.append(seen.connection)
                    return
                await asyncio.sleep(0.01)
            writer.write(conn.send(h11.Data(data=_frame(b"second\n"))) + conn.send(h11.EndOfMessage()))
            return
        status, doc = 200, self.docs(seen.path)
        if seen.method == "POST" and seen.path in {"/containers/create", "/networks/create"}:
            status, doc = 201, {"Id": CREATED, "Warnings": []}
        if seen.path == "/_ping":
            doc = "OK"
        if re.fullmatch(r"/(containers|networks)/[0-9a-f]{64}(/start|/stop|/connect|/disconnect)?", seen.path) and (
            seen.method in {"POST", "DELETE"}
        ):
            writer.write(conn.send(h11.Response(status_code=204, headers=[])) + conn.send(h11.EndOfMessage()))
            return
        if doc is None:
            status, doc = 404, {"message": f"no such object: {seen.path}"}
        body = doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        data = conn.send(h11.Response(status_code=status, headers=headers))
        data += b"" if seen.method == "HEAD" else conn.send(h11.Data(data=body))
        writer.write(data + conn.send(h11.EndOfMessage()))
        await writer.drain()

    def created(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST" and s.path == "/containers/create"]


def _frame(payload: bytes) -> bytes:
    return struct.pack(">BxxxL", 1, len(payload)) + payload


async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await reader.read(65536))
    return event


class CountingSockguard(Sockguard):
    accepted = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await super().handle(reader, writer)


@dataclass
class Stack:
    engine: FakeEngine
    guard: CountingSockguard
    socket: str
    log: io.StringIO
    policy: Any
    operator_file: Path

    def client(self, **kw: Any) -> docker.DockerClient:
        return docker.DockerClient(base_url=f"unix://{self.socket}", timeout=10, **kw)

    def decisions(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


@pytest.fixture
def stack() -> Iterator[Stack]:
    tmp = Path(tempfile.mkdtemp(prefix="sg-", dir="/tmp"))  # short: unix socket paths max out at 108 bytes
    policy_dir = REPO_POLICY
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    engine, log, policy = FakeEngine(), io.StringIO(), load_policy(policy_dir)
    engine_server = run(asyncio.start_unix_server(engine.handle, path=str(tmp / "engine.sock")))
    operator = tmp / "operator-images.yaml"
    guard = CountingSockguard(upstream=str(tmp / "engine.sock"), policy=policy,
                              table=load_table(policy_dir, rules.CHECKS), log=log,
                              images=LiveImages(policy.images, operator))
    guard_server = run(guard.listen(str(tmp / "sg.sock"), mode=0o660))
    try:
        yield Stack(engine, guard, str(tmp / "sg.sock"), log, policy, operator)
    finally:
        async def shutdown() -> None:
            for server in (guard_server, engine_server):
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        run(shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        shutil.rmtree(tmp, ignore_errors=True)


def hardened_kwargs(client: docker.DockerClient, policy: Any, **host: Any) -> dict[str, Any]:
    limits = policy.hardening.limits
    host_config = dict(
        cap_drop=["ALL"], security_opt=["no-new-privileges", f"seccomp={policy.hardening.seccomp_profile}"],
        read_only=True, mem_limit=limits.memory, memswap_limit=limits.memory, nano_cpus=limits.nano_cpus,
        pids_limit=limits.pids, init=True, network_mode="airlock-net", tmpfs=dict(policy.hardening.tmpfs),
        log_config={"type": "json-file", "config": {"max-size": "10m"}}, runtime="runc",
    )
    host_config.update(host)
    return dict(
        image=IMAGE, user="10001:10001", command=["dagster", "api", "grpc"], labels={MANAGED: "true", ROLE: "run"},
        host_config=client.api.create_host_config(**host_config),
        networking_config=client.api.create_networking_config(
            {"airlock-net": client.api.create_endpoint_config(aliases=["demo"])}),
    )


def test_ping_version_and_keepalive_with_the_sdk(stack: Stack) -> None:
    client = stack.client()  # version=None: the SDK asks GET /version first
    try:
        assert client.ping() is True
        assert client.version()["ApiVersion"] == "1.41"
        assert client.ping() is True
    finally:
        client.close()
    forwarded = [s for s in stack.engine.seen if s.path in {"/_ping", "/version"}]
    assert len(forwarded) == 4
    # requests' pool opens a few connections of its own (it does so against dockerd too); what matters is
    # that sockguard kept one serving several requests, with one engine connection behind each client one
    assert stack.guard.accepted == len({s.connection for s in forwarded}) < len(forwarded)
    assert all(d["event"] == "sockguard.decision" and d["allow"] for d in stack.decisions())


def test_forbidden_create_never_reaches_the_engine(stack: Stack) -> None:
    client = stack.client(version="1.41")
    try:
        with pytest.raises(docker.errors.APIError) as caught:
            client.api.create_container(**hardened_kwargs(client, stack.policy, privileged=True))
    finally:
        client.close()
    assert caught.value.response.status_code == 403
    assert "airlock sockguard refused privileged" in caught.value.explanation
    assert stack.engine.created() == []
    denied = [d for d in stack.decisions() if not d["allow"]]
    assert denied == [{"event": "sockguard.decision", "allow": False, "rule": "privileged",
                       "reason": "HostConfig.Privileged is true", "method": "POST", "path": "/containers/create"}]


def test_allowed_create_reaches_the_engine_unchanged(stack: Stack) -> None:
    client = stack.client(version="1.41")
    try:
        created = client.api.create_container(name="airlock-demo", **hardened_kwargs(client, stack.policy))
    finally:
        client.close()
    assert created["Id"] == CREATED
    [seen] = stack.engine.created()
    assert seen.target == "/v1.41/containers/create?name=airlock-demo"
    body = json.loads(seen.body)
    assert body["HostConfig"]["ReadonlyRootfs"] is True and body["User"] == "10001:10001"
    # byte for byte: what a raw client sends is what the engine receives
    raw = json.dumps(body, indent=1).encode()
    status, _ = raw_request(stack.socket, "POST", "/v1.41/containers/create", raw)
    assert status == 201 and stack.engine.created()[-1].body == raw


def test_launcher_style_lifecycle_through_the_high_level_sdk(stack: Stack) -> None:
    """containers.create/start/logs/remove as appliance/launcher drives them, each allowed end to end."""
    h, limits = stack.policy.hardening, stack.policy.hardening.limits
    stack.engine.release.set()
    client = stack.client(version="1.41")
    try:
        container = client.containers.create(
            image=IMAGE, command=["dagster", "api", "grpc"], environment={"HOME": "/home/dagster"},
            network="airlock-net", hostname="demo-code-server", user=h.user, cap_drop=["ALL"],
            security_opt=["no-new-privileges:true", f"seccomp={h.seccomp_profile}"], read_only=True,
            tmpfs=dict(h.tmpfs), mem_limit=limits.memory, memswap_limit=limits.memory, nano_cpus=limits.nano_cpus,
            pids_limit=limits.pids, init=True, runtime=h.runtime, ipc_mode="private",
            log_config={"Type": "json-file", "Config": {"max-size": h.log_max_size}},
            restart_policy={"Name": "on-failure", "MaximumRetryCount": 5},
            healthcheck={"test": ["CMD", "true"], "interval": 30_000_000_000},
            labels={MANAGED: "true", ROLE: "code-server"}, name="airlock-demo",
        )
        container.start()
        assert b"first" in container.logs(tail=30)
        container.remove(force=True)  # docker-py sends link=False: must not read as a link removal
    finally:
        client.close()
    assert [d["rule"] for d in stack.decisions() if not d["allow"]] == []
    assert any(s.method == "DELETE" and s.path == f"/containers/{CREATED}" for s in stack.engine.seen)


def test_launcher_style_networks_through_the_high_level_sdk(stack: Stack) -> None:
    client = stack.client(version="1.41")
    try:
        assert client.networks.list(names=["airlock-net"], filters={"label": [f"{ROLE}=network"]}) == []
        network = client.networks.create("airlock-x", driver="bridge", internal=True, check_duplicate=True,
                                          options={"com.docker.network.bridge.inhibit_ipv4": "true"},
                                          labels={MANAGED: "true", ROLE: "network"})
        network.connect("appliance", aliases=["airlock-egress"])
        network.disconnect("appliance", force=True)
        network.remove()
        with pytest.raises(docker.errors.APIError, match="network-internal"):
            client.networks.create("airlock-y", driver="bridge", labels={MANAGED: "true"})
    finally:
        client.close()
    assert [d["rule"] for d in stack.decisions() if not d["allow"]] == ["network-internal"]
    [listing] = [s for s in stack.engine.seen if s.path == "/networks"]
    filters = json.loads(parse_qs(urlsplit(listing.target).query)["filters"][0])
    assert filters == {"label": [f"{ROLE}=network", f"{MANAGED}=true"], "name": ["airlock-net"]}


def test_listing_gets_the_label_filter(stack: Stack) -> None:
    client = stack.client(version="1.41")
    try:
        assert client.containers.list(all=True, filters={"status": "exited"}) == []
    finally:
        client.close()
    [listing] = [s for s in stack.engine.seen if s.path == "/containers/json"]
    filters = json.loads(parse_qs(urlsplit(listing.target).query)["filters"][0])
    assert filters == {"status": ["exited"], "label": [f"{MANAGED}=true"]}


def test_logs_stream_through(stack: Stack) -> None:
    client = stack.client(version="1.41")
    try:
        stream = client.api.logs("mine", stream=True, follow=True)
        assert next(stream) == b"first\n"
        stack.engine.release.set()
        assert next(stream) == b"second\n"
        assert list(stream) == []
    finally:
        client.close()
    [logs] = [s for s in stack.engine.seen if s.path.endswith("/logs")]
    assert logs.path == f"/containers/{MINE}/logs"


def test_refusals_and_keepalive_on_one_raw_connection(stack: Stack) -> None:
    conn = UnixHTTPConnection(stack.socket)
    try:
        for method, target, expected in [
            ("GET", "/v1.41/_ping", 200),
            ("POST", "/v1.41/containers/mine/exec", 403),
            ("HEAD", "/v1.41/_ping", 200),
            ("GET", "/v1.41/containers/ghost/json", 404),
            ("GET", "/v1.41/version", 200),
        ]:
            conn.request(method, target)
            response = conn.getresponse()
            body = response.read()
            assert response.status == expected, (target, body)
            if expected == 403:
                assert json.loads(body)["message"].startswith("airlock sockguard refused endpoint: ")
    finally:
        conn.close()
    assert stack.guard.accepted == 1
    forwarded = [s for s in stack.engine.seen if s.path in {"/_ping", "/version"}]
    assert len(forwarded) == 3 and len({s.connection for s in forwarded}) == 1


def test_oversized_body_upgrade_and_encoding_are_refused(stack: Stack) -> None:
    status, body = raw_request(stack.socket, "POST", "/v1.41/containers/create", b"{" + b" " * (1 << 20) + b"}")
    assert status == 413 and b"body-size" in body
    status, body = raw_request(stack.socket, "POST", "/v1.41/containers/mine/attach?stream=1", b"",
                               {"Connection": "Upgrade", "Upgrade": "tcp"})
    assert status == 403 and b"refused upgrade" in body
    status, body = raw_request(stack.socket, "POST", "/v1.41/containers/create", b"x",
                               {"Content-Encoding": "gzip"})
    assert status == 403 and b"content-encoding" in body
    assert stack.engine.created() == []


def test_client_hanging_up_mid_stream_frees_the_engine_connection(stack: Stack) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(stack.socket)
    sock.sendall(b"GET /v1.41/containers/mine/logs?follow=1&stdout=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"first" in _read_until(sock, b"first")
    sock.close()
    deadline = time.monotonic() + 5
    while not stack.engine.hung_up and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stack.engine.hung_up, "sockguard kept the engine's log stream open after the client left"


def test_pipelined_requests_and_chunked_request_bodies(stack: Stack) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(stack.socket)
    try:
        sock.sendall(b"GET /v1.41/_ping HTTP/1.1\r\nHost: x\r\n\r\nGET /v1.41/version HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_until(sock, b"ApiVersion").count(b"HTTP/1.1 200") == 2
        body = json.dumps({"Name": "n", "Internal": True, "Labels": {MANAGED: "true"},
                           "Options": {"com.docker.network.bridge.inhibit_ipv4": "true"}}).encode()
        sock.sendall(b"POST /v1.41/networks/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        assert _read_until(sock, CREATED.encode()).startswith(b"HTTP/1.1 201")
    finally:
        sock.close()
    assert stack.engine.seen[-1].body == body and stack.guard.accepted == 1


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


def raw_request(path: str, method: str, target: str, body: bytes, headers: dict[str, str] | None = None,
                ) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(path)
    try:
        conn.request(method, target, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_kept_engine_connection_the_engine_closed_is_replaced_not_a_502(stack: Stack) -> None:
    """The engine ends its keep-alive between two requests: each request still gets the engine's answer."""
    stack.engine.close_after_answer = True
    conn = UnixHTTPConnection(stack.socket)
    try:
        for target in ["/v1.41/_ping", "/v1.41/containers/json", "/v1.41/version", "/v1.41/containers/json"]:
            conn.request("GET", target)
            response = conn.getresponse()
            assert response.status == 200, (target, response.read())
            response.read()
            time.sleep(0.1)  # the hang-up reaches sockguard first: its stale check replaces the connection
    finally:
        conn.close()
    assert stack.guard.accepted == 1  # one client connection throughout
    assert len({s.connection for s in stack.engine.seen}) == 4  # a fresh engine connection for each
    assert not [d for d in stack.decisions() if d["event"] == "sockguard.upstream_error"]


def test_a_get_that_died_on_a_kept_connection_is_sent_again_a_written_post_is_not(stack: Stack) -> None:
    """Go's net/http rule: a reused connection's GET may go twice, a POST the engine may have acted on may not."""
    conn = UnixHTTPConnection(stack.socket)
    try:
        conn.request("GET", "/v1.41/_ping")
        assert conn.getresponse().read() == b"OK"
        stack.engine.unanswered = {"GET /containers/json": 1}  # the engine answers the retry
        conn.request("GET", "/v1.41/containers/json")
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b"[]"
        conn.request("GET", "/v1.41/_ping")
        assert conn.getresponse().read() == b"OK"
        stack.engine.unanswered = {"POST /networks/create": 1}
        body = json.dumps({"Name": "n", "Internal": True, "Labels": {MANAGED: "true"},
                           "Options": {"com.docker.network.bridge.inhibit_ipv4": "true"}})
        conn.request("POST", "/v1.41/networks/create", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 502 and b"did not answer" in response.read()
    finally:
        conn.close()
    gets = [s for s in stack.engine.seen if s.path == "/containers/json"]
    posts = [s for s in stack.engine.seen if s.path == "/networks/create"]
    assert len(gets) == 2 and gets[0].connection != gets[1].connection
    assert len(posts) == 1, "a POST the engine read was sent a second time"
    events = [d["event"] for d in stack.decisions()]
    assert events.count("sockguard.upstream_retry") == 1 and events.count("sockguard.upstream_error") == 1


def test_the_operators_allowlist_admits_a_users_image_live_and_revoking_it_refuses_it_again(stack: Stack) -> None:
    client = stack.client(version="1.41")
    kwargs = hardened_kwargs(client, stack.policy) | {"image": USER_IMAGE}
    try:
        with pytest.raises(docker.errors.APIError) as caught:
            client.api.create_container(**kwargs)
        assert caught.value.status_code == 403
        assert "airlock images allow acme/etl" in str(caught.value)  # the refusal says how to allow it
        assert stack.engine.created() == []

        write_operator_images(stack.operator_file, OperatorImages((parse_reference("acme/*"),)))
        assert client.api.create_container(**kwargs)["Id"] == CREATED  # same sockguard: no restart
        assert len(stack.engine.created()) == 1

        stack.operator_file.write_text("version: 1\nallow:\n  - name: UPPER\n")  # a bad file never goes live
        with pytest.raises(docker.errors.APIError):
            client.api.create_container(**kwargs)
        write_operator_images(stack.operator_file, OperatorImages((parse_reference(USER_IMAGE_ID),)))
        assert client.api.create_container(**kwargs)["Id"] == CREATED  # by image id
        write_operator_images(stack.operator_file, OperatorImages())  # revoked
        with pytest.raises(docker.errors.APIError):
            client.api.create_container(**kwargs)
    finally:
        client.close()
    assert len(stack.engine.created()) == 2
    errors = [d for d in stack.decisions() if d["event"] == "sockguard.operator_images" and d["error"]]
    assert errors and "UPPER" in errors[0]["error"]
