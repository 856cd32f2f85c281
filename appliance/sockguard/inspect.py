"""Turn raw request bytes into exactly the values sockguard decides on, and nothing else.

The forwarded request is rebuilt from what this module returns (normalized path, re-encoded query,
the very body bytes that were decoded), so the Docker engine cannot see something the rules did not.
Docker decodes JSON with Go's encoding/json, which matches field names ignoring case and lets the last
duplicate win; here names are matched ignoring ASCII case and any ambiguity is refused outright.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

import h11

from protocol.errors import PermanentError

MAX_BODY = 1 << 20  # bigger create bodies are not something the agent sends: refuse with 413
_VERSION = re.compile(r"^/v(\d+)\.(\d+)(?=/|$)")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9/_.:@+-]*$")


class Refusal(PermanentError):
    """A request sockguard will not forward: the rule that refused it, why, and the HTTP status."""

    def __init__(self, rule: str, reason: str, status: int = 403) -> None:
        super().__init__(f"{rule}: {reason}")
        self.rule = rule
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Target:
    """A normalized request target: optional API version, clean path, decoded query pairs."""

    version: tuple[int, int] | None
    path: str
    query: tuple[tuple[str, str], ...]

    def param(self, name: str) -> str | None:
        values = [v for k, v in self.query if k == name]
        if len(values) > 1:
            raise Refusal("query", f"query parameter {name!r} given more than once")
        return values[0] if values else None

    def encode(self, path: str | None = None, query: Iterable[tuple[str, str]] | None = None) -> bytes:
        """The target to forward: always rebuilt, never the client's original bytes."""
        prefix = f"/v{self.version[0]}.{self.version[1]}" if self.version else ""
        q = urlencode(list(self.query if query is None else query))
        return (prefix + (self.path if path is None else path) + (f"?{q}" if q else "")).encode("ascii")


def normalize_target(raw: bytes) -> Target:
    """Decode once, refuse anything odd, strip the version prefix, collapse '//'."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise Refusal("path", "request target is not ASCII") from None
    if not text.startswith("/") or "#" in text:
        raise Refusal("path", "request target must be an origin-form path")
    raw_path, _, raw_query = text.partition("?")
    try:
        path = unquote(raw_path, encoding="ascii", errors="strict")
    except UnicodeDecodeError:
        raise Refusal("path", "path decodes to non-ASCII bytes") from None
    if not _SAFE_PATH.match(path):
        raise Refusal("path", "path has characters outside [A-Za-z0-9/_.:@+-] (or is encoded twice)")
    path = re.sub(r"/{2,}", "/", path)
    version = None
    match = _VERSION.match(path)
    if match:
        version = (int(match.group(1)), int(match.group(2)))
        path = path[match.end() :]
    if any(segment in {".", ".."} for segment in path.split("/")):
        raise Refusal("path", "path has '.' or '..' segments")
    if not path.startswith("/"):
        raise Refusal("path", "nothing after the API version prefix")
    try:
        query = parse_qsl(raw_query, keep_blank_values=True, encoding="utf-8", errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise Refusal("query", "query string does not decode as UTF-8") from None
    return Target(version=version, path=path, query=tuple(query))


def with_label_filter(target: Target, label: str) -> list[tuple[str, str]]:
    """The query with ``label`` added to `filters`: Docker ANDs label filters, so this only narrows a listing."""
    raw = target.param("filters")
    try:
        filters = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise Refusal("query", "filters is not JSON") from None
    labels = filters.get("label", []) if isinstance(filters, dict) else None
    labels = list(labels) if isinstance(labels, dict) else labels  # the legacy {"k=v": true} form
    if not isinstance(labels, list) or not all(isinstance(item, str) for item in labels):
        raise Refusal("query", "filters must be a JSON object whose label is a list of strings")
    filters["label"] = [*labels, label]
    return [(k, v) for k, v in target.query if k != "filters"] + [("filters", json.dumps(filters))]


def check_headers(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Refuse connection upgrades (attach/exec hijacks) and bodies sockguard cannot read as sent."""
    for name, value in headers:
        low = value.strip().lower()
        if name == b"upgrade" or (name == b"connection" and b"upgrade" in low):
            raise Refusal("upgrade", "connection upgrade / hijack requests are not allowed")
        if name == b"content-encoding" and low not in (b"", b"identity"):
            raise Refusal("content-encoding", f"Content-Encoding {value.decode('latin-1')!r} is not allowed")


