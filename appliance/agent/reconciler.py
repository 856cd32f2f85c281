"""One reconcile pass: make the code servers on this engine match the desired locations.

Steps, each idempotent: ensure each location's internal network (appliance attached as the egress
proxy), compute each hardened spec, plan keep/create/remove against what Docker reports, act, probe
health over gRPC, publish status and egress routes. Failures are per location and retried with
backoff; a location in ERROR is retried, never pinned there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import grpc

from appliance import labels
from appliance.agent import health
from appliance.agent.plan import Observed, plan
from appliance.agent.routes import render_routes, write_routes
from appliance.agent.status import ApplianceStatus, LocationStatus, State, now
from appliance.launcher.base import Launcher, Workload
from appliance.launcher.engine import LauncherError
from appliance.launcher.spec import ContainerSpec, artifacts_prep_spec, code_server_spec
from appliance.policy import Location, Policy
from appliance.policy.operator import LiveImages
from protocol.backoff import Backoff
from protocol.dagster_grpc import DEFAULT_PORT

log = logging.getLogger("airlock.agent")
STARTUP_GRACE_SECONDS = 180.0  # a code server may take this long to answer its first ping


def observe(workload: Workload) -> Observed:
    return Observed(id=workload.id, name=workload.name, location=workload.location, spec_hash=workload.spec_hash,
                    state=workload.state, health=workload.health)


@dataclass
class Reconciler:
    engine: Launcher
    policy: Policy
    appliance_container: str
    egress_routes: str
    egress_port: int
    location_token: Callable[[str], str] | None = None  # connected mode: a code server's read-only token
    images: LiveImages | None = None  # the image allowlist as the operator has it now; None: policy.images
    backoff: Backoff = field(default_factory=Backoff)
    statuses: dict[str, LocationStatus] = field(default_factory=dict)
    _known: set[str] = field(default_factory=set)  # container ids this process has seen

    def reconcile(self, locations: tuple[Location, ...], *, refused: Mapping[str, str] | None = None,
                  purge: Collection[str] = ()) -> ApplianceStatus:
        """One pass. `refused`: locations local policy refused (name -> why); one still in `locations` keeps its
        last accepted spec running and carries the refusal as its error, a new one is ERROR with the reason.
        `purge`: removed locations whose artifact volume the operator asked to delete (`location remove
        --purge`); any other location's volume stays, so adding it back finds its files."""
        desired = {loc.name: loc for loc in locations}
        refused = dict(refused or {})
        specs: dict[str, ContainerSpec] = {}
        subnets: dict[str, list[str]] = {}
        for name, location in desired.items():
            try:
                network = self.engine.ensure_network(name, attach=self.appliance_container)
                subnets[name] = list(network.subnets)
                image = self.engine.image(location.image)
                allowed, why = (self.images.current() if self.images else self.policy.images).decide(
                    image.id, image.tags, image.digests)
                if not allowed:  # no backoff: the moment the operator allows it, the next pass starts it
                    self._set(name, State.ERROR, image=location.image, error=f"refused by this appliance: {why}")
                    continue
                self.engine.ensure_artifacts(name, prep=artifacts_prep_spec(
                    location, self.policy, appliance_id=self.engine.appliance_id, image_id=image.id))
                token = self.location_token(name) if self.location_token else None
                specs[name] = code_server_spec(location, self.policy, appliance_id=self.engine.appliance_id,
                                               image_id=image.id, egress_port=self.egress_port, storage_token=token)
            except LauncherError as exc:
                self._set(name, State.ERROR, error=str(exc))
                self.backoff.failed(name)
        if write_routes(self.egress_routes, render_routes(subnets, desired)):
            log.info("egress routes updated for %s", ", ".join(sorted(subnets)) or "no locations")

        containers = {w.id: w for w in self.engine.workloads(labels.ROLE_CODE_SERVER)}
        observed = [observe(c) for c in containers.values()]
        # A location whose spec could not be computed keeps whatever runs for it until it can be.
        wanted = {name: spec.spec_hash for name, spec in specs.items()}
        wanted |= {o.location: o.spec_hash for o in observed if o.location in desired and o.location not in specs}
        result = plan(wanted, observed)

        for stale in result.remove:
            if stale.location not in desired:
                reason = "orphan"
            elif stale.spec_hash != wanted.get(stale.location):
                reason = "spec changed"
            else:
                reason = f"{stale.state}/{stale.health or '-'}"
                self._failed(stale.location, stale, containers[stale.id], f"code server {stale.state}"
                             + (f" ({stale.health})" if stale.health else ""), desired[stale.location].image)
            log.info("removing code server %s (%s)", stale.name, reason)
            try:
                self.engine.remove(containers[stale.id])
            except LauncherError as exc:
                log.warning("%s", exc)
        for name, kept in result.keep.items():
            if kept.id not in self._known:
                log.info("adopted code server %s for %s (spec %s)", kept.name, name, kept.spec_hash)
                self._known.add(kept.id)
            self._probe(name, kept, containers[kept.id], desired[name].image)
        for name in result.create:
            if name in specs and self.backoff.ready(name):
                self._create(specs[name], desired[name])
        for name in list(self.statuses):
            if name not in desired and name not in refused:
                del self.statuses[name]
        for name, reason in refused.items():
            why = f"refused by this appliance's policy: {reason}"
            if name not in desired:
                self._set(name, State.ERROR, error=why)
            else:  # the previous spec still serves; say why the new one does not
                status = self.statuses.get(name)
                if status is not None:
                    self.statuses[name] = dataclasses.replace(status, error=f"update {why}; the previous spec "
                                                                            f"keeps running")
        self._remove_orphan_networks(set(desired))
        self._purge_artifacts(set(purge) - set(desired) - set(refused))
        return ApplianceStatus(self.engine.appliance_id, now(), dict(self.statuses))

    def _create(self, spec: ContainerSpec, location: Location) -> None:
        try:
            container = self.engine.start(spec)
        except LauncherError as exc:
            delay = self.backoff.failed(location.name)
            log.warning("location %s: %s (retry in %.0f s)", location.name, exc, delay)
            self._set(location.name, State.ERROR, error=str(exc))
            return
        self._known.add(container.id)
        log.info("started code server %s for %s", spec.name, location.name)
        self._set(location.name, State.LOADING, container=spec.name, container_id=container.id, image=location.image)

    def _probe(self, name: str, kept: Observed, container: Workload, image: str) -> None:
        previous = self.statuses.get(name)
        if kept.state == "running":
            result = health.ping(f"{kept.name}:{DEFAULT_PORT}", timeout=3.0)
            if result.ok:
                self.backoff.succeeded(name)
                try:
                    error = health.load_error(f"{kept.name}:{DEFAULT_PORT}")
                except grpc.RpcError as exc:
                    error = f"ListRepositories failed: {exc}"
                # A code error keeps the server: it serves the traceback to Dagster until the spec changes.
                state = State.ERROR if error else State.LOADED
                self._set(name, state, container=kept.name, container_id=kept.id, image=image, error=error)
                return
            detail = result.detail
        else:
            detail = f"container is {kept.state}"
        started = previous.since if previous and previous.container_id == kept.id else now()
        if previous and previous.state is State.LOADED and previous.container_id == kept.id:
            started = now()  # it was fine until now: a fresh grace period before calling it an error
        if now() - started < STARTUP_GRACE_SECONDS:
            self._set(name, State.LOADING, container=kept.name, container_id=kept.id, image=image,
                      error=detail, since=started)
            return
        # Never answered within the grace period: report why and replace it, with backoff.
        self._failed(name, kept, container, detail, image)
        try:
            self.engine.remove(container)
        except LauncherError as exc:
            log.warning("%s", exc)

    def _failed(self, name: str, observed: Observed, container: Workload, detail: str, image: str) -> None:
        """Record ERROR with the container's last log lines (the Python traceback), and back off."""
        tail = self.engine.log_tail(container)
        delay = self.backoff.failed(name)
        self._set(name, State.ERROR, container=observed.name, container_id=observed.id, image=image,
                  error=f"{detail}; retrying in {delay:.0f} s\n{tail}")

    def _set(self, name: str, state: State, *, since: float | None = None, **fields: object) -> None:
        previous = self.statuses.get(name)
        changed = previous is None or previous.state is not state or previous.container_id != fields.get("container_id")
        if since is None:
            since = now() if changed or previous is None else previous.since
        self.statuses[name] = LocationStatus(name=name, state=state, since=since, **fields)  # type: ignore[arg-type]
        if changed:
            log.info("location %s: %s%s", name, state.value, f" ({fields.get('error')})" if fields.get("error") else "")

    def _purge_artifacts(self, names: set[str]) -> None:
        """Delete the artifact volumes asked for once nothing of the location runs; until then, next pass."""
        for name in sorted(names & set(self.engine.artifact_locations())):
            busy = [w.name for role in (labels.ROLE_CODE_SERVER, labels.ROLE_RUN)
                    for w in self.engine.workloads(role) if w.location == name]
            if busy:
                log.info("artifact volume of %s: purge waits for %s", name, ", ".join(busy))
                continue
            try:
                self.engine.remove_artifacts(name)
            except LauncherError as exc:
                log.warning("artifact volume of %s not purged yet: %s", name, exc)

    def _remove_orphan_networks(self, desired: set[str]) -> None:
        for network in self.engine.networks():
            if network.location not in desired:
                log.info("removing network %s (location %s no longer desired)", network.name, network.location)
                try:
                    self.engine.remove_network(network, detach=self.appliance_container)
                except LauncherError as exc:
                    log.warning("%s", exc)
