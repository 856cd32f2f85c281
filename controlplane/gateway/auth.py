"""Authenticate once, before anything else: read the body (bounded), check the RFC 9421 signature and
the GraphQL operation, and put the caller in scope["auth"]. Resolvers never see an unauthenticated call.

Refusals are answered here with a clear 4xx and an audit entry, and nothing downstream runs:
  400 malformed JSON / GraphQL · 401 unsigned, bad signature, tampered, unknown key, expired, replayed
  401 a key rotated away from, past its grace period · 403 revoked agent · 413 body too large.
The work channel's WebSocket upgrade (GET /v1/channel, protocol/channel.py) is checked the same way (its
signature covers the empty body's digest and the query, which carries the queues and the agent's ephemeral
key); only an enrolled, active agent may open one, for queues among its labels. A refused upgrade gets the
same JSON answer as an HTTP status, where the server supports the ASGI denial response (uvicorn does).
`quiet_refused_upgrades` keeps uvicorn from logging each such refusal as an ERROR.
"""

from __future__ import annotations

import base64
import contextvars
import json
import logging
import re
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from graphql import GraphQLError, OperationDefinitionNode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controlplane.gateway.documents import parse_cached
from controlplane.gateway.store import AgentRecord, AgentStore
from protocol.channel import CHANNEL_PATH
from protocol.errors import PermanentError, SignatureError
from protocol.limits import AGENT_MAX_BODY, DEFAULT_MAX_BODY
from protocol.signing import ENROLL_KEY_HEADER, NonceCache, RequestVerifier, Verified, key_id_of, load_public_key

_KEY_ID = re.compile(r'keyid="([^"]{1,200})"')
_upgrade_refused: contextvars.ContextVar[bool] = contextvars.ContextVar("airlock_upgrade_refused", default=False)
_INCOMPLETE_HANDSHAKE = "ASGI callable returned without completing handshake."


@dataclass(frozen=True)
class Caller:
    """Who signed the request: an enrolled agent, or (only for enrollAgent) the key being enrolled."""

    key_id: str
    agent: AgentRecord | None
    enrolling_key: Ed25519PublicKey | None
    operation: tuple[str, ...]  # top-level field names of the operation
    body: dict[str, Any]


