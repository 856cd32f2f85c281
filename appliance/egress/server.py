"""The proxy server: CONNECT tunnels and absolute-URI HTTP requests, nothing else.

Why so little HTTP: user code only needs ``HTTPS_PROXY`` (CONNECT) and ``HTTP_PROXY`` (absolute-URI
requests). Each connection carries exactly one proxied request: the head is parsed with h11 (bounded
to 16 KiB), the decision is made and logged once, the checked address is dialled, and then bytes are
spliced (CONNECT) or the one request is forwarded with ``Connection: close`` and the response piped
back. Keep-alive, caching and rewriting responses are deliberately out of scope.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import h11

from appliance.egress import log_event
from appliance.egress.decide import Decision, decide
from appliance.egress.resolve import Resolver, parse_ip, system_resolver
from appliance.egress.routes import RoutesFile
from appliance.policy import EgressPolicy
from protocol.errors import PermanentError

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT = 30.0
IDLE_TIMEOUT = 300.0
CHUNK = 64 * 1024
# Hop-by-hop headers (and Host, which is rebuilt from the checked URI) are not forwarded.
_HOP_BY_HOP = frozenset(
    b"host connection keep-alive proxy-connection proxy-authorization proxy-authenticate te trailer upgrade".split()
)
_AUTHORITY = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\[\]:@/\s]+))(?::(\d{1,5}))?")
Opener = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class BadRequest(PermanentError):
    """Not a request this proxy serves; answered 400 with the message as the reason."""


def split_authority(text: str, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` or ``[v6][:port]`` -> (host, port); an unbracketed IPv6 literal is ambiguous."""
    m = _AUTHORITY.fullmatch(text)
    port = int(m.group(3)) if m and m.group(3) else default_port
    if m is None or port is None:
        raise BadRequest(f"malformed authority {text!r} (need host:port)")
    return m.group(1) or m.group(2), port


def parse_target(request: h11.Request) -> tuple[str, int, str | None]:
    """(host, port, origin-form target) of a proxy request; origin-form is None for CONNECT."""
    target = request.target.decode("ascii", "replace")  # h11 already allows only visible ASCII here
    if request.method == b"CONNECT":
        return (*split_authority(target, None), None)
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", target):
        raise BadRequest("not a proxy request: send an absolute http:// URI, or CONNECT host:port")
    parts = urlsplit(target)
    if parts.scheme.lower() == "https":
        raise BadRequest("https:// URI sent in the clear: use CONNECT for TLS")
    if parts.scheme.lower() != "http":
        raise BadRequest(f"unsupported scheme {parts.scheme!r}")
    if "@" in parts.netloc:
        raise BadRequest("userinfo in the URI is not allowed")
    host, port = split_authority(parts.netloc, 80)
    return host, port, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def reply(status: int, reason: str) -> bytes:
    """A complete, closing error response; the reason is made header-safe (it may echo a host)."""
    safe = re.sub(r"[^\x20-\x7e]", "?", reason)[:400]
    verb = "refused" if status < 500 else "failed"
    body = f"airlock egress {verb}: {safe}\n".encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Airlock-Egress-Reason: {safe}\r\n\r\n"
    )
    return head.encode() + body


