"""sockguard's decisions: which Docker calls the agent may make, on which objects, with which bodies.

Pure apart from ``Lookups`` (ownership and image look-ups of the real engine), so each rule is tested
with fakes. Deny by default: an endpoint not in policy/sockguard.yaml, a body field not known, an object
without the airlock label — all refused, each refusal naming its rule.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from appliance import artifacts, labels
from appliance.policy import Policy, canonical_seccomp
from appliance.policy.operator import registry_auth
from appliance.sockguard import Decision, Found, Lookups, Table, inspect
from appliance.sockguard.inspect import (
    CreateBody,
    JsonObject,
    Refusal,
    Target,
    decode_create,
    decode_object,
    lowered,
    normalize_target,
    only_fields,
)
from protocol.errors import PolicyError
from protocol.locations import ARTIFACTS_DIR, LOCATION_NAME

IMAGE_REF = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,254}")
_FALSE = {"", "0", "no", "false", "none"}  # how dockerd's BoolValue reads a query flag as false
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}  # Go's strconv.ParseBool true forms
_RESOLVED_ID = re.compile(r"[A-Za-z0-9]{1,128}")
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")  # a volume's id is its name
_USER = re.compile(r"(\d+)(?::(\d+))?")
_NAMESPACES = {"PidMode": "pid-mode", "IpcMode": "ipc-mode", "UTSMode": "uts-mode", "UsernsMode": "userns-mode"}
_DEVICES = lowered("Devices DeviceRequests DeviceCgroupRules BlkioWeightDevice BlkioDeviceReadBps BlkioDeviceWriteBps "
                   "BlkioDeviceReadIOps BlkioDeviceWriteIOps")
_LOG_DRIVERS = {"", "json-file", "local", "none"}  # others ship logs from the host network: an egress bypass
_INHIBIT_IPV4 = "com.docker.network.bridge.inhibit_ipv4"
_NETWORK_OPTIONS = {"com.docker.network.driver.mtu": r"\d{3,5}", "com.docker.network.bridge.enable_icc": "true|false",
                    _INHIBIT_IPV4: "true"}


@dataclass(frozen=True)
class Ctx:
    method: str
    target: Target
    match: re.Match[str]
    body: bytes
    policy: Policy
    lookups: Lookups
    headers: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)  # a check may add some

    def rewrite(self, group: str, resolved: str, shape: re.Pattern[str] = _RESOLVED_ID) -> bytes:
        """Forward with the engine's full id, so the action hits exactly the object that was checked."""
        if not shape.fullmatch(resolved):
            raise Refusal("upstream", "engine returned an unexpected object id", status=502)
        m = self.match
        return self.target.encode(path=m.string[: m.start(group)] + resolved + m.string[m.end(group) :])


async def decide(
    method: str, raw_target: bytes, body: bytes, *, table: Table, policy: Policy, lookups: Lookups
) -> Decision:
    """Normalize, match the allowlist, run the endpoint's check. Returns a Decision; never raises Refusal."""
    path = raw_target.decode("ascii", "backslashreplace")[:300]
    try:
        target = normalize_target(raw_target)
        path = target.path
        if target.version is not None and target.version < table.min_api:
            raise Refusal("api-version", f"API v{target.version[0]}.{target.version[1]} is older than allowed")
        found = table.match(method, target.path)
        if found is None:
            raise Refusal("endpoint", f"{method} {target.path} is not allowed by policy/sockguard.yaml")
        endpoint, match = found
        if body and endpoint.check not in BODY_CHECKS:
            raise Refusal("body", f"{method} {endpoint.path} takes no request body")
        check = CHECKS.get(endpoint.check or "", _endpoint_only)
        ctx = Ctx(method, target, match, body, policy, lookups)
        reason, forward = await check(ctx)
        return Decision(True, endpoint.check or "endpoint", reason, path, forward, headers=tuple(ctx.headers))
    except Refusal as refusal:
        return refused(refusal, path)


def refused(refusal: Refusal, path: str) -> Decision:
    return Decision(False, refusal.rule, refusal.reason, path, status=refusal.status)


