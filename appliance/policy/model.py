"""The runtime policy: immutable values built only by the loader, after validation."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

from protocol.locations import HostPort, IPNetwork

__all__ = ["Bounds", "EgressAllow", "EgressPolicy", "Hardening", "HostPort", "ImagePolicy", "Limits", "Location",
           "Policy"]


@dataclass(frozen=True)
class Limits:
    """Resource limits of one container."""

    memory: int  # bytes
    cpus: float
    pids: int

    @property
    def nano_cpus(self) -> int:
        return int(self.cpus * 1e9)


@dataclass(frozen=True)
class Hardening:
    """What every user container gets (policy/hardening.yaml `defaults`)."""

    user: str
    limits: Limits
    tmpfs: tuple[tuple[str, str], ...]  # (mount point, mount options)
    runtime: str
    log_max_size: str
    log_max_file: int
    restart_max_retries: int
    seccomp_profile: str  # the profile's JSON text, as sent to Docker
    seccomp_file: str


@dataclass(frozen=True)
class Bounds:
    """How far a location may loosen the defaults (policy/hardening.yaml `bounds`)."""

    memory_max: int
    cpus_max: float
    pids_max: int
    runtimes: tuple[str, ...]


@dataclass(frozen=True)
class ImagePolicy:
    """Which images user containers may run (policy/images.yaml)."""

    allow_pull: bool
    names: tuple[str, ...]  # repository globs, e.g. "airlock/example-location"
    digests: tuple[str, ...]  # "sha256:..." image ids or repo digests
    # Registries the operator pulls from, by digest only: host[:port] -> its credentials file, or None.
    registries: Mapping[str, str | None] = field(default_factory=dict)

    def decide(self, image_id: str, repo_tags: tuple[str, ...], repo_digests: tuple[str, ...]) -> tuple[bool, str]:
        """Allow an image if its id or a repo digest is listed, or a repository matches a name glob. A repo
        digest's repository counts like a tag's: the engine records it only for content it pulled or pushed."""
        known = set(self.digests)
        if image_id in known:
            return True, f"image id {image_id} is in the digest allowlist"
        for digest in repo_digests:
            if digest.rsplit("@", 1)[-1] in known:
                return True, f"repo digest {digest} is in the digest allowlist"
        for tag in (*repo_tags, *(d.rsplit("@", 1)[0] for d in repo_digests if "@" in d)):
            repository = tag.rsplit(":", 1)[0] if ":" in tag.rsplit("/", 1)[-1] else tag
            for pattern in self.names:
                if fnmatch.fnmatchcase(repository, pattern):
                    return True, f"repository {repository} matches allowlist entry {pattern!r}"
        return False, (f"image {image_id} ({', '.join(repo_tags) or 'untagged'}) is not allowed by this appliance's "
                       f"image policy (policy/images.yaml and the operator's allowlist); on the appliance run "
                       f"`airlock images allow {_suggestion(image_id, repo_tags)}`")


def _suggestion(image_id: str, repo_tags: tuple[str, ...]) -> str:
    """The repository of the first tag (what an operator usually means), else the image id itself."""
    for tag in repo_tags:
        return tag.rsplit(":", 1)[0] if ":" in tag.rsplit("/", 1)[-1] else tag
    return image_id


@dataclass(frozen=True)
class EgressPolicy:
    """Global egress rules (policy/egress.yaml); per-location allowlists live in locations.yaml."""

    port: int
    always_deny: tuple[tuple[IPNetwork, str], ...]  # (network, reason); refused unless a location allows it
    connect_timeout: float
    # Parts of always_deny a location sent by the control plane may open; locations.yaml (local) may open any.
    control_plane_may_open: tuple[IPNetwork, ...] = ()

    def remote_cidr_problem(self, cidr: IPNetwork) -> str | None:
        """Why a control plane may not open `cidr` for a location, or None: it may not open a refused range
        this appliance's own policy did not hand it."""
        if any(cidr.version == ok.version and cidr.subnet_of(ok) for ok in self.control_plane_may_open):  # type: ignore[arg-type]
            return None
        for network, reason in self.always_deny:
            if cidr.version == network.version and cidr.overlaps(network):  # type: ignore[arg-type]
                return (f"{cidr} opens {network} ({reason}), which only this appliance's local policy may open "
                        f"(egress.yaml control_plane_may_open, or the location in locations.yaml)")
        return None


@dataclass(frozen=True)
class Policy:
    hardening: Hardening
    bounds: Bounds
    images: ImagePolicy
    egress: EgressPolicy
    directory: str = field(default="", compare=False)


@dataclass(frozen=True)
class EgressAllow:
    hosts: tuple[HostPort, ...] = ()
    cidrs: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Location:
    """A code location as the operator declared it (locations.yaml or, later, the control plane)."""

    name: str
    image: str
    module: str | None
    package: str | None
    env: tuple[tuple[str, str], ...]
    limits: Limits
    egress: EgressAllow
    runtime: str
