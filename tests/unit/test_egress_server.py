"""The proxy end to end on loopback: a real origin, a real proxy, raw sockets and httpx as clients.

Every scenario runs in its own event loop under an overall timeout, so a hang fails fast instead of
blocking the suite. Sources are 127.0.0.1, so the routes file maps 127.0.0.0/8 to location "test".
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest

from appliance.egress.routes import RoutesFile
from appliance.egress.server import BadRequest, EgressProxy, parse_target, split_authority
from appliance.policy import EgressPolicy

N = ipaddress.ip_network
POLICY = EgressPolicy(
    port=0,
    always_deny=(
        (N("169.254.169.254/32"), "cloud metadata"),
        (N("127.0.0.0/8"), "loopback"),
        (N("::1/128"), "loopback"),
        (N("10.0.0.0/8"), "private"),
    ),
    connect_timeout=2.0,
)


async def origin_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A tiny HTTP/1.1 origin: echoes the request line target, Host, Connection and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    text = (
        f"target={lines[0].split(' ')[1]} host={headers.get('host')} connection={headers.get('connection')} "
        f"proxy-auth={headers.get('proxy-authorization')} body={body.decode()}"
    ).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(text), text))
    await writer.drain()
    writer.close()


class Env:
    """One origin, one proxy, one routes file."""

    def __init__(self, tmp: Path) -> None:
        self.routes_path = tmp / "routes.json"
        self.origin_port = 0
        self.proxy_port = 0

    def write_routes(self, *routes: dict[str, Any]) -> None:
        """Write atomically (as the agent does) and bump mtime so the change is seen at once."""
        tmp = self.routes_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": 1, "routes": list(routes)}))
        os.replace(tmp, self.routes_path)

    def route(self, allow_cidrs: list[str], allow: list[str] | None = None) -> dict[str, Any]:
        default = [f"127.0.0.1:{self.origin_port}", f"localhost:{self.origin_port}"]
        return {
            "location": "test",
            "cidrs": ["127.0.0.0/8"],
            "allow": default if allow is None else allow,
            "allow_cidrs": allow_cidrs,
        }

    async def raw(self, data: bytes) -> bytes:
        """Send ``data`` to the proxy and read until it closes."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy_port)
        writer.write(data)
        await writer.drain()
        out = await reader.read(-1)
        writer.close()
        return out

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(proxy=f"http://127.0.0.1:{self.proxy_port}", trust_env=False, timeout=5)


Scenario = Callable[[Env], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, **proxy_args: Any) -> None:
    async def main() -> None:
        env = Env(tmp_path)
        origin = await asyncio.start_server(origin_handler, "127.0.0.1", 0)
        env.origin_port = origin.sockets[0].getsockname()[1]
        env.write_routes(env.route(["127.0.0.1/32"]))
        proxy = EgressProxy(proxy_args.pop("policy", POLICY), RoutesFile(env.routes_path), **proxy_args)
        server = await proxy.start("127.0.0.1", 0)
        env.proxy_port = server.sockets[0].getsockname()[1]
        async with origin, server:
            await scenario(env)

    asyncio.run(asyncio.wait_for(main(), 20))


def decisions(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == "egress.decision"]


def reason_of(response: bytes) -> str:
    for line in response.split(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"x-airlock-egress-reason:"):
            return line.split(b":", 1)[1].strip().decode()
    return ""