async def _endpoint_only(ctx: Ctx) -> tuple[str, bytes]:
    return f"{ctx.method} {ctx.target.path} is allowed", ctx.target.encode()


async def owned_container(lookups: Lookups, ident: str, *, appliance_ok: bool) -> Found:
    found = await lookups.container(ident)
    if found is None:
        raise Refusal("owner", f"no such container: {ident}", status=404)
    if labels.is_appliance(found.labels) and not appliance_ok:
        raise Refusal("owner", f"container {ident} is the appliance itself")
    if not labels.is_managed(found.labels) and not labels.is_appliance(found.labels):
        raise Refusal("owner", f"container {ident} is not labelled {labels.MANAGED}=true")
    return found


async def owned_network(lookups: Lookups, ident: str, *, internal: bool, rule: str = "owner") -> Found:
    found = await lookups.network(ident)
    if found is None:
        raise Refusal(rule, f"no such network: {ident}", status=404 if rule == "owner" else 403)
    if not labels.is_managed(found.labels) or labels.is_appliance(found.labels):
        raise Refusal(rule, f"network {ident} is not labelled {labels.MANAGED}=true")
    if internal and not found.internal:
        raise Refusal("network-internal" if rule == "owner" else rule, f"network {ident} is not Internal")
    return found


def _whose(found: Found) -> str:
    return "the appliance" if labels.is_appliance(found.labels) else "managed by airlock"


async def _container_owned(ctx: Ctx, appliance_ok: bool = False) -> tuple[str, bytes]:
    link = ctx.target.param("link")
    if link is not None and link.lower() not in _FALSE:
        raise Refusal("query", "link removal is not allowed")
    found = await owned_container(ctx.lookups, ctx.match["id"], appliance_ok=appliance_ok)
    return f"container {ctx.match['id']} is {_whose(found)}", ctx.rewrite("id", found.id)


async def _network_owned(ctx: Ctx) -> tuple[str, bytes]:
    found = await owned_network(ctx.lookups, ctx.match["id"], internal=False)
    return f"network {ctx.match['id']} is managed by airlock", ctx.rewrite("id", found.id)


async def _list_managed(ctx: Ctx) -> tuple[str, bytes]:
    query = inspect.with_label_filter(ctx.target, f"{labels.MANAGED}=true")
    return f"listing narrowed to {labels.MANAGED}=true", ctx.target.encode(query=query)


async def _network_attach(ctx: Ctx) -> tuple[str, bytes]:
    """connect/disconnect: the network is ours (and Internal to connect); the container ours or the appliance."""
    body = decode_object(ctx.body)
    only_fields(body, lowered("Container EndpointConfig Force"))
    network = await owned_network(ctx.lookups, ctx.match["id"], internal=ctx.target.path.endswith("/connect"))
    if not body.str("Container"):
        raise Refusal("body", "Container is required")
    container = await owned_container(ctx.lookups, body.str("Container"), appliance_ok=True)
    endpoint = body.obj("EndpointConfig")
    only_fields(endpoint, inspect.ENDPOINT_FIELDS)
    if endpoint.list("Links") or endpoint.mapping("DriverOpts"):
        raise Refusal("network-options", "EndpointConfig Links and DriverOpts are not allowed")
    reason = f"network {ctx.match['id']} is ours; container {body.str('Container')} is {_whose(container)}"
    return reason, ctx.rewrite("id", network.id)


def registry_host(repository: str) -> str:
    """The registry a repository names, as Docker reads it: a first component with '.' or ':', or localhost."""
    first, sep, _ = repository.partition("/")
    return first if sep and ("." in first or ":" in first or first == "localhost") else "docker.io"


