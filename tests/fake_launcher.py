"""A Launcher (appliance/launcher/base.py) in memory, for the agent's tests: no Docker, failures on demand.

It keeps what a real engine keeps (workloads by id with their labels and state, networks with subnets and
attached containers, images by reference) and passes the same contract tests as the Docker launcher
(tests/launcher_contract.py), so a behaviour the agent relies on cannot exist only in the fake.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from appliance import artifacts, labels
from appliance.launcher.base import ImageRef, LocationNetwork, Workload
from appliance.launcher.engine import LauncherError
from appliance.launcher.spec import ContainerSpec, network_name

__all__ = ["FakeLauncher"]


@dataclass
class FakeLauncher:
    appliance_id: str = "fake"
    images: dict[str, ImageRef] = field(default_factory=dict)  # reference -> what it resolves to
    failures: dict[str, list[Exception]] = field(default_factory=dict)  # method -> errors raised, one per call
    logs: dict[str, str] = field(default_factory=dict)  # workload name -> its output
    started: list[ContainerSpec] = field(default_factory=list)
    _workloads: dict[str, Workload] = field(default_factory=dict)
    _networks: dict[str, tuple[LocationNetwork, set[str]]] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    volumes: dict[str, str] = field(default_factory=dict)  # artifact volume name -> location
    prepared: list[ContainerSpec] = field(default_factory=list)  # prep specs created (never started)
    _mounted: dict[str, tuple[str, ...]] = field(default_factory=dict)  # workload id -> volumes it mounts

    def add_image(self, ref: str, *, tags: tuple[str, ...] = (), digests: tuple[str, ...] = ()) -> ImageRef:
        image = ImageRef(f"sha256:{next(self._ids):064x}", tags or ((ref,) if ":" in ref else ()), digests)
        self.images[ref] = self.images[image.id] = image
        return image

    def _fail(self, method: str) -> None:
        queued = self.failures.get(method)
        if queued:
            raise queued.pop(0)

    # -- Launcher ---------------------------------------------------------------------------------
    def image(self, ref: str) -> ImageRef:
        self._fail("image")
        if ref not in self.images:
            raise LauncherError(f"image {ref!r} is not on this Docker engine (import it; pulling is off)")
        return self.images[ref]

    def ensure_network(self, location: str, *, attach: str) -> LocationNetwork:
        self._fail("ensure_network")
        name = network_name(self.appliance_id, location)
        if name not in self._networks:
            n = len(self._networks) + 1
            self._networks[name] = (LocationNetwork(f"net{n}", name, location, (f"10.99.{n}.0/24",)), set())
        network, attached = self._networks[name]
        attached.add(attach)
        return network

    def networks(self) -> list[LocationNetwork]:
        return [network for network, _ in self._networks.values()]

    def remove_network(self, network: LocationNetwork, *, detach: str) -> None:
        self._fail("remove_network")
        self._networks.pop(network.name, None)

    def attached(self, location: str) -> set[str]:
        return set(self._networks[network_name(self.appliance_id, location)][1])

    def ensure_artifacts(self, location: str, *, prep: ContainerSpec) -> str:
        self._fail("ensure_artifacts")
        name = artifacts.volume_name(self.appliance_id, location)
        if name not in self.volumes:
            self.volumes[name] = location
            self.prepared.append(prep)
        return name

    def artifact_locations(self) -> list[str]:
        return sorted(set(self.volumes.values()))

    def remove_artifacts(self, location: str) -> None:
        self._fail("remove_artifacts")
        name = artifacts.volume_name(self.appliance_id, location)
        users = [w.name for w in self._workloads.values() if name in self._mounted.get(w.id, ())]
        if users:  # Docker refuses to remove a volume any container (even an exited one) still uses
            raise LauncherError(f"cannot remove the artifact volume {name}: volume is in use - {users}")
        self.volumes.pop(name, None)

    def workloads(self, role: str) -> list[Workload]:
        self._fail("workloads")
        return [w for w in self._workloads.values() if w.labels.get(labels.ROLE) == role
                and w.labels.get(labels.APPLIANCE_ID) == self.appliance_id]

    def start(self, spec: ContainerSpec) -> Workload:
        self._fail("start")
        if any(w.name == spec.name for w in self._workloads.values()):
            raise LauncherError(f"cannot create {spec.name}: Conflict. The container name is already in use")
        image = spec.kwargs.get("image", "")
        if image not in self.images:
            raise LauncherError(f"cannot create {spec.name}: No such image: {image}")
        sources = tuple(m["Source"] for m in spec.kwargs.get("mounts") or () if m.get("Type") == "volume")
        missing = [v for v in sources if v not in self.volumes]
        if missing:  # sockguard refuses a volume that is not an artifact volume made by ensure_artifacts
            raise LauncherError(f"cannot create {spec.name}: mounts: no such artifact volume {missing[0]}")
        workload = Workload(id=f"c{next(self._ids):063x}", name=spec.name, labels=dict(spec.kwargs.get("labels") or {}),
                            state="running")
        self._workloads[workload.id] = workload
        self._mounted[workload.id] = sources
        self.started.append(spec)
        return workload

    def stop(self, workload: Workload, *, grace_seconds: int) -> None:
        self._fail("stop")
        self.set_state(workload.name, "exited", exit_code=143)

    def remove(self, workload: Workload) -> None:
        self._fail("remove")
        self._workloads.pop(workload.id, None)
        self._mounted.pop(workload.id, None)

    def log_tail(self, workload: Workload, lines: int = 30) -> str:
        return "\n".join(self.logs.get(workload.name, "").splitlines()[-lines:])

    # -- what a test does to the "engine" behind the agent's back ------------------------------------
    def set_state(self, name: str, state: str, **changes: object) -> Workload:
        [workload] = [w for w in self._workloads.values() if w.name == name]
        self._workloads[workload.id] = replace(workload, state=state, **changes)  # type: ignore[arg-type]
        return self._workloads[workload.id]
