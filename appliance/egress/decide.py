"""The egress decision: may this source reach host:port, and at which exact address?

Why it is pure: every branch here is a security boundary, so it is a plain function of the routes,
the deny ranges and the resolver's answer, tested as a matrix without sockets. The order is fixed:
source -> location; host:port against the location's allowlist (a name is only resolved once it is
allowed, so a denied name never leaks into DNS); resolve once; classify every address; choose the
first usable one. The server dials ``Decision.ip`` and never the name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.egress.resolve import (
    Address,
    IPNetwork,
    ResolutionError,
    Resolver,
    classify,
    parse_ip,
    resolve,
    system_resolver,
)
from appliance.egress.routes import Route, RouteTable

_HOSTNAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


@dataclass(frozen=True)
class Decision:
    """The outcome and its reason, which is logged and sent back in X-Airlock-Egress-Reason."""

    allow: bool
    reason: str
    location: str | None
    host: str
    port: int
    ip: Address | None = None


def normalize_host(host: str) -> str:
    """The form allowlist entries are written in: lower-case, no trailing dot, IP literals canonical.

    A literal is written the way ``ipaddress`` prints it, unwrapped (``::ffff:127.0.0.1`` is
    ``127.0.0.1``), so one address has one spelling for the allowlist and the log.
    """
    host = host.strip().lower().rstrip(".")
    literal = parse_ip(host)
    return str(literal) if literal is not None else host


def admit(table: RouteTable, source: Address, host: str, port: int) -> Route | Decision:
    """Everything decidable before DNS: the route if host:port may be tried, else the refusal."""
    host = normalize_host(host)

    def refuse(reason: str, location: str | None = None) -> Decision:
        return Decision(False, reason, location, host, port)

    if table.error:
        return refuse(f"routes unavailable: {table.error}")
    route = table.locate(source)
    if route is None:
        return refuse(f"unknown source {source}")
    literal = parse_ip(host)
    if literal is None and (len(host) > 253 or not _HOSTNAME.match(host)):
        return refuse("invalid host", route.location)
    if not 0 < port < 65536:
        return refuse(f"invalid port {port}", route.location)
    if any(entry.matches(host, port) for entry in route.allow):
        return route
    if literal is not None and any(literal in network for network in route.allow_cidrs):
        return route
    return refuse(f"host not in allowlist: {host}:{port} for location {route.location}", route.location)


def choose(
    route: Route,
    host: str,
    port: int,
    addresses: Sequence[Address],
    always_deny: Sequence[tuple[IPNetwork, str]],
) -> Decision:
    """The first usable address, or a refusal naming why the first address was unusable."""
    host = normalize_host(host)
    refusal = "resolution failed: no addresses"
    for ip in addresses:
        usable, reason = classify(ip, always_deny, route.allow_cidrs)
        if usable:
            return Decision(True, f"allowed: {reason}", route.location, host, port, ip)
        if refusal.startswith("resolution failed"):
            refusal = reason
    return Decision(False, refusal, route.location, host, port)


async def decide(
    table: RouteTable,
    source: Address,
    host: str,
    port: int,
    always_deny: Sequence[tuple[IPNetwork, str]],
    resolver: Resolver = system_resolver,
    timeout: float | None = None,
) -> Decision:
    """admit, then resolve (only if admitted), then choose."""
    admitted = admit(table, source, host, port)
    if isinstance(admitted, Decision):
        return admitted
    host = normalize_host(host)
    try:
        addresses = await resolve(host, port, resolver, timeout)
    except ResolutionError as exc:
        return Decision(False, str(exc), admitted.location, host, port)
    return choose(admitted, host, port, addresses, always_deny)
