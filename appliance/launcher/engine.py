"""The Docker calls the launcher makes, through sockguard, as one small typed surface.

Docker's errors are mapped to LauncherError here, so callers see one error type that says what
failed and why (including sockguard's refusal message).
"""

from __future__ import annotations

import logging
from typing import Any

import docker
import docker.errors
import requests
from docker.models.containers import Container
from docker.models.networks import Network

from appliance import labels
from appliance.launcher.spec import EGRESS_ALIAS, METADATA_ALIAS, ContainerSpec
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
    """Launch, find and remove airlock's containers and networks for one appliance."""

    def __init__(self, client: docker.DockerClient, appliance_id: str) -> None:
        self.client = client
        self.appliance_id = appliance_id

    @classmethod
    def connect(cls, base_url: str, appliance_id: str) -> Engine:
        return cls(docker.DockerClient(base_url=base_url, timeout=60), appliance_id)

    def _owned_filter(self, role: str) -> dict[str, Any]:
        return {"label": [f"{labels.MANAGED}=true", f"{labels.ROLE}={role}",
                          f"{labels.APPLIANCE_ID}={self.appliance_id}"]}

    # -- images -----------------------------------------------------------------------------------
    def resolve_image(self, ref: str) -> str:
        """The image id (sha256:...) that `ref` names on this engine; the spec pins that id."""
        return self.image(ref)[0]

    def image(self, ref: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """(id, repo tags, repo digests) of the image `ref` names: what the image policy decides on."""
        try:
            found = self.client.images.get(ref)
            return (str(found.id), tuple(found.attrs.get("RepoTags") or ()),
                    tuple(found.attrs.get("RepoDigests") or ()))
        except docker.errors.ImageNotFound:
            raise LauncherError(f"image {ref!r} is not on this Docker engine (import it; pulling is off)") from None
        except requests.RequestException as exc:
            raise EngineUnavailable(f"cannot inspect image {ref!r}: {exc}") from exc
        except docker.errors.DockerException as exc:
            raise _failure(f"cannot inspect image {ref!r}", exc) from exc

    # -- networks ---------------------------------------------------------------------------------
    def ensure_network(self, name: str, location: str) -> Network:
        """One network per location with no way out except through the appliance.

        `internal: true` stops forwarding beyond the subnet, but on its own still lets containers reach
        the host itself at the bridge's gateway address (any service listening on 0.0.0.0). The bridge
        therefore gets no IPv4 address at all (`inhibit_ipv4`): the host is unreachable from the network.
        """
        try:
            found = self.client.networks.list(names=[name], filters=self._owned_filter(labels.ROLE_NETWORK))
            exact = [n for n in found if n.name == name]
            if exact:
                return exact[0]
            log.info("creating network %s for location %s", name, location)
            return self.client.networks.create(
                name,
                driver="bridge",
                internal=True,
                check_duplicate=True,
                options=NETWORK_OPTIONS,
                labels={
                    labels.MANAGED: "true",
                    labels.ROLE: labels.ROLE_NETWORK,
                    labels.LOCATION: location,
                    labels.APPLIANCE_ID: self.appliance_id,
                },
            )
        except docker.errors.DockerException as exc:
            raise LauncherError(f"cannot create network {name}: {_explain(exc)}") from exc

    def attach(self, network: Network, container_id: str) -> None:
        """Connect the appliance to a location network under the egress proxy's alias (idempotent)."""
        network.reload()
        containers = network.attrs.get("Containers") or {}
        if any(cid.startswith(container_id) for cid in containers):
            return
        try:
            network.connect(container_id, aliases=[EGRESS_ALIAS, METADATA_ALIAS])
        except docker.errors.DockerException as exc:
            raise LauncherError(f"cannot attach the appliance to {network.name}: {_explain(exc)}") from exc

    def networks(self) -> list[Network]:
        return self.client.networks.list(filters=self._owned_filter(labels.ROLE_NETWORK))

    def remove_network(self, network: Network, container_id: str) -> None:
        try:
            network.reload()
            for cid in network.attrs.get("Containers") or {}:
                if cid.startswith(container_id):
                    network.disconnect(container_id, force=True)
            network.remove()
        except docker.errors.DockerException as exc:
            raise LauncherError(f"cannot remove network {network.name}: {_explain(exc)}") from exc

    @staticmethod
    def subnets(network: Network) -> list[str]:
        """The network's subnets, from attributes already loaded (attach() reloads them)."""
        return [c["Subnet"] for c in (network.attrs.get("IPAM") or {}).get("Config") or [] if c.get("Subnet")]

    # -- containers -------------------------------------------------------------------------------
    def containers(self, role: str) -> list[Container]:
        try:
            return self.client.containers.list(all=True, filters=self._owned_filter(role))
        except requests.RequestException as exc:
            raise EngineUnavailable(f"cannot list {role} containers: {exc}") from exc
        except docker.errors.DockerException as exc:
            raise _failure(f"cannot list {role} containers", exc) from exc

    def start(self, spec: ContainerSpec) -> Container:
        try:
            container = self.client.containers.create(**spec.kwargs)
        except requests.RequestException as exc:
            raise EngineUnavailable(f"cannot create {spec.name}: {exc}") from exc
        except docker.errors.DockerException as exc:
            raise _failure(f"cannot create {spec.name}", exc) from exc
        try:
            container.start()
        except requests.RequestException as exc:
            self.remove(container)
            raise EngineUnavailable(f"cannot start {spec.name}: {exc}") from exc
        except docker.errors.DockerException as exc:
            self.remove(container)
            raise _failure(f"cannot start {spec.name}", exc) from exc
        return container

    def remove(self, container: Container) -> None:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            raise LauncherError(f"cannot remove {container.name}: {_explain(exc)}") from exc

    @staticmethod
    def log_tail(container: Container, lines: int = 30) -> str:
        try:
            return container.logs(tail=lines).decode(errors="replace").strip()
        except docker.errors.DockerException as exc:
            return f"(logs unavailable: {_explain(exc)})"