async def _image_pull(ctx: Ctx) -> tuple[str, bytes]:
    """A pull from a registry the operator listed, by digest only, with that registry's login added here (the
    agent never holds it); or, where policy/images.yaml says allow_pull, any allowlisted image."""
    extra = sorted({k for k, _ in ctx.target.query} - {"fromImage", "tag", "platform"})
    if extra:  # fromSrc would import a tarball under any name; repo/changes rewrite it
        raise Refusal("pull", f"only fromImage, tag and platform may be given (got {', '.join(extra)})")
    image, tag = ctx.target.param("fromImage") or "", ctx.target.param("tag") or ""
    if not IMAGE_REF.fullmatch(image) or (tag and not IMAGE_REF.fullmatch(tag)):
        raise Refusal("pull", "fromImage (and tag) must be plain image references")
    ref = f"{image}@{tag}" if tag.startswith("sha256:") else f"{image}:{tag}" if tag else image
    repository, _, digest = ref.partition("@")
    repository = repository if digest else ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref
    images, host = ctx.policy.images, registry_host(repository)
    if host in images.registries:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise Refusal("pull", f"{ref}: images are pulled by digest only (repo@sha256:<digest>), never by a tag, "
                                  f"which can move")
        credentials = images.registries[host]
        if credentials:
            try:
                auth = registry_auth(credentials) | {"serveraddress": host}
            except PolicyError as exc:
                raise Refusal("pull", str(exc)) from None
            ctx.headers.append((b"x-registry-auth", base64.urlsafe_b64encode(json.dumps(auth).encode())))
    elif not images.allow_pull:
        raise Refusal("pull", f"{host} is not a registry this appliance pulls from (on the appliance: `airlock images "
                              f"registry add {host}`)")
    allowed, why = images.decide(digest or ref, (repository,), (ref,) if digest else ())
    if not allowed:
        raise Refusal("pull", why)
    return why, ctx.target.encode()


async def _network_create(ctx: Ctx) -> tuple[str, bytes]:
    n = decode_object(ctx.body)
    only_fields(n, inspect.NETWORK_FIELDS)
    tags, ipam = n.str_map("Labels"), n.obj("IPAM")
    for rule, failure in (
        ("network-label", (tags.get(labels.MANAGED) != "true" or labels.is_appliance(tags))
         and f"Labels must carry {labels.MANAGED}=true"),
        ("network-internal", not n.bool("Internal") and "Internal must be true: user code gets no route out"),
        ("network-driver", n.str("Driver") not in {"", "bridge"} and f"driver {n.str('Driver')!r} is not bridge"),
        ("network-scope", (n.str("Scope") not in {"", "local"} or n.bool("Ingress") or n.bool("ConfigOnly")
                           or n.bool("Attachable") or n.present("ConfigFrom")) and "only a plain local network"),
        ("network-options", [k for k, v in n.str_map("Options").items()
                             if not re.fullmatch(_NETWORK_OPTIONS.get(k, "(?!)"), v)]),
        # `Internal` alone still lets containers reach the host at the bridge's gateway address.
        ("network-host-isolation", n.str_map("Options").get(_INHIBIT_IPV4) != "true"
         and f"Options must set {_INHIBIT_IPV4}=true: the host must have no address on a location network"),
        ("network-ipam", (ipam.str("Driver") not in {"", "default"} or ipam.list("Config") or ipam.mapping("Options"))
         and "explicit IPAM could shadow host routes"),
    ):
        if failure:
            raise Refusal(rule, failure if isinstance(failure, str) else f"options not allowed: {failure}")
    return "an Internal airlock network", ctx.target.encode()


async def _container_create(ctx: Ctx) -> tuple[str, bytes]:
    b = decode_create(ctx.body)
    for rule, failure in _create_checks(b, ctx.policy):
        if failure:
            raise Refusal(rule, str(failure))
    mode, names = b.host.str("NetworkMode"), set(b.endpoints)
    if mode in {"", "default", "bridge", "host"} or mode.startswith("container:") or (mode == "none" and names):
        raise Refusal("network-mode", f"NetworkMode {mode or 'default'!r} is not allowed: use an airlock network")
    for name in sorted({mode, *names} - {"none"}):
        await owned_network(ctx.lookups, name, internal=True, rule="network-mode")
    ref = b.config.str("Image")
    if not IMAGE_REF.fullmatch(ref):
        raise Refusal("image", "Config.Image must be an image reference")
    image = await ctx.lookups.image(ref)
    if image is None:
        raise Refusal("image", f"No such image: {ref}", status=404)
    allowed, why = ctx.policy.images.decide(image.id, image.repo_tags, image.repo_digests)
    if not allowed:
        raise Refusal("image", why)
    for mount in b.host.list("Mounts"):
        if mount.str("Type") == "volume":
            await _artifacts_mount(ctx, mount, b.config.str_map("Labels"))
    return "container create passed every hardening check", ctx.target.encode()


