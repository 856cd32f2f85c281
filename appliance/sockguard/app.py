"""sockguard's server: HTTP/1.1 (h11) on a unix socket, forwarding allowed calls to the engine socket.

h11 on both sides, rather than a framework or a client library, so nothing adds, merges or re-encodes
headers and bodies behind our back: upstream receives the normalized target and exactly the body bytes
the rules decided on. Responses are streamed (logs?follow=1, wait), keep-alive works on both sides,
and a client that goes away mid-stream takes its upstream connection with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import http
import json
import os
import re
import stat
import sys
from collections.abc import AsyncIterator
from typing import Any, TextIO
from urllib.parse import quote

import h11

from appliance.policy import Policy
from appliance.policy.operator import LiveImages
from appliance.sockguard import Decision, Found, ImageInfo, Lookups, Table, inspect, rules
from appliance.sockguard.inspect import Refusal
from protocol.errors import TemporaryError

_READ = 65536
_MAX_HEAD = 64 * 1024
_LOOKUP_MAX = 8 << 20
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
_HOP = frozenset(
    b"connection keep-alive proxy-connection proxy-authorization proxy-authenticate te trailer "
    b"transfer-encoding upgrade".split()
)
_REQUEST_DROP = _HOP | {b"host", b"content-length", b"expect"}
# Safe to send again when a reused connection got no answer: the engine cannot have acted twice on these.
_IDEMPOTENT = frozenset({b"GET", b"HEAD"})


class _NotSent(TemporaryError, ConnectionError):
    """The request never fully left: the connection was closed before (or while) it was written."""


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(_READ))


class _Upstream:
    """One HTTP/1.1 client connection to the engine socket, reusable between requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)

    @classmethod
    async def open(cls, path: str) -> _Upstream:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    @property
    def stale(self) -> bool:
        """The engine already hung up this idle connection (its keep-alive ended): do not send on it."""
        return self.writer.is_closing() or self.reader.at_eof() or self.reader.exception() is not None

    async def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> Any:
        """Send one request and read the response head; `_NotSent` if the connection was gone before it left."""
        data = self.conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        data += (self.conn.send(h11.Data(data=body)) or b"") if body else b""
        if self.writer.is_closing():
            raise _NotSent("the engine had closed the connection")
        try:
            self.writer.write(data + (self.conn.send(h11.EndOfMessage()) or b""))
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise _NotSent(str(exc) or type(exc).__name__) from exc
        while True:
            event = await _next_event(self.conn, self.reader)
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise ConnectionError("the engine closed the connection")

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            event = await _next_event(self.conn, self.reader)
            if isinstance(event, h11.EndOfMessage):
                return
            if not isinstance(event, h11.Data):
                raise ConnectionError("the engine closed the connection mid-response")
            yield bytes(event.data)

    def finish(self) -> bool:
        """After a whole exchange: ready for the next request, or False (then it is closed)."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        self.close()
        return False

    def close(self) -> None:
        self.writer.close()


class EngineLookups(Lookups):
    """Ownership and image look-ups against the real engine, one short connection each."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path, self.timeout = socket_path, timeout

    async def _get(self, path: str) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                upstream = await _Upstream.open(self.socket_path)
                try:
                    target = quote(path, safe="/:@").encode()
                    response = await upstream.request(b"GET", target, [(b"host", b"docker")], b"")
                    data = b""
                    async for chunk in upstream.body():
                        data += chunk
                        if len(data) > _LOOKUP_MAX:
                            raise ConnectionError("look-up answer too large")
                finally:
                    upstream.close()
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise ConnectionError(f"engine answered {response.status_code} to {path}")
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ConnectionError(f"engine answer to {path} is not an object")
            return doc
        except (OSError, ConnectionError, TimeoutError, ValueError, h11.ProtocolError) as exc:
            raise Refusal("upstream", f"look-up failed: {exc}", status=502) from None

    async def container(self, ident: str) -> Found | None:
        doc = await self._get(f"/containers/{ident}/json") if _IDENT.fullmatch(ident) else None
        return None if doc is None else Found(str(doc.get("Id")), _labels((doc.get("Config") or {}).get("Labels")))

    async def network(self, ident: str) -> Found | None:
        doc = await self._get(f"/networks/{ident}") if _IDENT.fullmatch(ident) else None
        if doc is None:
            return None
        return Found(str(doc.get("Id")), _labels(doc.get("Labels")), internal=doc.get("Internal") is True)

    async def volume(self, name: str) -> Found | None:
        doc = await self._get(f"/volumes/{name}") if _IDENT.fullmatch(name) else None
        if doc is None:
            return None
        options = doc.get("Options") or {}
        return Found(str(doc.get("Name")), _labels(doc.get("Labels")), driver=str(doc.get("Driver") or ""),
                     options={str(k): str(v) for k, v in options.items()} if isinstance(options, dict) else {},
                     mountpoint=str(doc.get("Mountpoint") or ""))

    async def image(self, ref: str) -> ImageInfo | None:
        doc = await self._get(f"/images/{ref}/json") if rules.IMAGE_REF.fullmatch(ref) else None
        if doc is None:
            return None
        return ImageInfo(str(doc.get("Id")), tuple(doc.get("RepoTags") or ()), tuple(doc.get("RepoDigests") or ()))


