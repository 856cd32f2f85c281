"""Desired code servers vs observed containers -> what to keep, create and remove. Pure.

Adoption falls out of the comparison: a container whose location and spec hash match what is
desired, and that is alive, is kept whoever started it — after an agent or appliance restart it is
adopted, not redeployed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALIVE = {"running", "created", "restarting"}


@dataclass(frozen=True)
class Observed:
    """A code server container as Docker reports it."""

    id: str
    name: str
    location: str
    spec_hash: str
    state: str  # Docker's State.Status: created, running, restarting, exited, dead, ...
    health: str | None = None  # healthy, unhealthy, starting, or None without a healthcheck


@dataclass(frozen=True)
class Plan:
    keep: dict[str, Observed] = field(default_factory=dict)  # location -> container to keep (adopt)
    create: tuple[str, ...] = ()  # locations that need a new container
    remove: tuple[Observed, ...] = ()  # stale spec, dead, unhealthy, duplicates, orphans


def plan(desired: dict[str, str], observed: list[Observed]) -> Plan:
    """`desired` maps location name -> spec hash."""
    keep: dict[str, Observed] = {}
    remove: list[Observed] = []
    for container in sorted(observed, key=lambda c: (c.state != "running", c.name)):
        wanted = desired.get(container.location)
        usable = (
            wanted == container.spec_hash
            and container.state in ALIVE
            and container.health != "unhealthy"
            and container.location not in keep
        )
        if usable:
            keep[container.location] = container
        else:
            remove.append(container)
    create = tuple(name for name in sorted(desired) if name not in keep)
    return Plan(keep=keep, create=create, remove=tuple(remove))