_MOUNT_FIELDS = lowered("Type Source Target ReadOnly Consistency VolumeOptions")


async def _artifacts_mount(ctx: Ctx, mount: JsonObject, tags: dict[str, str]) -> None:
    """A volume Mount is only ever the container's own location's artifact volume (appliance/artifacts.py), at
    ARTIFACTS_DIR, never copied onto from the image; or, for the create-only preparation container, at /tmp."""
    only_fields(mount, _MOUNT_FIELDS)
    options = mount.obj("VolumeOptions")
    only_fields(options, lowered("NoCopy"))  # DriverConfig/Labels would make Docker create a volume on the fly
    source, target = mount.str("Source"), mount.str("Target")
    prep = tags.get(labels.ROLE) == labels.ROLE_ARTIFACTS_PREP
    if target != (artifacts.PREP_TARGET if prep else ARTIFACTS_DIR):
        raise Refusal("mounts", f"a volume mounts only at {ARTIFACTS_DIR} (got {target!r})")
    if options.bool("NoCopy") == prep:
        raise Refusal("mounts", "VolumeOptions.NoCopy must be true (false only to prepare a new artifact volume)")
    found = await ctx.lookups.volume(source) if source else None
    expected = artifacts.volume_name(tags.get(labels.APPLIANCE_ID, ""), tags.get(labels.LOCATION, ""))
    if found is None or source != expected:
        raise Refusal("mounts", f"volume {source!r} is not this container's location artifact volume {expected}")
    if not _same_owner(found, tags, labels.ROLE_ARTIFACTS) or not artifacts.is_hardened_overlay(found.options):
        raise Refusal("mounts", f"volume {source} is not an airlock artifact overlay mounted nosuid,nodev,noexec")


