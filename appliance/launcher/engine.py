"""The Docker calls the launcher makes, through sockguard, as one small typed surface.

Docker's errors are mapped to LauncherError here, so callers see one error type that says what
failed and why (including sockguard's refusal message).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import docker
import docker.errors
import requests
from docker.models.containers import Container
from docker.models.networks import Network

from appliance import artifacts, labels
from appliance.launcher.base import ImageRef, LocationNetwork, Workload
from appliance.launcher.spec import EGRESS_ALIAS, METADATA_ALIAS, ContainerSpec, network_name
from protocol.errors import AirlockError, TemporaryError

log = logging.getLogger("airlock.launcher")
NETWORK_OPTIONS = {"com.docker.network.bridge.inhibit_ipv4": "true"}


class LauncherError(AirlockError, RuntimeError):
    """A Docker operation failed; the message says which and why."""


class EngineUnavailable(LauncherError, TemporaryError):
    """The engine (or sockguard in front of it) did not answer, or answered 5xx: the same call may work soon."""


def _explain(exc: docker.errors.DockerException) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    return str(exc)


def _failure(what: str, exc: docker.errors.DockerException) -> LauncherError:
    """Map a docker SDK error at the boundary: 5xx and connection trouble are temporary, the rest (a
    sockguard refusal, a missing image, a conflict) permanent."""
    status = exc.status_code if isinstance(exc, docker.errors.APIError) else None
    # An APIError without a status: the SDK got no response at all (the connection itself failed).
    transient = isinstance(exc, docker.errors.APIError) and (status is None or status >= 500)
    error = EngineUnavailable if transient else LauncherError
    return error(f"{what}: {_explain(exc)}")


class Engine:
    """The Launcher (launcher/base.py) on a Docker engine, reached through sockguard: airlock's containers and
    networks for one appliance, found by their labels. docker SDK objects stay in here; callers get values."""

    def __init__(self, client: docker.DockerClient, appliance_id: str) -> None:
        self.client = client
        self.appliance_id = appliance_id
        self._prepared: set[str] = set()  # artifact volumes made writable by this process

    def _labels(self, role: str, location: str) -> dict[str, str]:
        return {labels.MANAGED: "true", labels.ROLE: role, labels.LOCATION: location,
                labels.APPLIANCE_ID: self.appliance_id}

    @classmethod
    def connect(cls, base_url: str, appliance_id: str) -> Engine:
        return cls(docker.DockerClient(base_url=base_url, timeout=60), appliance_id)

    def _owned_filter(self, role: str) -> dict[str, Any]:
        return {"label": [f"{labels.MANAGED}=true", f"{labels.ROLE}={role}",
                          f"{labels.APPLIANCE_ID}={self.appliance_id}"]}

    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        """Foreign errors become LauncherError / EngineUnavailable here, at the boundary."""
        try:
            yield
        except docker.errors.DockerException as exc:  # first: the SDK's APIError is a requests HTTPError too
            raise _failure(what, exc) from exc
        except requests.RequestException as exc:  # no answer at all: connection refused or lost, a timeout
            raise EngineUnavailable(f"{what}: {exc}") from exc

    # -- images -----------------------------------------------------------------------------------
    def resolve_image(self, ref: str) -> str:
        """The image id (sha256:...) that `ref` names on this engine; the spec pins that id."""
        return self.image(ref).id

    def image(self, ref: str) -> ImageRef:
        """`ref` as this engine has it; a `registry/repo@sha256:` reference it lacks is pulled first, through
        sockguard, which allows it only from a registry the operator listed (and adds that registry's login)."""
        try:
            found = self._get_image(ref)
        except LauncherError as exc:
            if not isinstance(exc.__cause__, docker.errors.ImageNotFound):
                raise
            if "@sha256:" not in ref:
                raise LauncherError(f"image {ref!r} is not on this Docker engine: import it, or name it by digest "
                                    f"(repo@sha256:...) from a registry the operator listed (airlock pulls by digest "
                                    f"only)") from None
            found = self._pull(ref)
        return ImageRef(str(found.id), tuple(found.attrs.get("RepoTags") or ()),
                        tuple(found.attrs.get("RepoDigests") or ()))

    def _get_image(self, ref: str) -> Any:
        with self._mapped(f"cannot inspect image {ref!r}"):
            return self.client.images.get(ref)

    def _pull(self, ref: str) -> Any:
        repository, _, digest = ref.partition("@")
        log.info("pulling %s", ref)
        with self._mapped(f"cannot pull {ref}"):
            self.client.images.pull(repository, tag=digest)
        try:
            return self._get_image(ref)
        except LauncherError as exc:
            raise LauncherError(f"pulled {ref}, but the engine does not have it: {exc}") from None

    # -- networks ---------------------------------------------------------------------------------
    def ensure_network(self, location: str, *, attach: str) -> LocationNetwork:
        """One network per location with no way out except through the appliance (attached as `attach`).

        `internal: true` stops forwarding beyond the subnet, but on its own still lets containers reach
        the host itself at the bridge's gateway address (any service listening on 0.0.0.0). The bridge
        therefore gets no IPv4 address at all (`inhibit_ipv4`): the host is unreachable from the network.
        """
        name = network_name(self.appliance_id, location)
        with self._mapped(f"cannot create network {name}"):
            found = self.client.networks.list(names=[name], filters=self._owned_filter(labels.ROLE_NETWORK))
            exact = [n for n in found if n.name == name]
            if exact:
                network = exact[0]
            else:
                log.info("creating network %s for location %s", name, location)
                network = self.client.networks.create(
                    name, driver="bridge", internal=True, check_duplicate=True, options=NETWORK_OPTIONS,
                    labels=self._labels(labels.ROLE_NETWORK, location))
        with self._mapped(f"cannot attach the appliance to {name}"):
            network.reload()
            if not any(cid.startswith(attach) for cid in network.attrs.get("Containers") or {}):
                network.connect(attach, aliases=[EGRESS_ALIAS, METADATA_ALIAS])
                network.reload()
        return _network(network)

    def networks(self) -> list[LocationNetwork]:
        with self._mapped("cannot list networks"):
            return [_network(n) for n in self.client.networks.list(filters=self._owned_filter(labels.ROLE_NETWORK))]

    def remove_network(self, network: LocationNetwork, *, detach: str) -> None:
        with self._mapped(f"cannot remove network {network.name}"):
            found = self.client.networks.get(network.id)
            for cid in found.attrs.get("Containers") or {}:
                if cid.startswith(detach):
                    found.disconnect(detach, force=True)
            found.remove()

    # -- artifact volumes -------------------------------------------------------------------------
    def ensure_artifacts(self, location: str, *, prep: ContainerSpec) -> str:
        """Layers first, then the noexec overlay over their engine-reported Mountpoints, then the create-only
        `prep` container (harmless again after a restart: Docker copies only onto an empty volume). Once done,
        later calls in this process return at once."""
        name = artifacts.volume_name(self.appliance_id, location)
        if name in self._prepared:  # made and prepared by this process: no Docker call on every pass and launch
            return name
        with self._mapped(f"cannot create the artifact volume {name}"):
            have = {v.name: v for v in self.client.volumes.list(filters={"label": [
                f"{labels.MANAGED}=true", f"{labels.APPLIANCE_ID}={self.appliance_id}",
                f"{labels.LOCATION}={location}"]})}
            if name not in have:
                points = {}
                for layer in artifacts.LAYERS:
                    layer_name = artifacts.layer_name(name, layer)
                    volume = have.get(layer_name) or self.client.volumes.create(
                        layer_name, driver="local", labels=self._labels(labels.ROLE_ARTIFACTS_LAYER, location))
                    volume.reload()
                    points[layer] = str(volume.attrs.get("Mountpoint") or "")
                log.info("creating artifact volume %s for location %s", name, location)
                self.client.volumes.create(name, driver="local", driver_opts=artifacts.overlay_options(points),
                                           labels=self._labels(labels.ROLE_ARTIFACTS, location))
        with self._mapped(f"cannot prepare the artifact volume {name}"):
            container = self.client.containers.create(**prep.kwargs)
        self._remove_id(container.id, container.name)
        self._prepared.add(name)
        return name

    def artifact_locations(self) -> list[str]:
        with self._mapped("cannot list artifact volumes"):
            found = self.client.volumes.list(filters=self._owned_filter(labels.ROLE_ARTIFACTS))
        return sorted({(v.attrs.get("Labels") or {}).get(labels.LOCATION, "") for v in found} - {""})

    def remove_artifacts(self, location: str) -> None:
        name = artifacts.volume_name(self.appliance_id, location)
        for volume in (name, *(artifacts.layer_name(name, layer) for layer in artifacts.LAYERS)):
            try:
                with self._mapped(f"cannot remove the artifact volume {volume}"):
                    self.client.volumes.get(volume).remove()
            except LauncherError as exc:
                if not isinstance(exc.__cause__, docker.errors.NotFound):
                    raise
        self._prepared.discard(name)
        log.info("removed artifact volume %s of location %s", name, location)

    # -- workloads --------------------------------------------------------------------------------
    def workloads(self, role: str) -> list[Workload]:
        # ignore_removed: docker-py lists, then inspects each container; one removed in between (a finished run
        # reaped by another thread) is simply gone, not an error that fails whoever was listing.
        with self._mapped(f"cannot list {role} containers"):
            return [_workload(c) for c in self.client.containers.list(all=True, filters=self._owned_filter(role),
                                                                       ignore_removed=True)]

    def start(self, spec: ContainerSpec) -> Workload:
        with self._mapped(f"cannot create {spec.name}"):
            container = self.client.containers.create(**spec.kwargs)
        try:
            with self._mapped(f"cannot start {spec.name}"):
                container.start()
                container.reload()
        except LauncherError:
            self._remove_id(container.id, container.name)
            raise
        return _workload(container)

    def stop(self, workload: Workload, *, grace_seconds: int) -> None:
        with self._mapped(f"cannot stop {workload.name}"):
            self.client.containers.get(workload.id).stop(timeout=grace_seconds)

    def remove(self, workload: Workload) -> None:
        self._remove_id(workload.id, workload.name)

    def _remove_id(self, container_id: str, name: str) -> None:
        try:
            with self._mapped(f"cannot remove {name}"):
                self.client.containers.get(container_id).remove(force=True)
        except LauncherError as exc:
            if not isinstance(exc.__cause__, docker.errors.NotFound):
                raise

    def log_tail(self, workload: Workload, lines: int = 30) -> str:
        try:
            with self._mapped("logs unavailable"):
                return self.client.containers.get(workload.id).logs(tail=lines).decode(errors="replace").strip()
        except LauncherError as exc:
            return f"({exc})"


def _workload(container: Container) -> Workload:
    state = container.attrs.get("State") or {}
    return Workload(id=container.id, name=container.name, labels=dict(container.labels or {}),
                    state=state.get("Status", container.status), health=(state.get("Health") or {}).get("Status"),
                    exit_code=state.get("ExitCode"), oom_killed=bool(state.get("OOMKilled")),
                    error=state.get("Error") or None)


def _network(network: Network) -> LocationNetwork:
    attrs = network.attrs or {}
    subnets = tuple(c["Subnet"] for c in (attrs.get("IPAM") or {}).get("Config") or [] if c.get("Subnet"))
    return LocationNetwork(id=network.id, name=network.name, location=(attrs.get("Labels") or {}).get(
        labels.LOCATION, ""), subnets=subnets)
