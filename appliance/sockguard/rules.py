"""sockguard's decisions: which Docker API calls the agent may make, on which objects, with which bodies.

Pure apart from the ``Lookups`` interface (ownership and image look-ups), so every rule is unit-tested
with fakes. Deny by default: an endpoint not in policy/sockguard.yaml, a body field not known, an object
without the airlock label — all refused. Container-create checks live in ``create.py``'s sibling section
below; each failing check names its rule, and the refusal says which.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from appliance import labels
from appliance.policy import Policy
from appliance.policy.loader import read_yaml
from appliance.sockguard import create
from appliance.sockguard.inspect import ENDPOINT_FIELDS, Refusal, Target, decode_object, lowered, normalize_target
from appliance.sockguard.inspect import only_fields as _only

_PLACEHOLDERS = {"{id}": r"(?P<id>[A-Za-z0-9][A-Za-z0-9_.-]*)", "{name}": r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.:/@-]*)"}
_FALSE = {"", "0", "no", "false", "none"}  # how dockerd's BoolValue reads a query flag as false
_RESOLVED_ID = re.compile(r"^[A-Za-z0-9]{1,128}$")


@dataclass(frozen=True)
class Found:
    """A container or network as the engine reports it: full id, labels, and (networks) Internal."""

    id: str
    labels: dict[str, str]
    internal: bool = False


class Lookups(Protocol):
    """What sockguard asks the real engine before forwarding; None means the engine answered 404."""

    async def container(self, ident: str) -> Found | None: ...
    async def network(self, ident: str) -> Found | None: ...
    async def image(self, ref: str) -> create.Image | None: ...


@dataclass(frozen=True)
class Decision:
    allow: bool
    rule: str
    reason: str
    path: str  # the normalized path that was checked (for the log)
    target: bytes = b""  # what is forwarded upstream when allowed
    status: int = 200


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    regex: re.Pattern[str]
    check: str | None


@dataclass(frozen=True)
class Table:
    """policy/sockguard.yaml: the endpoint allowlist and the oldest API version accepted."""

    endpoints: tuple[Endpoint, ...]
    min_api: tuple[int, int]

    def match(self, method: str, path: str) -> tuple[Endpoint, re.Match[str]] | None:
        for endpoint in self.endpoints:
            m = endpoint.regex.fullmatch(path)
            if m and endpoint.method == method:
                return endpoint, m
        return None


def load_table(directory: str | os.PathLike[str]) -> Table:
    f = read_yaml(Path(directory) / "sockguard.yaml")
    major, minor = f.str("min_api_version", pattern=r"\d+\.\d+").split(".")
    endpoints = []
    for e in f.children("endpoints"):
        method = e.str("method", pattern="GET|HEAD|POST|PUT|DELETE")
        path = e.str("path", pattern=r"(/([A-Za-z0-9_.-]+|\{id\}|\{name\}))+")
        check = e.str("check", None)
        if check is not None and check not in CHECKS:
            raise e.error("check", f"unknown check {check!r}; known: {', '.join(sorted(CHECKS))}")
        parts = re.split(r"(\{id\}|\{name\})", path)
        regex = re.compile("".join(_PLACEHOLDERS.get(p, re.escape(p)) for p in parts))
        endpoints.append(Endpoint(method, path, regex, check))
        e.done()
    f.done()
    return Table(endpoints=tuple(endpoints), min_api=(int(major), int(minor)))


@dataclass(frozen=True)
class Ctx:
    method: str
    target: Target
    match: re.Match[str]
    body: bytes
    policy: Policy
    lookups: Lookups

    def rewrite(self, group: str, resolved: str) -> bytes:
        """Forward with the engine's full id, so the action hits exactly the object that was checked."""
        if not _RESOLVED_ID.match(resolved):
            raise Refusal("upstream", "engine returned an unexpected object id", status=502)
        m = self.match
        return self.target.encode(path=m.string[: m.start(group)] + resolved + m.string[m.end(group) :])


async def decide(
    method: str, raw_target: bytes, body: bytes, *, table: Table, policy: Policy, lookups: Lookups
) -> Decision:
    """Normalize, match the allowlist, run the endpoint's scope check. Never raises Refusal."""
    path = raw_target.decode("ascii", "backslashreplace")[:300]
    try:
        target = normalize_target(raw_target)
        path = target.path
        if target.version is not None and target.version < table.min_api:
            raise Refusal("api-version", f"API v{target.version[0]}.{target.version[1]} is older than allowed")
        found = table.match(method, target.path)
        if found is None:
            raise Refusal("endpoint", f"{method} {target.path} is not allowed by policy/sockguard.yaml")
        endpoint, match = found
        if body and endpoint.check not in BODY_CHECKS:
            raise Refusal("body", f"{method} {endpoint.path} takes no request body")
        ctx = Ctx(method, target, match, body, policy, lookups)
        check = CHECKS.get(endpoint.check or "", _endpoint_only)
        reason, forward = await check(ctx)
        return Decision(True, endpoint.check or "endpoint", reason, path, forward)
    except Refusal as refusal:
        return Decision(False, refusal.rule, refusal.reason, path, status=refusal.status)


def refused(refusal: Refusal, path: str) -> Decision:
    return Decision(False, refusal.rule, refusal.reason, path, status=refusal.status)


Check = Callable[[Ctx], Awaitable[tuple[str, bytes]]]


async def _endpoint_only(ctx: Ctx) -> tuple[str, bytes]:
    return f"{ctx.method} {ctx.target.path} is allowed", ctx.target.encode()