def _create_checks(b: CreateBody, p: Policy) -> Iterator[tuple[str, object]]:
    """(rule, failure) in order; a truthy failure refuses. Getters refuse wrong JSON types as they go."""
    h, c, bounds = b.host, b.config, p.bounds
    yield "privileged", h.bool("Privileged") and "HostConfig.Privileged is true"
    yield "cap-add", (h.strs("CapAdd") or h.strs("Capabilities")) and "capabilities may not be added"
    yield "cap-drop", "ALL" not in {x.upper() for x in h.strs("CapDrop")} and "HostConfig.CapDrop must contain ALL"
    for field, rule in _NAMESPACES.items():
        mode = h.str(field)
        yield rule, (mode == "host" or mode.startswith("container:")) and f"HostConfig.{field} {mode!r} is shared"
    yield "cgroupns-mode", (h.str("CgroupnsMode") == "host" or h.str("Cgroup")) and "no host/shared cgroup namespace"
    yield "cgroup-parent", h.str("CgroupParent") and "HostConfig.CgroupParent may not be set"
    yield "devices", any(h.list(f) for f in _DEVICES) and "host devices may not be passed in"
    yield "binds", _storage(b)
    yield "ports", (h.mapping("PortBindings") or h.bool("PublishAllPorts")) and "no ports may be published on the host"
    yield "links", h.list("Links") and "HostConfig.Links is not allowed"
    opts = inspect.security_opts(h)
    yield "seccomp", _seccomp(opts.get("seccomp"), p)
    yield "apparmor", opts.get("apparmor", "docker-default") != "docker-default" and "only the docker-default AppArmor"
    yield "label-disable", opts.get("label") == "disable" and "SELinux labelling may not be disabled"
    yield "no-new-privileges", opts.get("no-new-privileges") not in _TRUE and "SecurityOpt must set no-new-privileges"
    yield "masked-paths", (h.present("MaskedPaths") or h.present("ReadonlyPaths")) and "Masked/ReadonlyPaths are fixed"
    yield "sysctls", h.mapping("Sysctls") and "HostConfig.Sysctls may not be set"
    yield "readonly-rootfs", not h.bool("ReadonlyRootfs") and "HostConfig.ReadonlyRootfs must be true"
    m = _USER.fullmatch(c.str("User"))
    yield "user", (not m or int(m[1]) == 0 or (m[2] is not None and int(m[2]) == 0)) and (
        f"Config.User {c.str('User')!r} must be a numeric non-root uid[:gid]")
    yield "group-add", any(not g.isdigit() or int(g) == 0 for g in h.strs("GroupAdd")) and "GroupAdd: non-zero gids"
    memory = h.int("Memory")
    yield "memory", not 0 < memory <= bounds.memory_max and f"Memory must be 1..{bounds.memory_max} bytes"
    yield "memory", h.int("MemorySwap") != memory and "MemorySwap must equal Memory: no swap"
    yield "pids", not 0 < h.int("PidsLimit") <= bounds.pids_max and f"PidsLimit must be 1..{bounds.pids_max}"
    yield "cpus", not 0 < h.int("NanoCpus") <= bounds.cpus_max * 1e9 and f"NanoCpus must be 1..{bounds.cpus_max}e9"
    yield "cpus", any(h.int(f) for f in ("CpuPeriod", "CpuQuota", "CpuRealtimePeriod", "CpuRealtimeRuntime")) and (
        "CPU is limited with NanoCpus only")
    yield "oom-kill-disable", h.bool("OomKillDisable") and "OomKillDisable may not be set"
    yield "oom-score-adj", h.int("OomScoreAdj") < 0 and "OomScoreAdj may not be negative"
    yield "runtime", h.str("Runtime") not in {"", *bounds.runtimes} and f"runtime must be in {list(bounds.runtimes)}"
    yield "log-driver", h.obj("LogConfig").str("Type") not in _LOG_DRIVERS and "only json-file/local log drivers"
    yield "tmpfs", _tmpfs(h)
    tags = c.str_map("Labels")
    yield "labels", (tags.get(labels.MANAGED) != "true" or labels.is_appliance(tags)) and (
        f"Config.Labels must carry {labels.MANAGED}=true and may not claim the appliance role")
    yield "init", not h.bool("Init") and "HostConfig.Init must be true"


def _storage(b: CreateBody) -> str | None:
    h = b.host
    if h.strs("Binds") or h.strs("VolumesFrom") or h.str("VolumeDriver") or b.config.mapping("Volumes"):
        return "bind mounts, volumes and VolumesFrom are not allowed"
    if any(not isinstance(m, JsonObject) or m.str("Type") not in {"tmpfs", "volume"} for m in h.list("Mounts")):
        return "only tmpfs Mounts and the location's artifact volume are allowed"
    return None  # volume Mounts are checked against the engine in _artifacts_mount


def _seccomp(value: str | None, p: Policy) -> str | None:
    if value is None or value == "unconfined":
        return f"seccomp must be the policy profile, got {value or 'none'}"
    try:
        same = canonical_seccomp(json.loads(value)) == p.hardening.seccomp_profile
    except (json.JSONDecodeError, RecursionError):
        same = False
    return None if same else "seccomp profile differs from the policy profile"


def _tmpfs(h: JsonObject) -> str | None:
    for point, options in h.mapping("Tmpfs").items():
        if not isinstance(options, str) or not point.startswith("/") or ".." in point:
            return f"Tmpfs {point!r} must be an absolute path with string options"
        if {"exec", "suid", "dev"} & set(options.split(",")):
            return f"tmpfs {point} may not be mounted exec, suid or dev"
    return None