def test_connect_tunnel_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(env: Env) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.proxy_port)
        target = f"127.0.0.1:{env.origin_port}".encode()
        writer.write(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target))
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection established\r\n\r\n"
        writer.write(b"GET /through-tunnel HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        assert response.startswith(b"HTTP/1.1 200 OK")
        assert b"target=/through-tunnel host=origin" in response

    run(tmp_path, scenario)
    (logged,) = decisions(capsys)
    assert logged["allow"] is True and logged["location"] == "test" and logged["ip"] == "127.0.0.1"
    assert logged["source"] == "127.0.0.1" and logged["kind"] == "connect" and logged["status"] == 200


def test_connect_with_early_data_in_the_same_packet(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        target = f"localhost:{env.origin_port}".encode()
        response = await env.raw(
            b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\nGET /early HTTP/1.1\r\nHost: o\r\n\r\n" % (target, target)
        )
        assert response.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK")
        assert b"target=/early" in response

    run(tmp_path, scenario, resolver=_resolver({"localhost": ["127.0.0.1"]}))


def test_absolute_uri_forwarded_in_origin_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(env: Env) -> None:
        async with env.client() as client:
            url = f"http://127.0.0.1:{env.origin_port}/hello?x=1"
            response = await client.get(url, headers={"Proxy-Authorization": "Basic c2VjcmV0"})
            assert response.status_code == 200
            assert response.text.startswith(f"target=/hello?x=1 host=127.0.0.1:{env.origin_port} connection=close")
            assert "proxy-auth=None" in response.text  # proxy credentials never travel upstream
            posted = await client.post(f"http://127.0.0.1:{env.origin_port}/up", content=b"payload")
            assert posted.status_code == 200 and posted.text.endswith("body=payload")

    run(tmp_path, scenario)
    assert [d["kind"] for d in decisions(capsys)] == ["forward", "forward"]


def test_mixed_resolution_dials_the_checked_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(env: Env) -> None:
        env.write_routes(env.route(["127.0.0.1/32"], allow=[f"origin.test:{env.origin_port}"]))
        async with env.client() as client:
            response = await client.get(f"http://origin.test:{env.origin_port}/m")
            assert response.status_code == 200
            assert f"host=origin.test:{env.origin_port}" in response.text

    run(tmp_path, scenario, resolver=_resolver({"origin.test": ["::1", "127.0.0.1"]}))
    (logged,) = decisions(capsys)
    assert logged["ip"] == "127.0.0.1" and logged["host"] == "origin.test"


def test_loopback_refused_without_allow_cidrs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(env: Env) -> None:
        env.write_routes(env.route([]))
        async with env.client() as client:
            response = await client.get(f"http://127.0.0.1:{env.origin_port}/")
        assert response.status_code == 403
        assert "loopback" in response.headers["x-airlock-egress-reason"]
        assert response.text == f"airlock egress refused: {response.headers['x-airlock-egress-reason']}\n"
        target = f"127.0.0.1:{env.origin_port}".encode()
        raw = await env.raw(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target))
        assert raw.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert reason_of(raw) == "address 127.0.0.1 is loopback"

    run(tmp_path, scenario)
    logged = decisions(capsys)
    assert [(d["allow"], d["status"], d["ip"]) for d in logged] == [(False, 403, None)] * 2


def test_disallowed_host_refused(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        raw = await env.raw(b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert reason_of(raw).startswith("host not in allowlist")
        wrong_port = b"localhost:%d" % (env.origin_port + 1 if env.origin_port < 65535 else 1)
        raw = await env.raw(b"CONNECT %s HTTP/1.1\r\nHost: x\r\n\r\n" % wrong_port)
        assert raw.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert reason_of(raw).startswith("host not in allowlist")

    resolver = _resolver({})
    run(tmp_path, scenario, resolver=resolver)
    assert resolver.calls == []  # refused names never reach DNS


def test_unknown_source_refused(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        env.write_routes({"location": "other", "cidrs": ["10.0.0.0/8"], "allow": ["*.org:*"]})
        async with env.client() as client:
            response = await client.get(f"http://127.0.0.1:{env.origin_port}/")
        assert response.status_code == 403
        assert response.headers["x-airlock-egress-reason"] == "unknown source 127.0.0.1"

    run(tmp_path, scenario)


def test_routes_rewrite_is_picked_up_and_bad_routes_refuse(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        async with env.client() as client:
            url = f"http://127.0.0.1:{env.origin_port}/"
            assert (await client.get(url)).status_code == 200
            env.write_routes(env.route([]))
            assert (await client.get(url)).status_code == 403
            env.routes_path.write_text("{ broken")
            broken = await client.get(url)
            assert broken.status_code == 403
            assert broken.headers["x-airlock-egress-reason"].startswith("routes unavailable")
            env.routes_path.unlink()
            assert (await client.get(url)).status_code == 403
            env.write_routes(env.route(["127.0.0.0/8"]))
            assert (await client.get(url)).status_code == 200

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (b"GARBAGE\r\n\r\n", "bad request: illegal request line"),
        (b"GET http://x/\r\n\r\n", "bad request"),
        (b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", "not a proxy request"),
        (b"GET https://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n", "use CONNECT"),
        (b"GET ftp://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n", "unsupported scheme"),
        (b"CONNECT example.org HTTP/1.1\r\nHost: example.org\r\n\r\n", "need host:port"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", "request head too large"),
    ],
)
def test_malformed_request_gets_400(tmp_path: Path, request_bytes: bytes, reason: str) -> None:
    async def scenario(env: Env) -> None:
        raw = await env.raw(request_bytes)
        assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert reason in reason_of(raw)

    run(tmp_path, scenario)


def test_upstream_refused_is_502_and_timeout_is_504(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]

    async def scenario(env: Env) -> None:
        env.write_routes(env.route(["127.0.0.1/32"], allow=[f"127.0.0.1:{closed_port}", "slow.test:80"]))
        raw = await env.raw(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % closed_port)
        assert raw.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        raw = await env.raw(b"GET http://slow.test/ HTTP/1.1\r\nHost: slow.test\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
        assert "timed out" in reason_of(raw)

    async def opener(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if port == 80:
            await asyncio.sleep(10)
        return await asyncio.open_connection(host, port)

    policy = EgressPolicy(port=0, always_deny=POLICY.always_deny, connect_timeout=0.3)
    run(tmp_path, scenario, policy=policy, opener=opener, resolver=_resolver({"slow.test": ["127.0.0.1"]}))


def test_idle_tunnel_is_closed(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        silent = await asyncio.start_server(lambda r, w: asyncio.sleep(5), "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        env.write_routes(env.route(["127.0.0.1/32"], allow=[f"127.0.0.1:{port}"]))
        async with silent:
            reader, writer = await asyncio.open_connection("127.0.0.1", env.proxy_port)
            writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % port)
            assert (await asyncio.wait_for(reader.read(-1), 5)).startswith(b"HTTP/1.1 200")  # closed when idle
            writer.close()

    run(tmp_path, scenario, idle_timeout=0.3)


def test_target_parsing() -> None:
    assert split_authority("[::1]:443", None) == ("::1", 443)
    assert split_authority("example.org", 80) == ("example.org", 80)
    with pytest.raises(BadRequest):
        split_authority("::1:443", None)
    request = h11.Request(method="GET", target="http://example.org:8080/a/b?c#frag", headers=[("Host", "x")])
    assert parse_target(request) == ("example.org", 8080, "/a/b?c")
    with pytest.raises(BadRequest, match="userinfo"):
        parse_target(h11.Request(method="GET", target="http://user@example.org/", headers=[("Host", "x")]))


class _resolver:
    """A fake resolver that records the names it was asked for."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]
