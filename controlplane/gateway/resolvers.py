"""Thin resolvers: read the caller from scope["auth"], call the store or the queue, shape the answer.
No SQL and no crypto here; authentication already happened in auth.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from graphql import GraphQLError, GraphQLResolveInfo

from controlplane.gateway.auth import Caller
from controlplane.gateway.queue import WorkQueue
from controlplane.gateway.schema import Resolvers
from controlplane.gateway.store import AgentRecord, AgentStore, EnrollmentError, RotationError
from controlplane.storage.service import StorageService
from protocol.errors import SignatureError
from protocol.keys import rotation_message
from protocol.signing import SigningKey, key_id_of, load_public_key, verify_bytes
from protocol.storage_calls import StorageCallRefused
from protocol.work import read_result, sign_work

MAX_WAIT_SECONDS = 30
MAX_BATCH = 64


@dataclass
class GatewayContext:
    store: AgentStore
    queue: WorkQueue
    key: SigningKey  # the control plane's own key: signs work, is pinned by agents
    on_enrolled: Callable[[AgentRecord], None] = lambda _agent: None  # e.g. send the new agent its locations
    storage: StorageService | None = None  # run workers' storage calls, relayed by the appliance
    key_grace_seconds: float = 24 * 3600  # how long a key an agent rotated away from keeps working


def _caller(info: GraphQLResolveInfo) -> Caller:
    return info.context["request"].scope["auth"]


def _enrolled(info: GraphQLResolveInfo) -> Caller:
    caller = _caller(info)
    if caller.agent is None:
        raise GraphQLError("this key is not enrolled")
    return caller


def _ctx(info: GraphQLResolveInfo) -> GatewayContext:
    return info.context["gateway"]


def _raw(pem_or_b64: str) -> bytes:
    key = load_public_key(pem_or_b64)
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def bind() -> Resolvers:
    query: dict[str, Callable[..., Any]] = {}
    mutation: dict[str, Callable[..., Any]] = {}

    def field(table: dict[str, Callable[..., Any]], name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            table[name] = fn
            return fn

        return register

    @field(query, "agent")
    def resolve_agent(_: Any, info: GraphQLResolveInfo) -> dict[str, Any]:
        agent = _enrolled(info).agent
        assert agent is not None
        return {"id": agent.id, "deployment": agent.deployment, "keyId": agent.key_id, "labels": list(agent.labels)}

    @field(mutation, "enrollAgent")
    def resolve_enroll(_: Any, info: GraphQLResolveInfo, token: str, publicKey: str, labels: list[str]) -> dict:
        caller, ctx = _caller(info), _ctx(info)
        if caller.agent is not None:
            raise GraphQLError("this key is already enrolled")
        assert caller.enrolling_key is not None
        signed_raw = caller.enrolling_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        try:
            same_key = _raw(publicKey) == signed_raw
        except Exception:
            same_key = False
        if not same_key:
            raise GraphQLError("publicKey is not the key that signed this request")
        try:
            agent = ctx.store.enroll(token, caller.key_id, publicKey, tuple(labels))
        except EnrollmentError as exc:
            ctx.store.audit(operation="enrollAgent", accepted=False, reason=str(exc), key_id=caller.key_id)
            raise GraphQLError(f"enrollment refused: {exc}") from None
        ctx.store.audit(operation="enrollAgent", accepted=True, reason="enrolled", key_id=caller.key_id,
                        agent_id=agent.id)
        ctx.on_enrolled(agent)
        return {"agentId": agent.id, "deployment": agent.deployment,
                "controlPlaneKey": ctx.key.public_pem(), "controlPlaneKeyId": ctx.key.key_id}

    @field(mutation, "rotateAgentKey")
    def resolve_rotate(_: Any, info: GraphQLResolveInfo, publicKey: str, proof: str) -> dict:
        caller, ctx = _enrolled(info), _ctx(info)
        agent = caller.agent
        assert agent is not None
        try:
            if not agent.current:
                raise RotationError(f"key {caller.key_id} was already rotated away from; sign with the current key")
            try:
                new_key = load_public_key(publicKey)
            except Exception:
                raise RotationError("publicKey is not an Ed25519 public key (PEM)") from None
            new_key_id = key_id_of(new_key)
            try:
                verify_bytes(new_key, rotation_message(agent.id, caller.key_id, new_key_id), proof)
            except SignatureError:
                raise RotationError("proof is not the new key's signature over the rotation message") from None
            until = ctx.store.rotate_key(agent.id, caller.key_id, new_key_id, publicKey, ctx.key_grace_seconds)
        except RotationError as exc:
            ctx.store.audit(operation="rotateAgentKey", accepted=False, reason=str(exc), key_id=caller.key_id,
                            agent_id=agent.id)
            raise GraphQLError(f"key rotation refused: {exc}") from None
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
        ctx.store.audit(operation="rotateAgentKey", accepted=True, key_id=caller.key_id, agent_id=agent.id,
                        reason=f"rotated from {caller.key_id} to {new_key_id}; {caller.key_id} accepted until {when}")
        return {"agentId": agent.id, "keyId": new_key_id, "previousKeyId": caller.key_id,
                "previousKeyValidUntil": until}

    @field(mutation, "claimWork")
    async def resolve_claim(_: Any, info: GraphQLResolveInfo, queues: list[str], waitSeconds: int = 25,
                            limit: int = 16) -> list[dict]:
        caller, ctx = _enrolled(info), _ctx(info)
        assert caller.agent is not None
        foreign = sorted(set(queues) - set(caller.agent.labels))
        if foreign or not queues:
            raise GraphQLError(f"queues {foreign or '[]'} are not among this agent's labels")
        wait = max(0, min(waitSeconds, MAX_WAIT_SECONDS))
        request, batch = info.context["request"], min(limit, MAX_BATCH)
        deployment, agent_id = caller.agent.deployment, caller.agent.id
        deadline = time.monotonic() + wait
        items = await asyncio.to_thread(ctx.queue.claim, deployment, queues, agent_id, limit=batch)
        # Wait in short slices so a poll whose agent went away (killed, restarted) stops claiming work.
        while not items and time.monotonic() < deadline and not await request.is_disconnected():
            slice_ = min(1.0, deadline - time.monotonic())
            if await ctx.queue.wait_for_work(deployment, queues, timeout=slice_):
                items = await asyncio.to_thread(ctx.queue.claim, deployment, queues, agent_id, limit=batch)
        if items and await request.is_disconnected():
            ctx.queue.release([item.id for item in items], agent_id)  # back to pending now, not after the lease
            return []
        out = [sign_work(ctx.key, item.id, item.kind, item.queue, item.payload, item.attempt) for item in items]
        if out:
            ctx.store.audit(operation="claimWork", accepted=True, reason=f"{len(out)} item(s)",
                            key_id=caller.key_id, agent_id=caller.agent.id)
        return out

    @field(mutation, "postResults")
    def resolve_results(_: Any, info: GraphQLResolveInfo, results: list[dict]) -> int:
        caller, ctx = _enrolled(info), _ctx(info)
        assert caller.agent is not None
        accepted = 0
        for r in results[:MAX_BATCH * 4]:
            try:
                result, error = read_result(r)
            except ValueError as exc:
                raise GraphQLError(str(exc)) from None
            accepted += ctx.queue.complete(r["id"], caller.agent.id, result=result, error=error)
        ctx.store.audit(operation="postResults", accepted=True, reason=f"{accepted}/{len(results)} accepted",
                        key_id=caller.key_id, agent_id=caller.agent.id)
        return accepted

    @field(mutation, "heartbeat")
    def resolve_heartbeat(_: Any, info: GraphQLResolveInfo, input: dict) -> bool:
        caller, ctx = _enrolled(info), _ctx(info)
        assert caller.agent is not None
        ctx.store.record_heartbeat(caller.agent.id, input)
        return True

    def _storage(info: GraphQLResolveInfo) -> tuple[Caller, StorageService]:
        caller, ctx = _enrolled(info), _ctx(info)
        if ctx.storage is None:
            raise GraphQLError("this gateway does not serve run storage")
        return caller, ctx.storage

    @field(mutation, "storageWrite")
    async def resolve_storage_write(_: Any, info: GraphQLResolveInfo, runId: str, location: str,
                                    writes: list[dict]) -> dict:
        caller, storage = _storage(info)
        return await asyncio.to_thread(storage.write, caller.agent, caller.key_id, runId, location, writes)

    @field(mutation, "storageCall")
    async def resolve_storage_call(_: Any, info: GraphQLResolveInfo, runId: str, location: str, call: dict) -> dict:
        caller, storage = _storage(info)
        try:
            return await asyncio.to_thread(storage.call, caller.agent, caller.key_id, runId, location, call)
        except StorageCallRefused as exc:
            raise GraphQLError(str(exc)) from None

    return {"Query": query, "Mutation": mutation}