class Refused(PermanentError):
    def __init__(self, status: int, code: str, message: str, key_id: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.key_id = status, code, message, key_id


def operation_fields(body: dict[str, Any]) -> tuple[str, str, tuple[str, ...]]:
    """(operation type, name, top-level fields) of the operation the request would run."""
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise Refused(400, "malformed", "request body needs a GraphQL 'query' string")
    try:
        document = parse_cached(query)
    except GraphQLError as exc:
        raise Refused(400, "malformed", f"GraphQL syntax error: {exc.message}") from None
    ops = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    wanted = body.get("operationName")
    chosen = [o for o in ops if wanted is None or (o.name and o.name.value == wanted)]
    if len(chosen) != 1:
        raise Refused(400, "malformed", "the document must hold exactly one operation (or name it)")
    op = chosen[0]
    fields = tuple(sel.name.value for sel in op.selection_set.selections if hasattr(sel, "name"))
    return op.operation.value, (op.name.value if op.name else ""), fields


class SignedRequestMiddleware:
    """Pure ASGI middleware in front of POST /graphql."""

    def __init__(self, app: ASGIApp, store: AgentStore, nonces: NonceCache, *, path: str = "/graphql",
                 max_body: int = DEFAULT_MAX_BODY, agent_max_body: int = AGENT_MAX_BODY,
                 max_skew_seconds: int = 300) -> None:
        self.app, self.store, self.path, self.max_body = app, store, path, max_body
        self.agent_max_body = agent_max_body
        self.nonces, self.max_skew = nonces, max_skew_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == CHANNEL_PATH:
            await self._channel(scope, receive, send)
            return
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(scope, receive)
            scope["auth"] = self._authenticate(scope, body)
        except Refused as refusal:
            self.store.audit(operation=f"{scope['method']} {scope['path']}", accepted=False,
                             reason=f"{refusal.code}: {refusal.message}", key_id=refusal.key_id)
            await _refuse(send, refusal)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _channel(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            scope["auth"] = self._authenticate_channel(scope)
        except Refused as refusal:
            self.store.audit(operation=f"GET {CHANNEL_PATH}", accepted=False,
                             reason=f"{refusal.code}: {refusal.message}", key_id=refusal.key_id)
            await _refuse_websocket(scope, receive, send, refusal)
            return
        await self.app(scope, receive, send)

    def _authenticate_channel(self, scope: Scope) -> Caller:
        verified, agent, _ = self._verify(scope, "GET", b"")
        if agent is None:
            raise Refused(401, "unknown-key", f"key {verified.key_id} is not enrolled", verified.key_id)
        self._check_active(verified.key_id, agent)
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        queues = [q for q in ",".join(query.get("queues", [])).split(",") if q]
        ek = query.get("ek", [""])[0]
        if not queues or not ek:
            raise Refused(400, "malformed", "the channel needs ?queues=<q1,q2>&ek=<ephemeral key>", verified.key_id)
        foreign = sorted(set(queues) - set(agent.labels))
        if foreign:
            raise Refused(403, "queues", f"queues {foreign} are not among this agent's labels", verified.key_id)
        return Caller(verified.key_id, agent, None, ("channel",), {"queues": queues, "ek": ek})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        if scope["method"] != "POST":
            raise Refused(405, "method", "the agent API takes POST only")
        headers = dict(scope["headers"])
        limit = self._body_limit(headers)
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise Refused(413, "too-large", f"body larger than {limit} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refused(413, "too-large", f"body larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _body_limit(self, headers: dict[bytes, bytes]) -> int:
        """The larger limit only for a request that names an enrolled agent's key (the signature is checked
        after the body is read); anyone else gets the small one."""
        found = _KEY_ID.search(headers.get(b"signature-input", b"").decode("latin-1"))
        agent = self.store.by_key(found.group(1)) if found else None
        return self.agent_max_body if agent is not None and agent.status == "active" else self.max_body

    def _authenticate(self, scope: Scope, body: bytes) -> Caller:
        verified, agent, enrolling = self._verify(scope, scope["method"], body)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Refused(400, "malformed", f"body is not JSON: {exc}", verified.key_id) from None
        if not isinstance(payload, dict):
            raise Refused(400, "malformed", "body must be a JSON object", verified.key_id)
        kind, _, fields = operation_fields(payload)
        if agent is None:
            if (kind, fields) != ("mutation", ("enrollAgent",)) or enrolling is None:
                raise Refused(401, "unknown-key", f"key {verified.key_id} is not enrolled", verified.key_id)
            return Caller(verified.key_id, None, enrolling, fields, payload)
        self._check_active(verified.key_id, agent)
        return Caller(verified.key_id, agent, None, fields, payload)

    @staticmethod
    def _check_active(key_id: str, agent: AgentRecord) -> None:
        if agent.status == "retired":
            until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(agent.valid_until or 0))
            raise Refused(401, "retired", f"key {key_id} of {agent.id} was rotated away from and retired at {until}",
                          key_id)
        if agent.status != "active":
            raise Refused(403, "revoked", f"key {key_id} of {agent.id} is {agent.status}", key_id)

    def _verify(self, scope: Scope, method: str,
                body: bytes) -> tuple[Verified, AgentRecord | None, Ed25519PublicKey | None]:
        """Check the RFC 9421 signature: (what it proves, the enrolled agent of its key, or the key offered
        for enrollment)."""
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"https://gateway{scope['path']}" + (f"?{query}" if query else "")
        enrolling: dict[str, Ed25519PublicKey] = {}
        found: dict[str, AgentRecord] = {}  # the record the signature was checked against, reused below

        def resolve(key_id: str) -> Ed25519PublicKey | None:
            agent = self.store.by_key(key_id)
            if agent is not None:
                found[key_id] = agent
                return load_public_key(agent.public_key)
            offered = _offered_key(headers)
            if offered is not None and key_id_of(offered) == key_id:
                enrolling[key_id] = offered
                return offered
            return None

        verifier = RequestVerifier(resolve, self.nonces, max_skew_seconds=self.max_skew)
        try:
            verified = verifier.verify(method, url, headers, body)
        except SignatureError as exc:
            raise Refused(401, exc.reason, str(exc)) from None
        return verified, found.get(verified.key_id), enrolling.get(verified.key_id)


def _offered_key(headers: list[tuple[str, str]]) -> Ed25519PublicKey | None:
    for name, value in headers:
        if name.lower() == ENROLL_KEY_HEADER:
            try:
                return Ed25519PublicKey.from_public_bytes(base64.b64decode(value, validate=True))
            except ValueError:
                return None
    return None


async def _refuse(send: Send, refusal: Refused) -> None:
    body = json.dumps({"errors": [{"message": refusal.message, "extensions": {"code": refusal.code}}]}).encode()
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _refuse_websocket(scope: Scope, receive: Receive, send: Send, refusal: Refused) -> None:
    """Answer a refused upgrade with the HTTP status and JSON message, or (no denial extension) a 1008 close."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": refusal.message[:120]})
        return
    body = json.dumps({"errors": [{"message": refusal.message, "extensions": {"code": refusal.code}}]}).encode()
    await send({"type": "websocket.http.response.start", "status": refusal.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "websocket.http.response.body", "body": body})
    _upgrade_refused.set(True)  # this connection's task only: see quiet_refused_upgrades


class _RefusedUpgradeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_upgrade_refused.get() and record.getMessage() == _INCOMPLETE_HANDSHAKE)


def quiet_refused_upgrades(logger: logging.Logger | None = None) -> None:
    """Stop uvicorn (websockets-sansio) logging "ASGI callable returned without completing handshake." at ERROR
    after every upgrade this middleware refused: it forgets that a denial response ends the handshake
    (Kludex/uvicorn pull request 3138). The filter drops that one line only in the connection whose upgrade was
    refused here, so an app that really returns without answering still logs it. Idempotent."""
    logger = logger or logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _RefusedUpgradeFilter) for f in logger.filters):
        logger.addFilter(_RefusedUpgradeFilter())
