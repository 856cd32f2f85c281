"""The launcher interface: what the agent asks of whatever runs its code servers and runs.

The agent (agent/reconciler.py, agent/runs.py) never touches a container API itself: it hands hardened specs
(launcher/spec.py) to a `Launcher` and reads back `Workload`s, plain values. The Docker engine behind
sockguard is one implementation (launcher/engine.py); the agent's unit tests use a fake one
(tests/unit/fake_launcher.py), and both pass the same contract tests (tests/contract/test_launcher.py). How
the interface maps onto Kubernetes, the route past one host: docs/LAUNCHERS.md.

Errors: every method raises LauncherError (permanent: a refusal, a missing image) or EngineUnavailable
(temporary: try again with backoff), both from launcher/engine.py's boundary mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from appliance import labels
from appliance.launcher.spec import ContainerSpec

__all__ = ["ImageRef", "Launcher", "LocationNetwork", "Workload"]


@dataclass(frozen=True)
class ImageRef:
    """An image as the engine resolved a reference: what the image policy decides on, and what specs pin."""

    id: str
    tags: tuple[str, ...] = ()
    digests: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workload:
    """A code server or a run as the launcher last saw it."""

    id: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    state: str = "running"  # created | running | restarting | paused | exited | dead
    health: str | None = None  # starting | healthy | unhealthy, when the workload has a health check
    exit_code: int | None = None
    oom_killed: bool = False
    error: str | None = None  # what the launcher says went wrong starting or running it

    @property
    def location(self) -> str:
        return self.labels.get(labels.LOCATION, "")

    @property
    def run_id(self) -> str:
        return self.labels.get(labels.RUN_ID, "")

    @property
    def spec_hash(self) -> str:
        return self.labels.get(labels.SPEC_HASH, "")

    @property
    def live(self) -> bool:
        """Still there to run: not yet exited (a created one may still be started)."""
        return self.state in ("running", "created", "restarting", "paused")


@dataclass(frozen=True)
class LocationNetwork:
    """A location's private network, which the appliance is attached to as its egress proxy."""

    id: str
    name: str
    location: str
    subnets: tuple[str, ...] = ()


class Launcher(Protocol):
    """Reconcile code servers; start, stop, inspect and remove runs. One per appliance (`appliance_id`)."""

    appliance_id: str

    def image(self, ref: str) -> ImageRef:
        """Resolve `ref` on this launcher's engine; LauncherError if it is not there."""
        ...

    def ensure_network(self, location: str, *, attach: str) -> LocationNetwork:
        """The location's internal network (created if missing) with the appliance container `attach` on it."""
        ...

    def networks(self) -> list[LocationNetwork]:
        """Every location network this appliance made."""
        ...

    def remove_network(self, network: LocationNetwork, *, detach: str) -> None:
        """Take the appliance off the network, then remove it."""
        ...

    def ensure_artifacts(self, location: str, *, prep: ContainerSpec) -> str:
        """The location's persistent artifact volume (appliance/artifacts.py), made if missing and made writable
        for the containers' user by creating (never starting) `prep` (spec.artifacts_prep_spec); its name."""
        ...

    def artifact_locations(self) -> list[str]:
        """The locations that have an artifact volume on this engine."""
        ...

    def remove_artifacts(self, location: str) -> None:
        """Delete the location's artifact volume and its layers (its files). LauncherError while one is in use."""
        ...

    def workloads(self, role: str) -> list[Workload]:
        """This appliance's workloads of one role (labels.ROLE_CODE_SERVER, labels.ROLE_RUN), exited ones too."""
        ...

    def start(self, spec: ContainerSpec) -> Workload:
        """Create and start a workload from a hardened spec; nothing is left behind if it cannot start."""
        ...

    def stop(self, workload: Workload, *, grace_seconds: int) -> None:
        """SIGTERM, then SIGKILL after the grace period."""
        ...

    def remove(self, workload: Workload) -> None:
        """Remove it, running or not; a workload already gone is not an error."""
        ...

    def log_tail(self, workload: Workload, lines: int = 30) -> str:
        """Its last output lines (a traceback, an OOM message), or a note saying why there are none."""
        ...
