"""sockguard: the filtering proxy between the agent and the real Docker socket.

Even a compromised agent must not be able to start an unhardened container, touch containers or
networks airlock does not own, or reach exec/build/archive/volumes. sockguard runs as its own user,
listens on a unix socket, and forwards only what policy/sockguard.yaml allows and the rules accept.

- ``inspect``: normalize the request and decode bodies, so rules see exactly what is forwarded;
- ``rules``: pure decisions (look-ups of the real engine go through ``Lookups``, faked in tests);
- ``app``: the asyncio/h11 server and the forwarding; ``python -m appliance.sockguard`` runs it.

This module holds the vocabulary shared by rules and app (and the allowlist table); it imports neither.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from appliance.policy.files import read_yaml

# {id}: a container or network id or name; {name}: an image reference (may hold '/', ':' and '@').
_PLACEHOLDERS = {"{id}": r"(?P<id>[A-Za-z0-9][A-Za-z0-9_.-]*)", "{name}": r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.:/@-]*)"}


@dataclass(frozen=True)
class Found:
    """A container, network or volume as the engine reports it: full id (a volume's is its name), labels,
    and for networks Internal, for volumes the driver, its options and the host path the engine keeps it at."""

    id: str
    labels: dict[str, str]
    internal: bool = False
    driver: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    mountpoint: str = ""


@dataclass(frozen=True)
class ImageInfo:
    """An image as the engine resolved a reference: what ImagePolicy.decide needs."""

    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]


class Lookups(Protocol):
    """What sockguard asks the real engine before forwarding; None means the engine said 404."""

    async def container(self, ident: str) -> Found | None: ...

    async def network(self, ident: str) -> Found | None: ...

    async def volume(self, name: str) -> Found | None: ...

    async def image(self, ref: str) -> ImageInfo | None: ...


@dataclass(frozen=True)
class Decision:
    """One allow/deny, logged as one JSON line; ``target`` is what gets forwarded when allowed."""

    allow: bool
    rule: str
    reason: str
    path: str  # the normalized path that was checked
    target: bytes = b""
    status: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = ()  # added to the forwarded request (a pull's registry login)

    def log_record(self, method: str) -> dict[str, object]:
        return {
            "event": "sockguard.decision",
            "allow": self.allow,
            "rule": self.rule,
            "reason": self.reason,
            "method": method,
            "path": self.path,
        }


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


def load_table(directory: str | os.PathLike[str], checks: Collection[str]) -> Table:
    """Read policy/sockguard.yaml; ``checks`` are the scope rules rules.py implements (rules.CHECKS)."""
    f = read_yaml(Path(directory) / "sockguard.yaml")
    major, minor = f.str("min_api_version", pattern=r"\d+\.\d+").split(".")
    endpoints = []
    for e in f.children("endpoints"):
        method = e.str("method", pattern="GET|HEAD|POST|PUT|DELETE")
        path = e.str("path", pattern=r"(/([A-Za-z0-9_.-]+|\{id\}|\{name\}))+")
        check = e.str("check", None)
        if check is not None and check not in checks:
            raise e.error("check", f"unknown check {check!r}; known: {', '.join(sorted(checks))}")
        regex = "".join(_PLACEHOLDERS.get(p, re.escape(p)) for p in re.split(r"(\{id\}|\{name\})", path))
        endpoints.append(Endpoint(method, path, re.compile(regex), check))
        e.done()
    f.done()
    return Table(endpoints=tuple(endpoints), min_api=(int(major), int(minor)))


__all__ = ["Decision", "Endpoint", "Found", "ImageInfo", "Lookups", "Table", "load_table"]