async def read_body(next_event: Callable[[], Awaitable[Any]], limit: int = MAX_BODY) -> bytes:
    """Collect the request body up to ``limit`` bytes; past it, stop reading and refuse with 413."""
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await next_event()
        if isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        if not isinstance(event, h11.Data):
            raise Refusal("body", "request body ended early", status=400)
        size += len(event.data)
        if size > limit:
            raise Refusal("body-size", f"request body is larger than {limit} bytes", status=413)
        chunks.append(event.data)


class JsonObject:
    """A JSON object read the way Go's encoding/json reads struct fields: names compared ignoring case.

    Typed getters treat ``null`` as absent (as Go does) and refuse a wrong type, because Docker would
    refuse it too and sockguard must not guess a value the engine never sees.
    """

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.where = "body"
        self.fields: dict[str, tuple[str, Any]] = {}
        for key, value in pairs:
            if not key.isascii():
                raise Refusal("body", f"non-ASCII field name {key!r} (Go folds some of these onto ASCII names)")
            if key.lower() in self.fields:
                raise Refusal("body", f"field {key!r} appears twice (names are case-insensitive)")
            self.fields[key.lower()] = (key, value)

    def get(self, key: str) -> Any:
        return self.fields.get(key.lower(), (key, None))[1]

    def present(self, key: str) -> bool:
        return self.get(key) is not None

    def names(self) -> list[str]:
        return [key for key, value in self.fields.values() if value is not None]

    def _typed(self, key: str, kind: type, what: str, default: Any) -> Any:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise Refusal("body", f"{self.where}.{key} must be {what}")
        return value

    def bool(self, key: str) -> bool:
        return self._typed(key, bool, "true or false", False)

    def int(self, key: str) -> int:
        return self._typed(key, int, "an integer", 0)

    def str(self, key: str) -> str:
        return self._typed(key, str, "a string", "")

    def list(self, key: str) -> list[Any]:
        return self._typed(key, list, "a list", [])

    def strs(self, key: str) -> list[str]:
        items = self.list(key)
        if not all(isinstance(item, str) for item in items):
            raise Refusal("body", f"{self.where}.{key} must be a list of strings")
        return items

    def obj(self, key: str) -> JsonObject:
        value = self._typed(key, JsonObject, "an object", None) or JsonObject([])
        value.where = f"{self.where}.{key}"
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        """A map field (Labels, Sysctls, Options...): keys are data here, compared exactly."""
        return {k: v for k, v in self.obj(key).fields.values()}

    def str_map(self, key: str) -> dict[str, str]:
        value = self.mapping(key)
        if not all(isinstance(v, str) for v in value.values()):
            raise Refusal("body", f"{self.where}.{key} values must be strings")
        return value


def _no_constant(name: str) -> Any:
    raise Refusal("body", f"{name} is not JSON")


