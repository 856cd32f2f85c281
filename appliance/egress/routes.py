"""The routes file: which location a client is, by its source subnet, and what it may reach.

Why a file: the agent owns the Docker networks and locations; the proxy only needs this mapping, so
the agent writes it (atomically, by rename) and the proxy re-reads it when its stat changes. A
missing or invalid file refuses every request (with the error logged) rather than crashing the
proxy or falling back to something looser.

Format (JSON)::

    {"version": 1, "routes": [{"location": "example", "cidrs": ["172.28.5.0/24"],
      "allow": ["pypi.org:443", "*.example.com:*"], "allow_cidrs": ["10.1.0.0/16"]}]}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from appliance.egress import log_event
from appliance.egress.resolve import Address, IPNetwork, unwrap
from appliance.policy import HostPort
from appliance.policy.files import file_stamp
from protocol.errors import PolicyError
from protocol.fields import SUPPORTED_VERSION, Fields

# The same name and host:port grammar locations.yaml uses, so an entry means the same thing in both files.
from protocol.locations import LOCATION_NAME, parse_host_port

MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Route:
    """One location's network and egress allowlist."""

    location: str
    cidrs: tuple[IPNetwork, ...]  # the location network's subnets: a source here *is* this location
    allow: tuple[HostPort, ...] = ()
    allow_cidrs: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class RouteTable:
    """The routes in force. ``error`` set means the file is unusable and everything is refused."""

    routes: tuple[Route, ...] = ()
    error: str | None = None

    def locate(self, source: Address) -> Route | None:
        source = unwrap(source)
        for route in self.routes:
            if any(source in network for network in route.cidrs):
                return route
        return None


def parse_routes(text: str, file: str = "routes") -> RouteTable:
    """Validate the whole file or raise PolicyError naming the field; nothing partial goes live."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(file, f"line {exc.lineno}", f"not valid JSON: {exc.msg}") from None
    f = Fields(file, data)
    version = f.raw("version", required=True)
    if version != SUPPORTED_VERSION:
        raise f.error("version", f"unsupported version {version!r}; this proxy reads {SUPPORTED_VERSION}")
    routes: list[Route] = []
    for entry in f.children("routes"):
        route = _route(entry)
        for other in routes:
            if other.location == route.location:
                raise entry.error("location", f"duplicate location {route.location!r}")
            for a in route.cidrs:
                for b in other.cidrs:
                    if a.version == b.version and a.overlaps(b):  # type: ignore[arg-type]
                        raise entry.error("cidrs", f"{a} overlaps {b} of location {other.location!r}")
        routes.append(route)
    f.done()
    return RouteTable(routes=tuple(routes))


def _route(f: Fields) -> Route:
    location = f.str("location", pattern=LOCATION_NAME)
    cidrs = f.cidrs("cidrs")
    if not cidrs:
        raise f.error("cidrs", "must list at least one source subnet")
    allow = [parse_host_port(f, f"allow[{i}]", item) for i, item in enumerate(f.str_list("allow", []))]
    allow_cidrs = f.cidrs("allow_cidrs", [])
    f.done()
    return Route(location=location, cidrs=cidrs, allow=tuple(allow), allow_cidrs=allow_cidrs)


class RoutesFile:
    """The routes file on disk, re-read whenever its inode, size or times change.

    A stat per request is cheap next to a DNS lookup and a TCP connect, and it means a rewritten
    file is in force for the very next request, with no signal or watcher to get wrong.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: object = object()  # never equal to a real stamp: the first call loads
        self._table = RouteTable(error="routes file not loaded yet")

    def current(self) -> RouteTable:
        stamp = file_stamp(self.path)
        if stamp != self._stamp:
            self._stamp = stamp
            self._table = self._load()
            if self._table.error:
                log_event("egress.routes", ok=False, file=str(self.path), error=self._table.error)
            else:
                names = [route.location for route in self._table.routes]
                log_event("egress.routes", ok=True, file=str(self.path), locations=names)
        return self._table

    def _load(self) -> RouteTable:
        try:
            with self.path.open("rb") as fh:
                raw = fh.read(MAX_BYTES + 1)
        except OSError as exc:
            return RouteTable(error=f"routes file {self.path}: cannot read: {exc.strerror or exc}")
        if len(raw) > MAX_BYTES:
            return RouteTable(error=f"routes file {self.path}: larger than {MAX_BYTES} bytes")
        try:
            return parse_routes(raw.decode("utf-8"), str(self.path))
        except UnicodeDecodeError:
            return RouteTable(error=f"routes file {self.path}: not UTF-8")
        except PolicyError as exc:
            return RouteTable(error=str(exc))
