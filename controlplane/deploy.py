"""Deploys from CI: `airlock-cp deploy dagster_cloud.yaml` (or `deploy()`), in Dagster+'s own file format.

Reads the `locations:` of a dagster_cloud.yaml, adds or replaces each one in the registry (others are left as
they are, as `dagster-cloud deployment deploy` does), then waits until every deployed location is LOADED on
its appliance, or prints the reason it is not. Exit status non-zero on any failure, so a CI job fails with it.

What maps, and what is refused (never silently ignored):

- location_name -> name; agent_queue -> queue.
- image -> image, pinned: `sha256:<id>` or `repository@sha256:<digest>` (a tag can move).
- code_source.module_name / package_name -> module / package. python_file, working_directory,
  executable_path and attribute are refused: install the project in the image and name its module or package.
- container_context.env_vars: ["NAME=value"] -> env. A bare "NAME" (Dagster+ copies it from the agent's
  environment) is refused: airlock never hands the agent's environment to user code.
- container_context.docker / k8s / ecs and build are refused: the appliance's hardening decides the container,
  and images are built before deploying.
- airlock: {resources, egress} -> resources, egress: airlock's own extension, bounded by the appliance.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.gateway.store import AgentStore
from controlplane.registry import DEFAULT_QUEUE, LocationRecord, Registry
from protocol.errors import PolicyError
from protocol.fields import Fields, yaml_fields

__all__ = ["DeployOutcome", "DeployResult", "deploy", "observed_state", "read_deploy_file"]

_REFUSED_CODE_SOURCE = ("python_file", "working_directory", "executable_path", "attribute", "autoload_defs_module_name")
_INSTALL_HINT = "airlock loads code by module or package: install the project in the image and name it " \
                "(docs/USER_CODE.md)"


def read_deploy_file(path: str | Path) -> tuple[dict[str, Any], ...]:
    """Each location of the file as a registry entry; the whole file is checked before anything changes."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PolicyError(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    f = yaml_fields(text, str(path), versioned=False)  # Dagster+'s file has no version key
    entries: dict[str, dict[str, Any]] = {}
    for loc in f.children("locations"):
        entry = _entry(loc)
        if entry["name"] in entries:
            raise loc.error("location_name", f"duplicate location {entry['name']!r}")
        entries[entry["name"]] = entry
    f.done()
    if not entries:
        raise f.error("locations", "lists no location")
    return tuple(entries.values())


def _entry(loc: Fields) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": loc.str("location_name"), "image": loc.str("image")}
    for key in ("build", "executable_path", "attribute", "working_directory", "python_file"):
        if loc.has(key):
            loc.raw(key)
            why = "images are built before deploying: build it, then give `image`" if key == "build" else _INSTALL_HINT
            raise loc.error(key, f"cannot be honoured here: {why}")
    source = loc.child("code_source")
    for key in _REFUSED_CODE_SOURCE:
        if source.has(key):
            source.raw(key)
            raise source.error(key, f"cannot be honoured here: {_INSTALL_HINT}")
    module, package = source.str("module_name", None), source.str("package_name", None)
    source.done()
    if (module is None) == (package is None):
        raise loc.error("code_source", "give exactly one of module_name or package_name")
    entry["module" if module else "package"] = module or package
    context = loc.child("container_context", {})
    env: dict[str, str] = {}
    for i, item in enumerate(context.str_list("env_vars", [])):
        name, sep, value = item.partition("=")
        if not sep:
            raise context.error(f"env_vars[{i}]", f"{item!r} names a variable without a value: airlock never "
                                                  "hands the agent's environment to user code; give NAME=value")
        env[name] = value
    for key in ("docker", "k8s", "ecs", "secrets", "server_k8s_config", "run_k8s_config"):
        if context.has(key):
            context.raw(key)
            raise context.error(key, "cannot be honoured here: the appliance's hardening decides the container "
                                     "(resources and egress go under `airlock:`)")
    context.done()
    if env:
        entry["env"] = env
    entry["queue"] = loc.str("agent_queue", DEFAULT_QUEUE)
    extra = loc.child("airlock", {})
    for key in ("resources", "egress"):
        if extra.has(key):
            entry[key] = extra.raw(key)
    extra.done()
    loc.done()
    return entry