class _Idle:
    """One idle clock shared by both directions: a long download must not time out the quiet upload."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.last = time.monotonic()

    async def read(self, reader: asyncio.StreamReader) -> bytes:
        while True:
            remaining = self.last + self.timeout - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("idle timeout")
            try:
                data = await asyncio.wait_for(reader.read(CHUNK), remaining)
            except TimeoutError:
                continue
            self.last = time.monotonic()
            return data


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, idle: _Idle, half_close: bool) -> None:
    """Copy until EOF; then pass the half-close on so the other direction can still finish."""
    while data := await idle.read(src):
        dst.write(data)
        await dst.drain()
    if half_close and dst.can_write_eof():
        dst.write_eof()


async def _supervise(
    required: Iterable[Coroutine[Any, Any, None]], optional: Iterable[Coroutine[Any, Any, None]] = ()
) -> None:
    """Run until every required task ends; any failure (reset, idle timeout) ends the whole exchange."""
    needed = [asyncio.create_task(c) for c in required]
    tasks = needed + [asyncio.create_task(c) for c in optional]
    pending: set[asyncio.Task[None]] = set(tasks)
    try:
        while not all(t.done() for t in needed):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                return
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class EgressProxy:
    """Serves one listening socket; every connection is judged by its source address."""

    def __init__(
        self,
        egress: EgressPolicy,
        routes: RoutesFile,
        *,
        resolver: Resolver = system_resolver,
        opener: Opener = asyncio.open_connection,
        idle_timeout: float = IDLE_TIMEOUT,
        head_timeout: float = HEAD_TIMEOUT,
        max_connections: int = 1024,
    ) -> None:
        self.egress = egress
        self.routes = routes
        self.resolver = resolver
        self.opener = opener
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.max_connections = max_connections
        self.active = 0

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port, limit=HEAD_LIMIT)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        try:
            if self.active > self.max_connections:
                writer.write(reply(503, "too many connections"))
            else:
                await self._serve(reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        except Exception as exc:  # one broken connection must never take the proxy down
            log_event("egress.error", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.active -= 1
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = parse_ip(str(peer[0])) if peer else None
        if source is None:
            return
        conn = h11.Connection(h11.SERVER)
        try:
            request = await asyncio.wait_for(self._read_head(conn, reader), self.head_timeout)
            if request is None:
                return
            host, port, origin = parse_target(request)
        except (h11.RemoteProtocolError, BadRequest) as exc:
            reason = str(exc) if isinstance(exc, BadRequest) else f"bad request: {exc}"
            log_event("egress.bad_request", source=str(source), reason=reason)
            writer.write(reply(400, reason))
            return
        e = self.egress
        decision = await decide(
            self.routes.current(), source, host, port, e.always_deny, self.resolver, e.connect_timeout
        )
        kind = "forward" if origin is not None else "connect"
        if not decision.allow or decision.ip is None:
            self._log(decision, source, kind, 403)
            writer.write(reply(403, decision.reason))
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                self.opener(str(decision.ip), port), self.egress.connect_timeout
            )
        except TimeoutError:
            self._log(decision, source, kind, 504, "connect timed out")
            writer.write(reply(504, f"connect to {decision.ip}:{port} timed out"))
            return
        except OSError as exc:
            error = exc.strerror or str(exc) or type(exc).__name__
            self._log(decision, source, kind, 502, error)
            writer.write(reply(502, f"connect to {decision.ip}:{port} failed: {error}"))
            return
        self._log(decision, source, kind, 200)
        pipes = _Pipes(reader, writer, up_reader, up_writer, _Idle(self.idle_timeout))
        try:
            if origin is None:
                await _tunnel(conn, pipes)
            else:
                await _forward(conn, upstream_request(request, decision.host, port, origin), pipes)
        finally:
            up_writer.close()

    @staticmethod
    async def _read_head(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
        """Read exactly the head (the reader's limit bounds it); bytes after it stay in the reader."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise BadRequest("request head too large") from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise BadRequest("connection closed inside the request head") from None
            return None
        conn.receive_data(head)
        event = conn.next_event()
        if not isinstance(event, h11.Request):
            raise BadRequest(f"unexpected {type(event).__name__}")
        return event

    @staticmethod
    def _log(d: Decision, source: object, kind: str, status: int, error: str | None = None) -> None:
        log_event("egress.decision", **asdict(d), source=str(source), kind=kind, status=status, error=error)


@dataclass
class _Pipes:
    """Both ends of one proxied exchange and the idle clock they share."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    up_reader: asyncio.StreamReader
    up_writer: asyncio.StreamWriter
    idle: _Idle


def upstream_request(request: h11.Request, host: str, port: int, origin: str) -> h11.Request:
    """The request in origin form, Host from the checked URI, hop-by-hop headers dropped, one-shot."""
    named = {t.strip().lower() for n, v in request.headers if n == b"connection" for t in v.split(b",")}
    headers = [(n, v) for n, v in request.headers if n not in _HOP_BY_HOP and n not in named]
    authority = (f"[{host}]" if ":" in host else host) + ("" if port == 80 else f":{port}")
    headers = [(b"host", authority.encode()), *headers, (b"connection", b"close")]
    return h11.Request(method=request.method, target=origin.encode(), headers=headers)


async def _tunnel(conn: h11.Connection, p: _Pipes) -> None:
    """Answer 200 and splice until both sides end; bytes sent early (a TLS hello) wait in the reader."""
    while (event := conn.next_event()) is not h11.PAUSED:  # EndOfMessage, then PAUSED
        if not isinstance(event, h11.EndOfMessage):
            raise BadRequest("CONNECT with a body")
    p.writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await _supervise([_pump(p.reader, p.up_writer, p.idle, True), _pump(p.up_reader, p.writer, p.idle, True)])


async def _forward(conn: h11.Connection, request: h11.Request, p: _Pipes) -> None:
    """Send the one request and its body upstream; pipe the response back until upstream closes."""
    up = h11.Connection(h11.CLIENT)
    p.up_writer.write(up.send(request))

    async def body() -> None:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await p.idle.read(p.reader))
                continue
            if isinstance(event, h11.Data):
                p.up_writer.write(up.send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                p.up_writer.write(up.send(h11.EndOfMessage()))
            else:
                raise BadRequest(f"unexpected {type(event).__name__}")
            await p.up_writer.drain()
            if isinstance(event, h11.EndOfMessage):
                return

    await _supervise([_pump(p.up_reader, p.writer, p.idle, False)], [body()])
