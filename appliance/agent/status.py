"""Location status as the agent sees it, kept in the state directory for `airlock status`."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from protocol.files import write_atomic


class State(StrEnum):
    LOADING = "LOADING"
    LOADED = "LOADED"
    ERROR = "ERROR"


@dataclass(frozen=True)
class LocationStatus:
    name: str
    state: State
    container: str | None = None  # container name, reachable on the location network
    container_id: str | None = None
    image: str | None = None
    error: str | None = None
    since: float = 0.0


@dataclass(frozen=True)
class ApplianceStatus:
    appliance_id: str
    updated: float
    locations: dict[str, LocationStatus]

    def to_json(self) -> str:
        data = {"appliance_id": self.appliance_id, "updated": self.updated,
                "locations": {name: asdict(s) for name, s in sorted(self.locations.items())}}
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ApplianceStatus:
        data = json.loads(text)
        locations = {name: LocationStatus(**{**s, "state": State(s["state"])}) for name, s in data["locations"].items()}
        return cls(appliance_id=data["appliance_id"], updated=data["updated"], locations=locations)


def status_path(state_dir: str) -> Path:
    return Path(state_dir) / "status.json"


def write_status(state_dir: str, status: ApplianceStatus) -> None:
    """Atomic replace, so a reader never sees half a file."""
    write_atomic(status_path(state_dir), status.to_json(), durable=False)  # rewritten every pass


def read_status(state_dir: str) -> ApplianceStatus | None:
    try:
        return ApplianceStatus.from_json(status_path(state_dir).read_text())
    except FileNotFoundError:
        return None


def now() -> float:
    return time.time()


LOADING_PASS_SECONDS = 0.5  # the reconcile interval while a code server is starting


def next_pass_in(statuses: Mapping[str, LocationStatus], interval: float) -> float:
    """While a code server is starting, look again soon: it is LOADED the moment it answers, not a whole
    reconcile interval later (what `location add` and deploys wait for)."""
    loading = any(s.state is State.LOADING for s in statuses.values())
    return min(interval, LOADING_PASS_SECONDS) if loading else interval
