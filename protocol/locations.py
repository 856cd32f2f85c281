"""The location-spec rules both sides apply: one `parse_location` for what a code location may ask for.

The control plane checks a spec with it before anything reaches an agent (`airlock-cp location add`, the
registry, deploy files); the appliance checks the same entry with it again when a desired set arrives, then
applies its own local bounds on top (limits, runtime, image allowlist). So an operator sees the appliance's
error text on the control plane, and neither side can drift from the other.

Pure: no I/O, no policy. What a location *may* have on this appliance is decided in appliance/policy.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol.fields import Fields

__all__ = ["ARTIFACTS_DIR", "ENV_NAME", "FORBIDDEN_ENV", "FORBIDDEN_ENV_PREFIXES", "LOCATION_NAME", "PYTHON_NAME",
           "RESERVED_ENV", "HostPort", "IPNetwork", "LocationRequest",
           "check_env_name", "parse_host_port", "parse_location"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Where a location's persistent artifact volume sits in its code server and runs: the base_dir of the
# LocalArtifactStorage the control plane's instance ref names, so Dagster's default IO manager writes under
# ARTIFACTS_DIR/storage and a later run (or the code server) reads what an earlier run wrote.
ARTIFACTS_DIR = "/opt/dagster/artifacts"

LOCATION_NAME = r"[a-z0-9][a-z0-9_-]{0,40}"
PYTHON_NAME = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
IMAGE_REFERENCE = r"[A-Za-z0-9][A-Za-z0-9._/:@-]*"
# Env names the launcher sets itself; a location must not override them.
RESERVED_ENV = frozenset({"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
                          "DAGSTER_HOME"})
# A location may not hand its code these: they would smuggle credentials or loosen the sandbox, or they change
# how an interpreter, the dynamic loader or Dagster's CLI starts: whoever sets them chooses code that runs at
# start-up (PYTHONSTARTUP, PYTHONWARNINGS importing a module, LD_PRELOAD, BASH_ENV, DAGSTER_CLI_API_GRPC_*
# pointing `dagster api grpc` at another file, ...). Refused by class, by prefix, not one name at a time.
FORBIDDEN_ENV_PREFIXES = ("AIRLOCK_", "DOCKER_", "PYTHON", "LD_", "DYLD_", "DAGSTER_CLI", "PERL", "RUBY", "NODE_",
                          "JAVA_", "_JAVA_", "JDK_", "GCONV_", "MALLOC_", "GLIBC_", "BASH_FUNC_")
FORBIDDEN_ENV = frozenset({"BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "CDPATH", "HOSTALIASES",
                           "LOCPATH", "NLSPATH", "RES_OPTIONS", "TMPDIR", "PATH", "HOME", "SSL_CERT_FILE",
                           "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSH_COMMAND",
                           "GIT_EXEC_PATH", "OPENSSL_CONF", "VIRTUAL_ENV"})
RESOURCE_KEYS = ("memory", "cpus", "pids")
_HOSTPORT = re.compile(r"^(\*\.)?([a-z0-9-]+(?:\.[a-z0-9-]+)*|\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5}|\*)$")


@dataclass(frozen=True)
class HostPort:
    """One egress allowlist entry: a host (or ``*.suffix`` glob) and a port (``*`` for any)."""

    host: str
    port: int | None

    def matches(self, host: str, port: int) -> bool:
        host = host.lower().rstrip(".")
        if self.port is not None and port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def __str__(self) -> str:
        return f"{self.host}:{self.port if self.port is not None else '*'}"


@dataclass(frozen=True)
class LocationRequest:
    """One location as asked for, checked for shape only; `resources` holds just the keys that were given."""

    name: str
    image: str
    module: str | None
    package: str | None
    env: tuple[tuple[str, str], ...]
    resources: tuple[tuple[str, int | float], ...]  # a subset of memory (bytes) / cpus / pids, sorted
    egress_hosts: tuple[HostPort, ...]
    egress_cidrs: tuple[IPNetwork, ...]

    @property
    def resource_map(self) -> Mapping[str, int | float]:
        return dict(self.resources)


def parse_location(f: Fields) -> LocationRequest:
    """Read one location mapping and refuse any field left unread; errors name the field.

    A caller with fields of its own (the registry's `queue`, the appliance's `runtime`) reads them from `f`
    first: `done()` here then counts them as known.
    """
    name = f.str("name", pattern=LOCATION_NAME)
    image = f.str("image", pattern=IMAGE_REFERENCE)
    module = f.str("module", None, pattern=PYTHON_NAME)
    package = f.str("package", None, pattern=PYTHON_NAME)
    if (module is None) == (package is None):
        raise f.error("module", "give exactly one of 'module' or 'package'")
    env = f.str_map("env", {})
    for key in env:
        check_env_name(f, key)
    resources = _resources(f.child("resources", {}))
    e = f.child("egress", {})
    hosts = tuple(parse_host_port(e, f"allow[{i}]", item) for i, item in enumerate(e.str_list("allow", [])))
    cidrs = e.cidrs("allow_cidrs", [])
    e.done()
    f.done()
    return LocationRequest(name=name, image=image, module=module, package=package, env=tuple(sorted(env.items())),
                           resources=resources, egress_hosts=hosts, egress_cidrs=cidrs)


def check_env_name(f: Fields, key: str) -> None:
    if not re.fullmatch(ENV_NAME, key):
        raise f.error(f"env.{key}", "not a valid environment variable name")
    if key in RESERVED_ENV or key.startswith(("AIRLOCK_", "DOCKER_")):
        raise f.error(f"env.{key}", "is reserved: the launcher sets it, or it would cross the trust boundary")
    if key in FORBIDDEN_ENV or key.startswith(FORBIDDEN_ENV_PREFIXES):  # names are case-sensitive on Linux
        raise f.error(f"env.{key}", "changes how the interpreter, the loader, the shell or Dagster's CLI starts "
                                    "(code chosen by whoever sets it would run at start-up); set it in the image")


def _resources(r: Fields) -> tuple[tuple[str, int | float], ...]:
    """Absent keys mean the appliance's defaults; its bounds are checked there, not here."""
    readers: dict[str, Any] = {"memory": r.size, "cpus": lambda k: r.number(k, minimum=0),
                               "pids": lambda k: r.int(k, minimum=8)}
    out = tuple(sorted((k, readers[k](k)) for k in RESOURCE_KEYS if r.raw(k, None) is not None))
    r.done()
    return out


def parse_host_port(f: Fields, key: str, item: str) -> HostPort:
    """One egress entry, `host:port`, `*.suffix:port` or `host:*`; the egress proxy's route file reads it too."""
    m = _HOSTPORT.match(item.lower())
    if not m:
        raise f.error(key, f"{item!r} is not 'host:port' (a '*.' prefix and port '*' are allowed)")
    port = None if m.group(3) == "*" else int(m.group(3))
    if port is not None and not 0 < port < 65536:
        raise f.error(key, f"port {port} is out of range")
    return HostPort(host=(m.group(1) or "") + m.group(2), port=port)
