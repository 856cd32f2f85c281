"""sockguard: the filtering proxy between the agent and the real Docker socket.

Even a compromised agent must not be able to start an unhardened container, touch containers or
networks airlock does not own, or reach exec/build/archive/volumes. sockguard runs as its own user,
listens on a unix socket, and forwards only what policy/sockguard.yaml allows and the rules accept.

- ``inspect``: normalize the request and decode bodies, so rules see exactly what is forwarded;
- ``rules``: pure decisions (look-ups of the real engine go through ``Lookups``, faked in tests);
- ``app``: the asyncio/h11 server and the forwarding; ``python -m appliance.sockguard`` runs it.

This module holds only the small vocabulary shared by rules and app; it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Found:
    """A container or network as the engine reports it: full id, labels and (networks) Internal."""

    id: str
    labels: dict[str, str]
    internal: bool = False


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

    def log_record(self, method: str) -> dict[str, object]:
        return {
            "event": "sockguard.decision",
            "allow": self.allow,
            "rule": self.rule,
            "reason": self.reason,
            "method": method,
            "path": self.path,
        }


__all__ = ["Decision", "Found", "ImageInfo", "Lookups"]