async def owned_container(ctx: Ctx, ident: str, *, appliance_ok: bool) -> Found:
    found = await ctx.lookups.container(ident)
    if found is None:
        raise Refusal("owner", f"no such container: {ident}", status=404)
    if labels.is_appliance(found.labels):
        if appliance_ok:
            return found
        raise Refusal("owner", f"container {ident} is the appliance itself")
    if not labels.is_managed(found.labels):
        raise Refusal("owner", f"container {ident} is not labelled {labels.MANAGED}=true")
    return found


async def owned_network(ctx: Ctx, ident: str, *, internal: bool) -> Found:
    found = await ctx.lookups.network(ident)
    if found is None:
        raise Refusal("owner", f"no such network: {ident}", status=404)
    if not labels.is_managed(found.labels) or labels.is_appliance(found.labels):
        raise Refusal("owner", f"network {ident} is not labelled {labels.MANAGED}=true")
    if internal and not found.internal:
        raise Refusal("network-internal", f"network {ident} is not Internal")
    return found


async def _container_owned(ctx: Ctx, appliance_ok: bool = False) -> tuple[str, bytes]:
    link = ctx.target.param("link")
    if link is not None and link.lower() not in _FALSE:
        raise Refusal("query", "link removal is not allowed")
    found = await owned_container(ctx, ctx.match["id"], appliance_ok=appliance_ok)
    return f"container {ctx.match['id']} is {_whose(found)}", ctx.rewrite("id", found.id)


async def _container_owned_or_appliance(ctx: Ctx) -> tuple[str, bytes]:
    return await _container_owned(ctx, appliance_ok=True)


def _whose(found: Found) -> str:
    return "the appliance" if labels.is_appliance(found.labels) else "managed by airlock"


async def _network_owned(ctx: Ctx) -> tuple[str, bytes]:
    found = await owned_network(ctx, ctx.match["id"], internal=False)
    return f"network {ctx.match['id']} is managed by airlock", ctx.rewrite("id", found.id)


async def _list_managed(ctx: Ctx) -> tuple[str, bytes]:
    """Add label=airlock.managed=true to `filters`; Docker ANDs label filters, so this only narrows."""
    raw = ctx.target.param("filters")
    try:
        filters = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise Refusal("query", "filters is not JSON") from None
    if not isinstance(filters, dict):
        raise Refusal("query", "filters must be a JSON object")
    label = filters.get("label", [])
    label = list(label) if isinstance(label, dict | list) else label  # the legacy {"k=v": true} form too
    if not isinstance(label, list) or not all(isinstance(item, str) for item in label):
        raise Refusal("query", "filters.label must be a list of strings")
    filters["label"] = [*label, f"{labels.MANAGED}=true"]
    query = [(k, v) for k, v in ctx.target.query if k != "filters"] + [("filters", json.dumps(filters))]
    return f"listing narrowed to {labels.MANAGED}=true", ctx.target.encode(query=query)


async def _container_create(ctx: Ctx) -> tuple[str, bytes]:
    await create.check_container(ctx.body, ctx.policy, ctx.lookups)
    return "container create body passed every hardening check", ctx.target.encode()


async def _network_create(ctx: Ctx) -> tuple[str, bytes]:
    create.check_network(ctx.body)
    return "internal airlock network", ctx.target.encode()


async def _network_attach(ctx: Ctx) -> tuple[str, bytes]:
    """connect/disconnect: the network is ours (and Internal to connect); the container ours or the appliance."""
    body = decode_object(ctx.body)
    _only(body, lowered("Container EndpointConfig Force"))
    connect = ctx.target.path.endswith("/connect")
    network = await owned_network(ctx, ctx.match["id"], internal=connect)
    if not body.str("Container"):
        raise Refusal("body", "Container is required")
    container = await owned_container(ctx, body.str("Container"), appliance_ok=True)
    endpoint = body.obj("EndpointConfig")
    _only(endpoint, ENDPOINT_FIELDS)
    if endpoint.list("Links") or endpoint.mapping("DriverOpts"):
        raise Refusal("network-options", "EndpointConfig Links and DriverOpts are not allowed")
    reason = f"network {ctx.match['id']} is ours, container {body.str('Container')} is {_whose(container)}"
    return reason, ctx.rewrite("id", network.id)


async def _image_pull(ctx: Ctx) -> tuple[str, bytes]:
    if not ctx.policy.images.allow_pull:
        raise Refusal("pull", "policy/images.yaml has allow_pull: false")
    extra = sorted({k for k, _ in ctx.target.query} - {"fromImage", "tag", "platform"})
    if extra:
        raise Refusal("pull", f"only fromImage, tag and platform may be given (got {', '.join(extra)})")
    image, tag = ctx.target.param("fromImage") or "", ctx.target.param("tag") or ""
    if not create.IMAGE_REF.fullmatch(image) or (tag and not create.IMAGE_REF.fullmatch(tag)):
        raise Refusal("pull", "fromImage (and tag) must be plain image references")
    if tag.startswith("sha256:") or "@" in image:
        tags, digests = (), (image if "@" in image else f"{image}@{tag}",)
    else:
        tags, digests = (image if ":" in image.rsplit("/", 1)[-1] else f"{image}:{tag or 'latest'}",), ()
    allowed, why = ctx.policy.images.decide(image, tags, digests)
    if not allowed:
        raise Refusal("pull", why)
    return why, ctx.target.encode()


CHECKS: dict[str, Check] = {
    "container-create": _container_create,
    "container-owned": _container_owned,
    "container-owned-or-appliance": _container_owned_or_appliance,
    "list-managed": _list_managed,
    "network-create": _network_create,
    "network-owned": _network_owned,
    "network-attach": _network_attach,
    "image-pull": _image_pull,
}
BODY_CHECKS = {"container-create", "network-create", "network-attach"}
