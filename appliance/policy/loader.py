"""Load policy/*.yaml and locations.yaml into the immutable model. A bad file never goes live.

Every problem raises PolicyError(file, field, message); unknown fields are refused so a typo cannot
silently fall back to a default.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.policy.files import read_yaml
from appliance.policy.imported import IMPORTED_FILE, read_imported
from appliance.policy.model import (
    Bounds,
    EgressAllow,
    EgressPolicy,
    Hardening,
    ImagePolicy,
    Limits,
    Location,
    Policy,
)
from protocol.errors import PolicyError
from protocol.fields import SUPPORTED_VERSION, Fields, check_version
from protocol.locations import LOCATION_NAME, parse_location

__all__ = ["LOCATION_NAME", "SUPPORTED_VERSION", "DesiredSet", "canonical_seccomp", "desired_set_from_data",
           "limits_problem", "load_locations", "load_policy", "locations_from_data", "locations_from_fields",
           "read_yaml"]

_USER = re.compile(r"^(\d+)(?::(\d+))?$")


def load_policy(directory: str | os.PathLike[str]) -> Policy:
    """Read hardening.yaml, images.yaml (+ images-imported.yaml if present), egress.yaml and the seccomp profile."""
    root = Path(directory)
    hardening, bounds = _load_hardening(root / "hardening.yaml", root)
    policy = Policy(
        hardening=hardening,
        bounds=bounds,
        images=_load_images(root / "images.yaml"),
        egress=_load_egress(root / "egress.yaml"),
        directory=str(root),
    )
    _check_defaults_within_bounds(root / "hardening.yaml", policy)
    return policy


def _load_hardening(path: Path, root: Path) -> tuple[Hardening, Bounds]:
    f = read_yaml(path)
    d = f.child("defaults")
    user = d.str("user")
    m = _USER.match(user)
    if not m or int(m.group(1)) == 0 or (m.group(2) is not None and int(m.group(2)) == 0):
        raise d.error("user", f"must be a numeric non-root 'uid:gid' like '10001:10001', got {user!r}")
    limits = _limits(d.child("limits"))
    tmpfs_fields = d.child("tmpfs")
    tmpfs = []
    for mount in tmpfs_fields.data:
        options = tmpfs_fields.str(str(mount))
        if not str(mount).startswith("/") or ".." in str(mount):
            raise tmpfs_fields.error(str(mount), "tmpfs mount point must be an absolute path without '..'")
        if "exec" in options.split(",") or "suid" in options.split(","):
            raise tmpfs_fields.error(str(mount), "tmpfs may not be mounted exec or suid")
        tmpfs.append((str(mount), options))
    tmpfs_fields.done()
    log = d.child("log")
    log_max_size = log.str("max_size", pattern=r"\d+[kmg]")
    log_max_file = log.int("max_file", minimum=1)
    log.done()
    seccomp_name = d.str("seccomp", pattern=r"[A-Za-z0-9_.-]+\.json")
    seccomp_path = root / seccomp_name
    seccomp_profile = _load_seccomp(seccomp_path)
    runtime = d.str("runtime", "runc")
    restart = d.int("restart_max_retries", 5, minimum=0)
    d.done()

    b = f.child("bounds")
    bounds = Bounds(
        memory_max=b.size("memory_max"),
        cpus_max=b.number("cpus_max", minimum=0),
        pids_max=b.int("pids_max", minimum=1),
        runtimes=b.str_list("runtimes"),
    )
    b.done()
    if runtime not in bounds.runtimes:
        raise d.error("runtime", f"{runtime!r} is not in bounds.runtimes {list(bounds.runtimes)}")
    f.done()
    return (
        Hardening(
            user=user,
            limits=limits,
            tmpfs=tuple(tmpfs),
            runtime=runtime,
            log_max_size=log_max_size,
            log_max_file=log_max_file,
            restart_max_retries=restart,
            seccomp_profile=seccomp_profile,
            seccomp_file=str(seccomp_path),
        ),
        bounds,
    )


def _load_seccomp(path: Path) -> str:
    try:
        profile = json.loads(path.read_text())
    except OSError as exc:
        raise PolicyError(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise PolicyError(str(path), f"line {exc.lineno}", f"not valid JSON: {exc.msg}") from None
    if not isinstance(profile, dict) or profile.get("defaultAction") not in {"SCMP_ACT_ERRNO", "SCMP_ACT_KILL"}:
        raise PolicyError(str(path), "defaultAction", "must deny by default (SCMP_ACT_ERRNO or SCMP_ACT_KILL)")
    if not isinstance(profile.get("syscalls"), list):
        raise PolicyError(str(path), "syscalls", "must be a list of rules")
    return canonical_seccomp(profile)


def canonical_seccomp(profile: Any) -> str:
    """The one JSON text of a profile that the launcher sends and sockguard compares against."""
    return json.dumps(profile, sort_keys=True, separators=(",", ":"))


def _limits(f: Fields, base: Limits | None = None) -> Limits:
    limits = Limits(
        memory=f.size("memory", base.memory if base else ...),
        cpus=f.number("cpus", base.cpus if base else ..., minimum=0),
        pids=f.int("pids", base.pids if base else ..., minimum=8),
    )
    f.done()
    return limits


def _check_defaults_within_bounds(path: Path, policy: Policy) -> None:
    problem = limits_problem(policy.hardening.limits, policy.bounds)
    if problem:
        field, message = problem
        raise PolicyError(str(path), f"defaults.limits.{field}", message)


def limits_problem(limits: Limits, bounds: Bounds) -> tuple[str, str] | None:
    """The first limit above its bound, as (field, message), or None."""
    if limits.memory > bounds.memory_max:
        return "memory", f"{limits.memory} bytes is above bounds.memory_max ({bounds.memory_max})"
    if limits.cpus > bounds.cpus_max:
        return "cpus", f"{limits.cpus} is above bounds.cpus_max ({bounds.cpus_max})"
    if limits.pids > bounds.pids_max:
        return "pids", f"{limits.pids} is above bounds.pids_max ({bounds.pids_max})"
    return None


def _load_images(path: Path) -> ImagePolicy:
    f = read_yaml(path)
    allow_pull = f.bool("allow_pull", False)
    names: list[str] = []
    digests: list[str] = []
    for entry in f.children("allow", []):
        if entry.has("digest"):
            digests.append(entry.str("digest", pattern=r"sha256:[0-9a-f]{64}"))
        else:
            names.append(entry.str("name", pattern=r"[a-z0-9][a-z0-9._/*-]*"))
        entry.done()
    f.done()
    digests.extend(image.digest for image in read_imported(path.parent / IMPORTED_FILE))
    return ImagePolicy(allow_pull=allow_pull, names=tuple(names), digests=tuple(digests))


def _load_egress(path: Path) -> EgressPolicy:
    f = read_yaml(path)
    port = f.int("port", 3128, minimum=1)
    timeout = f.number("connect_timeout_seconds", 10.0, minimum=0)
    deny = []
    for entry in f.children("always_deny"):
        reason = entry.str("reason")
        deny.extend((cidr, reason) for cidr in entry.cidrs("cidrs"))
        entry.done()
    may_open = f.cidrs("control_plane_may_open", [])
    f.done()
    return EgressPolicy(port=port, always_deny=tuple(deny), connect_timeout=timeout, control_plane_may_open=may_open)


def load_locations(path: str | os.PathLike[str], policy: Policy) -> tuple[Location, ...]:
    """Read locations.yaml; resources may tighten the policy defaults and loosen them only within bounds."""
    return locations_from_fields(read_yaml(Path(path)), policy)


def locations_from_data(data: Any, policy: Policy, *, source: str) -> tuple[Location, ...]:
    """The same checks for a desired set that arrives as data (from the control plane), named by `source`."""
    fields = Fields(source, data)
    check_version(fields)
    return locations_from_fields(fields, policy)


@dataclass(frozen=True)
class DesiredSet:
    """A desired set checked entry by entry: the locations this appliance accepts, and the reason for each it
    refuses. One location over its bounds must not take the others down with it."""

    accepted: tuple[Location, ...]
    refused: Mapping[str, str]  # location name (or "locations[i]" when it has no usable name) -> why


def desired_set_from_data(data: Any, policy: Policy, *, source: str) -> DesiredSet:
    """Check a desired set from the control plane; only its envelope (version, the list) refuses it whole."""
    fields = Fields(source, data)
    check_version(fields)
    accepted: dict[str, Location] = {}
    refused: dict[str, str] = {}
    for i, entry in enumerate(fields.children("locations")):
        raw_name = entry.data.get("name")
        name = raw_name if isinstance(raw_name, str) and re.fullmatch(LOCATION_NAME, raw_name) else f"locations[{i}]"
        if name in accepted or name in refused:
            refused[name] = str(entry.error("name", f"duplicate location name {name!r}"))
            accepted.pop(name, None)
            continue
        try:
            accepted[name] = _location(entry, policy, remote=True)
        except PolicyError as exc:
            refused[name] = str(exc)
    fields.done()
    return DesiredSet(tuple(accepted.values()), refused)


def locations_from_fields(f: Fields, policy: Policy) -> tuple[Location, ...]:
    seen: set[str] = set()
    locations = []
    for entry in f.children("locations"):
        location = _location(entry, policy)
        if location.name in seen:
            raise entry.error("name", f"duplicate location name {location.name!r}")
        seen.add(location.name)
        locations.append(location)
    f.done()
    return tuple(locations)


def _location(f: Fields, policy: Policy, *, remote: bool = False) -> Location:
    """The shared spec rules (protocol.locations), then this appliance's bounds on limits and runtime; a
    `remote` (control plane) location may also not open refused address ranges local policy did not hand it."""
    runtime = f.str("runtime", policy.hardening.runtime)
    request = parse_location(f)
    if remote:
        for i, cidr in enumerate(request.egress_cidrs):
            problem = policy.egress.remote_cidr_problem(cidr)
            if problem:
                raise f.error(f"egress.allow_cidrs[{i}]", problem)
    r = request.resource_map
    limits = Limits(memory=int(r.get("memory", policy.hardening.limits.memory)),
                    cpus=float(r.get("cpus", policy.hardening.limits.cpus)),
                    pids=int(r.get("pids", policy.hardening.limits.pids)))
    problem = limits_problem(limits, policy.bounds)
    if problem:
        raise f.error(f"resources.{problem[0]}", problem[1] + " — a location may only loosen within bounds")
    if runtime not in policy.bounds.runtimes:
        raise f.error("runtime", f"{runtime!r} is not allowed; bounds.runtimes is {list(policy.bounds.runtimes)}")
    return Location(
        name=request.name,
        image=request.image,
        module=request.module,
        package=request.package,
        env=request.env,
        limits=limits,
        egress=EgressAllow(hosts=request.egress_hosts, cidrs=request.egress_cidrs),
        runtime=runtime,
    )
