"""The agent API gateway as an ASGI app: authentication middleware outermost, then GraphQL.

    POST /graphql         the agent API (protocol/schema.graphql), signed requests only
    GET  /v1/channel      the work channel, a WebSocket the agent holds open (channel.py), signed upgrade only
    GET  /schema.graphql  the SDL this gateway serves (contract-tested against the checked-in file)
    GET  /healthz         liveness
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import graphql
import sqlalchemy as sa
from graphql import print_schema
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute

from controlplane.gateway.auth import DEFAULT_MAX_BODY, SignedRequestMiddleware
from controlplane.gateway.channel import ChannelHub, channel_endpoint
from controlplane.gateway.documents import Validator, parse_cached
from controlplane.gateway.queue import WorkQueue
from controlplane.gateway.resolvers import GatewayContext, bind
from controlplane.gateway.schema import build_schema
from controlplane.gateway.store import AgentStore
from controlplane.registry import Registry
from controlplane.storage.service import StorageService
from protocol.channel import CHANNEL_PATH
from protocol.signing import NonceCache, SigningKey


def _dagster_instance() -> Any:
    from dagster import DagsterInstance

    return DagsterInstance.get()


def build_app(engine: sa.Engine, key: SigningKey, *, max_body: int = DEFAULT_MAX_BODY,
              max_skew_seconds: int = 300, instance_factory: Callable[[], Any] | None = _dagster_instance,
              key_grace_seconds: float = 24 * 3600) -> Starlette:
    """The gateway. `instance_factory` gives the Dagster instance run storage calls execute on (None: no runs)."""
    store, queue = AgentStore(engine), WorkQueue(engine)
    store.create_schema()
    queue.create_schema()
    schema = build_schema(bind())
    hub = ChannelHub()  # the agents' open work channels; the relay in this process hands calls to them
    validator = Validator(schema)
    registry = Registry(engine, queue)
    registry.create_schema()
    storage = None
    if instance_factory is not None:
        storage = StorageService(engine, instance_factory, serves=_serves(registry), audit=store.audit)
        storage.create_schema()
    context = GatewayContext(store=store, queue=queue, key=key, storage=storage, key_grace_seconds=key_grace_seconds,
                             on_enrolled=lambda agent: registry.publish(agent.deployment, *agent.labels))

    async def graphql_endpoint(request: Request) -> Response:
        data = request.scope["auth"].body  # parsed once by the middleware, from the exact signed bytes
        variables = data.get("variables")
        invalid = validator.errors(data["query"])
        if invalid:
            outcome = graphql.ExecutionResult(data=None, errors=list(invalid))
        else:
            executed = graphql.execute(
                schema, parse_cached(data["query"]), variable_values=variables if isinstance(variables, dict) else None,
                operation_name=data.get("operationName"), context_value={"request": request, "gateway": context})
            outcome = await executed if inspect.isawaitable(executed) else executed
        result: dict = {"data": outcome.data}
        success = not outcome.errors
        if outcome.errors:
            result["errors"] = [error.formatted for error in outcome.errors]
            store.audit(operation="graphql", accepted=False, reason=json.dumps(result.get("errors"))[:500],
                        key_id=request.scope["auth"].key_id)
        return JSONResponse(result, status_code=200 if success else 400)

    async def sdl(_: Request) -> Response:
        return PlainTextResponse(print_schema(schema))

    async def healthz(_: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/graphql", graphql_endpoint, methods=["POST"]),
            Route("/schema.graphql", sdl, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            WebSocketRoute(CHANNEL_PATH, channel_endpoint(hub, key=key, store=store, queue=queue)),
        ],
        middleware=[Middleware(SignedRequestMiddleware, store=store, max_body=max_body,
                               nonces=NonceCache(window_seconds=max_skew_seconds * 2),
                               max_skew_seconds=max_skew_seconds)],
    )
    app.state.store, app.state.queue, app.state.key, app.state.hub = store, queue, key, hub
    return app


def _serves(registry: Registry) -> Callable[[Any, str], bool]:
    def serves(agent: Any, location: str) -> bool:
        record = registry.get(agent.deployment, location)
        return record is not None and record.spec.queue in agent.labels

    return serves