def decode_object(body: bytes) -> JsonObject:
    """Strict UTF-8 JSON, exactly one object, no NaN/Infinity, no duplicate or non-ASCII field names."""
    try:
        value = json.loads(body.decode("utf-8"), object_pairs_hook=JsonObject, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise Refusal("body", "request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise Refusal("body", f"request body is not JSON: {exc.msg}") from None
    except RecursionError:
        raise Refusal("body", "request body is nested too deeply") from None
    if not isinstance(value, JsonObject):
        raise Refusal("body", "request body must be a JSON object")
    return value


def only_fields(obj: JsonObject, allowed: frozenset[str]) -> None:
    """Deny by default inside bodies too: a field sockguard does not know is refused unless null."""
    for name in obj.names():
        if name.lower() not in allowed:
            raise Refusal("unknown-field", f"{obj.where}.{name} is not a field sockguard knows how to check")


def lowered(names: str) -> frozenset[str]:
    return frozenset(name.lower() for name in names.split())


# container.Config fields of API 1.41, plus the two nested objects. Any HostConfig field at the top
# level is refused: Docker 20.10 still reads a deprecated top-level HostConfig when "HostConfig" is absent.
CONFIG_FIELDS = lowered(
    "Hostname Domainname User AttachStdin AttachStdout AttachStderr ExposedPorts Tty OpenStdin StdinOnce "
    "Env Cmd Healthcheck ArgsEscaped Image Volumes WorkingDir Entrypoint NetworkDisabled MacAddress OnBuild "
    "Labels StopSignal StopTimeout Shell HostConfig NetworkingConfig"
)
# HostConfig fields sockguard checks (rules.py) or knows to be harmless. Anything else is refused.
HOST_FIELDS = lowered(
    "Binds ContainerIDFile LogConfig NetworkMode PortBindings RestartPolicy AutoRemove VolumeDriver "
    "VolumesFrom CapAdd CapDrop Capabilities CgroupnsMode Dns DnsOptions DnsSearch ExtraHosts GroupAdd "
    "IpcMode Cgroup Links OomScoreAdj PidMode Privileged PublishAllPorts ReadonlyRootfs SecurityOpt "
    "StorageOpt Tmpfs UTSMode UsernsMode ShmSize Sysctls Runtime ConsoleSize Isolation CpuShares Memory "
    "NanoCpus CgroupParent BlkioWeight BlkioWeightDevice BlkioDeviceReadBps BlkioDeviceWriteBps "
    "BlkioDeviceReadIOps BlkioDeviceWriteIOps CpuPeriod CpuQuota CpuRealtimePeriod CpuRealtimeRuntime "
    "CpusetCpus CpusetMems Devices DeviceCgroupRules DeviceRequests KernelMemory KernelMemoryTCP "
    "MemoryReservation MemorySwap MemorySwappiness OomKillDisable PidsLimit Ulimits Mounts MaskedPaths "
    "ReadonlyPaths Init"
)
ENDPOINT_FIELDS = lowered(
    "IPAMConfig Links Aliases NetworkID EndpointID Gateway IPAddress IPPrefixLen IPv6Gateway "
    "GlobalIPv6Address GlobalIPv6PrefixLen MacAddress DriverOpts"
)
NETWORK_FIELDS = lowered(
    "Name CheckDuplicate Driver Scope EnableIPv6 IPAM Internal Attachable Ingress ConfigOnly ConfigFrom "
    "Options Labels"
)


@dataclass(frozen=True)
class CreateBody:
    """The parts of a container create body the rules read; unknown fields were already refused."""

    config: JsonObject
    host: JsonObject
    endpoints: dict[str, JsonObject]  # NetworkingConfig.EndpointsConfig, by network name or id


def decode_create(body: bytes) -> CreateBody:
    config = decode_object(body)
    only_fields(config, CONFIG_FIELDS)
    host = config.obj("HostConfig")
    only_fields(host, HOST_FIELDS)
    networking = config.obj("NetworkingConfig")
    # docker-py sends {"<network>": null} here; null unknown fields are ignored by Docker and by us.
    only_fields(networking, lowered("EndpointsConfig"))
    endpoints: dict[str, JsonObject] = {}
    raw = networking.obj("EndpointsConfig")
    for name, _ in raw.fields.values():
        endpoints[name] = raw.obj(name)
        only_fields(endpoints[name], ENDPOINT_FIELDS)
    return CreateBody(config=config, host=host, endpoints=endpoints)


def security_opts(host: JsonObject) -> dict[str, str]:
    """HostConfig.SecurityOpt as dockerd 20.10 splits it ('=' first, then legacy ':'); no repeats, no unknowns."""
    opts: dict[str, str] = {}
    for option in host.strs("SecurityOpt"):
        key, value = ("label", "disable") if option == "disable" else (option, "true")
        if option not in {"disable", "no-new-privileges"}:
            key, sep, value = option.partition("=" if "=" in option else ":")
            if not sep:
                raise Refusal("security-opt", f"SecurityOpt entry {option[:40]!r} is not key=value")
        if key not in {"seccomp", "apparmor", "label", "no-new-privileges"} or key in opts:
            raise Refusal("security-opt", f"SecurityOpt {key[:40]!r} is unknown or given twice")
        if key == "label" and value != "disable":
            raise Refusal("security-opt", "SELinux label overrides are not allowed")
        opts[key] = value
    return opts