def _labels(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


class Sockguard:
    """Serves client connections: decide every request, answer refusals, forward the rest."""

    def __init__(
        self, *, upstream: str, policy: Policy, table: Table, lookups: Lookups | None = None, log: TextIO = sys.stderr,
        images: LiveImages | None = None,
    ) -> None:
        self.upstream, self.policy, self.table, self.log = upstream, policy, table, log
        self.lookups = lookups or EngineLookups(upstream)
        self.images = images  # the operator's allowlist, re-read when it changes; None: the baked-in one only
        self._image_error: str | None = None

    def current_policy(self) -> Policy:
        """The policy for this decision: the loaded one, with the image allowlist as the operator has it now."""
        if self.images is None:
            return self.policy
        images = self.images.current()
        if self.images.error != self._image_error:
            self._image_error = self.images.error
            self._log({"event": "sockguard.operator_images", "error": self.images.error})
        return self.policy if images is self.policy.images else dataclasses.replace(self.policy, images=images)

    async def listen(self, path: str, *, mode: int = 0o660, group: str | None = None) -> asyncio.Server:
        """Bind ``path`` created 0600 (umask), then chgrp/chmod: never briefly wider than asked."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            os.unlink(path)
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self.handle, path=path, limit=_READ)
        finally:
            os.umask(old)
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, mode)
        return server

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        upstream: _Upstream | None = None
        try:
            while True:
                event = await _next_event(conn, reader)
                if not isinstance(event, h11.Request):
                    break
                upstream, keep = await self._exchange(conn, reader, writer, event, upstream)
                if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state is h11.IDLE or conn.our_state is h11.SEND_RESPONSE:
                decision = Decision(False, "http", str(exc)[:200], "", status=exc.error_status_hint)
                with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
                    await self._respond(conn, writer, decision, head=False, close=True)
        except (ConnectionError, h11.LocalProtocolError):
            pass
        finally:
            if upstream is not None:
                upstream.close()
            writer.close()

    async def _exchange(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        request: h11.Request, upstream: _Upstream | None,
    ) -> tuple[_Upstream | None, bool]:
        """One request/response; returns the upstream connection to reuse and whether to keep the client."""
        method, raw_path = request.method.decode("ascii", "replace"), request.target.decode("ascii", "replace")[:300]
        try:
            if conn.they_are_waiting_for_100_continue:
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
            body = await inspect.read_body(lambda: _next_event(conn, reader))  # first: a refusal keeps the framing
            inspect.check_headers(request.headers)
        except Refusal as refusal:
            decision = rules.refused(refusal, raw_path)
        else:
            try:
                decision = await rules.decide(
                    method, request.target, body, table=self.table, policy=self.current_policy(), lookups=self.lookups
                )
            except Exception as exc:  # a bug must refuse, never forward
                decision = Decision(False, "internal", f"{type(exc).__name__}: {exc}"[:200], raw_path, status=500)
        self._log(decision.log_record(method))
        if not decision.allow:
            close = conn.their_state is not h11.DONE or decision.rule == "upgrade"
            await self._respond(conn, writer, decision, head=method == "HEAD", close=close)
            if decision.status == 413:  # drop the rest (bounded) so the client reads the 413, not a reset
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        for _ in range(512):
                            if not isinstance(await _next_event(conn, reader), h11.Data):
                                break
            return upstream, not close
        # A registry login is sockguard's to add (from the operator's file), never the client's to send.
        headers = [(b"host", b"docker"), *((k, v) for k, v in request.headers if k not in _REQUEST_DROP
                                           and k != b"x-registry-auth"), *decision.headers]
        if body or method in {"POST", "PUT"}:
            headers.append((b"content-length", str(len(body)).encode()))
        try:
            upstream, response = await self._send(upstream, request.method, decision, headers, body)
        except (OSError, ConnectionError, h11.ProtocolError) as exc:
            self._log({"event": "sockguard.upstream_error", "method": method, "path": decision.path, "error": str(exc)})
            failed = Decision(False, "upstream", "the Docker engine did not answer", decision.path, status=502)
            await self._respond(conn, writer, failed, head=method == "HEAD", close=True)
            return None, False
        return await self._relay(conn, reader, writer, upstream, response)

    async def _send(
        self, upstream: _Upstream | None, method: bytes, decision: Decision, headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> tuple[_Upstream, h11.Response]:
        """Send on the kept connection, or a fresh one when the engine has closed it since the last exchange.

        A kept connection can die between the check and the send. Then the request goes once more, on a new
        connection, when it cannot have been acted on: it was never written, or it is a GET/HEAD that got no
        answer. That is Go's net/http rule for reused connections; a POST that was written and got no answer is
        not sent again (the engine may have created the container), it fails with 502.
        """
        if upstream is not None and upstream.stale:
            upstream.close()
            upstream = None
        reused = upstream is not None
        if upstream is None:
            upstream = await _Upstream.open(self.upstream)
        try:
            return upstream, await upstream.request(method, decision.target, headers, body)
        except (OSError, ConnectionError, h11.ProtocolError) as exc:
            upstream.close()
            retry = reused and (isinstance(exc, _NotSent) or method in _IDEMPOTENT)
            if not retry:
                raise
            self._log({"event": "sockguard.upstream_retry", "method": method.decode("ascii", "replace"),
                       "path": decision.path, "error": str(exc) or type(exc).__name__})
        upstream = await _Upstream.open(self.upstream)
        try:
            return upstream, await upstream.request(method, decision.target, headers, body)
        except BaseException:
            upstream.close()
            raise

    async def _relay(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        upstream: _Upstream, response: h11.Response,
    ) -> tuple[_Upstream | None, bool]:
        """Stream the engine's answer chunk by chunk while watching for the client hanging up."""

        async def relay() -> None:
            headers = [(k, v) for k, v in response.headers if k not in _HOP]
            writer.write(conn.send(h11.Response(status_code=response.status_code, headers=headers,
                                                reason=response.reason)) or b"")
            async for chunk in upstream.body():
                writer.write(conn.send(h11.Data(data=chunk)) or b"")
                await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()

        async def watch() -> None:
            while data := await reader.read(_READ):
                conn.receive_data(data)  # a pipelined next request: h11 keeps it for the next cycle
                if len(conn.trailing_data[0]) > _MAX_HEAD:
                    return

        relaying, watching = asyncio.ensure_future(relay()), asyncio.ensure_future(watch())
        try:
            await asyncio.wait({relaying, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relaying, watching):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task  # its outcome is read below
        if relaying.cancelled() or relaying.exception() is not None:
            upstream.close()  # client gone or stream broken: the engine side must not linger
            return None, False
        return (upstream if upstream.finish() else None), True

    async def _respond(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, decision: Decision, *, head: bool, close: bool
    ) -> None:
        body = json.dumps({"message": f"airlock sockguard refused {decision.rule}: {decision.reason}"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        try:
            reason = http.HTTPStatus(decision.status).phrase.encode()
        except ValueError:
            reason = b""
        data = conn.send(h11.Response(status_code=decision.status, headers=headers, reason=reason)) or b""
        data += b"" if head else conn.send(h11.Data(data=body)) or b""
        writer.write(data + (conn.send(h11.EndOfMessage()) or b""))
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    def _log(self, record: dict[str, object]) -> None:
        """One JSON line per decision on stderr: no bodies, no headers, no secrets."""
        print(json.dumps(record), file=self.log, flush=True)