def observed_state(store: AgentStore, record: LocationRecord, *,
                   since: float | None = None) -> tuple[str, str | None, str | None]:
    """(state, error, container) as the live agents serving the location's queue last reported it; an ERROR
    reported before `since` reads as LOADING (not yet a verdict)."""
    states = [s for s in store.location_states(record.deployment)
              if s.name == record.spec.name and record.spec.queue in s.queues]
    if not states:
        return "NO AGENT", None, None
    worst = next((s for s in states if s.state == "ERROR"), None) or states[0]
    if worst.state == "ERROR" and since is not None and worst.seen < since:
        return "LOADING", worst.error, worst.container
    return worst.state, worst.error, worst.container


@dataclass(frozen=True)
class DeployOutcome:
    name: str
    change: str  # added | updated | unchanged
    state: str  # LOADED | ERROR | LOADING | NO AGENT (when the wait ended)
    error: str | None = None


@dataclass
class DeployResult:
    outcomes: list[DeployOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.state == "LOADED" for o in self.outcomes)


def deploy(registry: Registry, store: AgentStore, path: str | Path, deployment: str, *, wait_seconds: float = 300.0,
           images: Mapping[str, str] | None = None, on_change: Callable[[], object] = lambda: None,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
           poll_seconds: float = 2.0, settle_seconds: float = 15.0) -> DeployResult:
    """Add or replace the file's locations, then wait (up to `wait_seconds`) until each is LOADED or in ERROR.

    `images`: location name -> image, replacing the file's (what CI knows once it has built the image).
    A location counts as deployed once its agent reports it LOADED from a code server other than the one that
    served it before the change (an unchanged location: the one it has). ERROR ends the wait for that one only
    when an agent reports it `settle_seconds` after the change: an ERROR from before (an image the operator
    has just allowed) is not the verdict on this deploy.
    """
    entries = read_deploy_file(path)
    unknown = sorted(set(images or {}) - {e["name"] for e in entries})
    if unknown:
        raise PolicyError(str(path), "locations", f"--image names {', '.join(unknown)}, which the file does not list")
    entries = tuple({**e, "image": (images or {}).get(e["name"], e["image"])} for e in entries)
    started = store.clock()
    before = {r.spec.name: observed_state(store, r)[2] for r in registry.list(deployment)}
    changes: dict[str, tuple[LocationRecord, str]] = {}
    for entry in entries:
        changes[entry["name"]] = registry.put(deployment, entry, source=str(path))
    if any(change != "unchanged" for _, change in changes.values()):
        on_change()
    deadline = clock() + wait_seconds
    pending = dict(changes)
    result = DeployResult()
    while True:
        for name, (record, change) in list(pending.items()):
            state, error, container = observed_state(store, record, since=started + settle_seconds)
            fresh = change == "unchanged" or (container is not None and container != before.get(name))
            if state == "ERROR" or (state == "LOADED" and fresh):
                result.outcomes.append(DeployOutcome(name, change, state, error))
                del pending[name]
        if not pending or clock() >= deadline:
            break
        sleep(poll_seconds)
    for name, (record, change) in pending.items():
        state, error, _ = observed_state(store, record, since=started + settle_seconds)
        timed_out = f"not LOADED within {wait_seconds:.0f} s" + (f"; last reported: {error}" if error else "")
        result.outcomes.append(DeployOutcome(name, change, "LOADING" if state == "LOADED" else state, timed_out))
    order = list(changes)
    result.outcomes.sort(key=lambda o: order.index(o.name))
    return result