def _same_owner(found: Found, tags: dict[str, str], role: str) -> bool:
    """A volume of ours with `role`, for the same appliance and location as `tags`."""
    have = found.labels
    return (labels.is_managed(have) and have.get(labels.ROLE) == role and found.driver in {"", "local"}
            and bool(tags.get(labels.APPLIANCE_ID)) and have.get(labels.APPLIANCE_ID) == tags.get(labels.APPLIANCE_ID)
            and bool(tags.get(labels.LOCATION)) and have.get(labels.LOCATION) == tags.get(labels.LOCATION))


async def _volume_owned(ctx: Ctx) -> tuple[str, bytes]:
    if {k for k, _ in ctx.target.query} - {"force"}:
        raise Refusal("query", "only force may be given")
    found = await ctx.lookups.volume(ctx.match["id"])
    if found is None:
        raise Refusal("owner", f"no such volume: {ctx.match['id']}", status=404)
    if not labels.is_managed(found.labels) or labels.is_appliance(found.labels):
        raise Refusal("owner", f"volume {ctx.match['id']} is not labelled {labels.MANAGED}=true")
    return f"volume {ctx.match['id']} is managed by airlock", ctx.rewrite("id", found.id, _VOLUME_NAME)


async def _volume_create(ctx: Ctx) -> tuple[str, bytes]:
    """Only the shapes appliance/artifacts.py defines: plain layer volumes, and the nosuid,nodev,noexec overlay
    whose directories are exactly those layers' Mountpoints as the engine reports them (no host path chosen
    by the caller)."""
    v = decode_object(ctx.body)
    only_fields(v, lowered("Name Driver DriverOpts Labels"))
    tags, name, opts = v.str_map("Labels"), v.str("Name"), v.str_map("DriverOpts")
    appliance_id, location, role = (tags.get(k, "") for k in (labels.APPLIANCE_ID, labels.LOCATION, labels.ROLE))
    if not labels.is_managed(tags) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", appliance_id) or not re.fullmatch(
            LOCATION_NAME, location):
        raise Refusal("volume-label", f"Labels must carry {labels.MANAGED}=true, an appliance id and a location")
    if v.str("Driver") not in {"", "local"}:
        raise Refusal("volume-driver", f"driver {v.str('Driver')!r} is not local")
    volume = artifacts.volume_name(appliance_id, location)
    if role == labels.ROLE_ARTIFACTS_LAYER:
        if name not in {artifacts.layer_name(volume, layer) for layer in artifacts.LAYERS} or opts:
            raise Refusal("volume-shape", f"a layer volume is {volume}-{{lower,upper,work}} with no DriverOpts")
        return f"artifact layer volume {name}", ctx.target.encode()
    if role != labels.ROLE_ARTIFACTS or name != volume:
        raise Refusal("volume-shape", f"only the artifact volume {volume} and its layers may be created")
    points: dict[str, str] = {}
    for layer in artifacts.LAYERS:
        found = await ctx.lookups.volume(artifacts.layer_name(volume, layer))
        if found is None or not _same_owner(found, tags, labels.ROLE_ARTIFACTS_LAYER) or found.options:
            raise Refusal("volume-shape", f"layer {artifacts.layer_name(volume, layer)} is not a plain airlock volume")
        points[layer] = found.mountpoint
    try:
        expected = artifacts.overlay_options(points)
    except ValueError as exc:
        raise Refusal("volume-shape", str(exc)) from None
    if opts != expected:
        raise Refusal("volume-shape", "DriverOpts must be the nosuid,nodev,noexec overlay of its own layer volumes")
    return f"artifact volume {name} over its own layers", ctx.target.encode()


CHECKS: dict[str, Callable[[Ctx], Awaitable[tuple[str, bytes]]]] = {
    "container-create": _container_create,
    "container-owned": _container_owned,
    "container-owned-or-appliance": functools.partial(_container_owned, appliance_ok=True),
    "list-managed": _list_managed,
    "network-create": _network_create,
    "network-owned": _network_owned,
    "network-attach": _network_attach,
    "image-pull": _image_pull,
    "volume-owned": _volume_owned,
    "volume-create": _volume_create,
}
BODY_CHECKS = {"container-create", "network-create", "network-attach", "volume-create"}
