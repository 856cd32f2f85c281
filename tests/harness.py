"""Real-Docker test harness: build the images (cached by content), start an appliance, clean up.

Every resource a test run creates carries a unique appliance id (`t` + random hex) in its name and
labels, so runs never collide with each other or with a user's quickstart, and cleanup is exact.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import docker
import docker.errors
from docker.models.containers import Container

from scripts.quickstart import appliance_run_kwargs

ROOT = Path(__file__).resolve().parent.parent


@cache
def images() -> dict[str, str]:
    """Build (or reuse) every image; {name: content-addressed tag}."""
    subprocess.run([sys.executable, str(ROOT / "images/build.py")], check=True)
    return json.loads((ROOT / ".cache/images.json").read_text())


def client() -> docker.DockerClient:
    return docker.from_env(timeout=300)


def unique_id() -> str:
    return "t" + uuid.uuid4().hex[:8]


@dataclass
class Appliance:
    """One appliance container started like README says, with its own id, state volume and locations file."""

    docker: docker.DockerClient
    appliance_id: str
    workdir: Path
    image: str
    container: Container | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_volumes: dict[str, dict[str, str]] = field(default_factory=dict)
    network: str | None = None  # start on this network (e.g. the one the control plane is on)

    @property
    def name(self) -> str:
        return f"airlock-appliance-{self.appliance_id}"

    @property
    def volume(self) -> str:
        return f"airlock-state-{self.appliance_id}"

    @property
    def locations_file(self) -> Path:
        return self.workdir / "locations.yaml"

    def write_locations(self, text: str) -> None:
        self.locations_file.write_text(text)
        self.locations_file.chmod(0o644)

    def start(self) -> Container:
        kwargs = appliance_run_kwargs(
            self.image, name=self.name, appliance_id=self.appliance_id, locations_file=self.locations_file,
            labels={"airlock.test-run": self.appliance_id},
            env={"AIRLOCK_RECONCILE_INTERVAL": "2", **self.extra_env},
        )
        kwargs.pop("restart_policy")
        kwargs["volumes"].update(self.extra_volumes)
        if self.network:
            kwargs["network"] = self.network
        self.container = self.docker.containers.run(**kwargs)
        return self.container

    def exec(self, *cmd: str, user: str = "", timeout: float = 120) -> tuple[int, str]:
        assert self.container is not None
        result = self.container.exec_run(list(cmd), user=user, demux=False)
        return result.exit_code, (result.output or b"").decode(errors="replace")

    def status(self) -> dict:
        code, out = self.exec("airlock", "status", "--json")
        return json.loads(out) if code == 0 else {}

    def wait_for(self, location: str, state: str, timeout: float = 240, not_container: str | None = None) -> dict:
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            last = self.status().get("locations", {}).get(location, {})
            if last.get("state") == state and (not_container is None or last.get("container_id") != not_container):
                return last
            time.sleep(1)
        # sockguard logs every Docker call it allows; the lines that explain a failure are everyone else's
        lines = [line for line in self.logs().splitlines() if '"sockguard.decision", "allow": true' not in line]
        raise AssertionError(f"{location} not {state} within {timeout:.0f} s; last status {last}; "
                             "appliance logs (sockguard's allowed calls left out):\n" + "\n".join(lines)[-6000:])

    def code_server(self, location: str) -> Container:
        found = self.docker.containers.list(filters={"label": [f"airlock.appliance-id={self.appliance_id}",
                                                               f"airlock.location={location}",
                                                               "airlock.role=code-server"]})
        assert len(found) == 1, f"expected one code server for {location}, found {[c.name for c in found]}"
        return found[0]

    def logs(self) -> str:
        try:
            assert self.container is not None
            return self.container.logs().decode(errors="replace")
        except (docker.errors.DockerException, AssertionError):
            return ""

    def remove(self) -> None:
        """Remove the appliance and everything it created (containers, networks, state volume)."""
        if self.container is not None:
            with contextlib.suppress(docker.errors.NotFound):
                self.container.remove(force=True)
        cleanup(self.docker, self.appliance_id)
        for volume in (self.volume, f"airlock-operator-{self.appliance_id}"):
            with contextlib.suppress(docker.errors.NotFound):
                self.docker.volumes.get(volume).remove(force=True)


def cleanup(dc: docker.DockerClient, appliance_id: str) -> None:
    for c in dc.containers.list(all=True, filters={"label": f"airlock.appliance-id={appliance_id}"}):
        c.remove(force=True)
    for c in dc.containers.list(all=True, filters={"label": f"airlock.test-run={appliance_id}"}):
        c.remove(force=True)
    for n in dc.networks.list(filters={"label": f"airlock.appliance-id={appliance_id}"}):
        n.reload()
        for cid in n.attrs.get("Containers") or {}:
            with contextlib.suppress(docker.errors.DockerException):
                n.disconnect(cid, force=True)
        n.remove()
    for n in dc.networks.list(filters={"label": f"airlock.test-run={appliance_id}"}):
        n.remove()
    # Artifact volumes: the overlays first (their layers are busy while an overlay is mounted anywhere).
    volumes = dc.volumes.list(filters={"label": f"airlock.appliance-id={appliance_id}"})
    for v in sorted(volumes, key=lambda v: (v.attrs.get("Labels") or {}).get("airlock.role") != "artifacts"):
        try:
            v.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:  # still in use: a leak to report, not a reason to fail a test
            print(f"cleanup: volume {v.name} left: {exc.explanation}")


def locations_yaml(*entries: str) -> str:
    return "version: 1\nlocations:\n" + "".join(entries)


def location_entry(name: str, image: str, *, module: str = "example_location.definitions", extra: str = "") -> str:
    text = f"  - name: {name}\n    image: {image}\n    module: {module}\n"
    return text + "".join(f"    {line}\n" for line in extra.strip("\n").splitlines()) if extra else text
