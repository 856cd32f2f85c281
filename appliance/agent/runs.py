"""Runs in the appliance: LAUNCH_RUN and TERMINATE_RUN handlers, and the reaper that ends each run container.

Launch: the location must be desired here; its image is resolved to a digest, a per-run token is minted, and a
hardened run container (launcher/spec.py, checked again by sockguard) starts `dagster api execute_run`. A
LAUNCH_RUN delivered twice (a lease that lapsed) finds the container already there and does nothing.

Reap, every agent tick: a run container that has exited is reported to the metadata relay (exit code, OOM
flag, last log lines), which spools the report behind the run's own events and revokes the token; the
container — and with it the logs — is removed only once the relay has forwarded everything of that run.
After an agent restart the same pass finds running run containers and leaves them alone: they are adopted,
never killed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import httpx

from appliance import labels
from appliance.agent.dispatcher import HandlerError
from appliance.launcher.base import Launcher, Workload
from appliance.launcher.engine import EngineUnavailable, LauncherError
from appliance.launcher.spec import artifacts_prep_spec, run_container_name, run_spec
from appliance.metadata.tokens import RunScope, RunTokens
from appliance.policy import Location, Policy
from protocol.backoff import Backoff
from protocol.work import SignedWork

__all__ = ["RelayControl", "RunManager"]

log = logging.getLogger("airlock.agent.runs")


class RelayControl:
    """The agent's side of the metadata relay's control socket."""

    def __init__(self, socket_path: str) -> None:
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://relay",
                                   timeout=30.0)

    def exited(self, run_id: str, report: dict[str, Any]) -> None:
        self.client.post(f"/control/runs/{run_id}/exited", json=report).raise_for_status()

    def pending(self, run_id: str) -> int:
        response = self.client.get(f"/control/runs/{run_id}")
        response.raise_for_status()
        return int(response.json()["pending"])


@dataclass
class RunManager:
    engine: Launcher
    policy: Policy
    tokens: RunTokens
    relay: RelayControl
    locations: Callable[[], tuple[Location, ...]]  # what is desired here now
    egress_port: int
    launch_retry_seconds: float = 60.0  # how long a launch is tried again after temporary engine failures
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._reported: set[str] = set()  # exited containers whose report the relay has

    # -- work handlers ---------------------------------------------------------------------------------
    def launch(self, work: SignedWork) -> dict[str, Any]:
        """Start the run's container. A temporary failure (engine or sockguard 5xx, no answer) is tried again
        with backoff for up to `launch_retry_seconds`; a launch that finally fails ends the run at once, with
        the reason in its event log (an exit report through the metadata relay), instead of leaving it STARTING
        until Dagster's start timeout."""
        payload = _payload(work, "run_id", "location", "execute_run_args")
        run_id, location_name = payload["run_id"], payload["location"]
        location = next((loc for loc in self.locations() if loc.name == location_name), None)
        if location is None:
            raise HandlerError(f"location {location_name!r} is not served by this appliance")
        backoff = Backoff(base=0.5, cap=8.0, clock=self.clock)
        deadline = self.clock() + self.launch_retry_seconds
        while True:
            try:
                return self._launch_once(run_id, location, payload["execute_run_args"])
            except EngineUnavailable as exc:
                delay = backoff.failed(run_id)
                if self.clock() + delay > deadline:
                    self._launch_failed(run_id, location_name, f"{exc} (still failing after "
                                        f"{backoff.failures(run_id)} tries in {self.launch_retry_seconds:.0f} s)")
                log.warning("run %s: launch failed for a temporary reason (%s); trying again in %.1f s",
                            run_id, exc, delay)
                self.sleep(delay)
            except (LauncherError, ValueError) as exc:
                self._launch_failed(run_id, location_name, str(exc))

    def _launch_once(self, run_id: str, location: Location, execute_run_args: str) -> dict[str, Any]:
        name = run_container_name(self.engine.appliance_id, run_id)
        existing = self._find(run_id)
        if existing is not None and existing.state != "created":
            log.info("run %s: container %s already exists (LAUNCH_RUN delivered again)", run_id, name)
            return {"container": existing.name, "already": True}
        if existing is not None:  # created by a try whose answer was lost, never started: start afresh
            self.engine.remove(existing)
        image_id = self.engine.image(location.image).id
        self.engine.ensure_artifacts(location.name, prep=artifacts_prep_spec(
            location, self.policy, appliance_id=self.engine.appliance_id, image_id=image_id))
        token = self.tokens.mint(RunScope(run_id=run_id, location=location.name))
        spec = run_spec(location, self.policy, appliance_id=self.engine.appliance_id, image_id=image_id,
                        run_id=run_id, execute_run_args=execute_run_args, token=token, egress_port=self.egress_port)
        container = self.engine.start(spec)
        log.info("run %s (%s): started %s", run_id, location.name, spec.name)
        return {"container": container.name}

    def _launch_failed(self, run_id: str, location: str, reason: str) -> NoReturn:
        """End the run now: the exit report fails it on the control plane, behind anything it already wrote."""
        why = f"the appliance could not start the run's container: {reason}"
        log.warning("run %s: %s", run_id, why)
        try:
            self.relay.exited(run_id, {"location": location, "exit_code": None, "oom_killed": False,
                                       "log_tail": "", "reason": why})
        except httpx.HTTPError as exc:  # the work item's failure still says why; run monitoring ends the run
            log.warning("run %s: the metadata relay did not take the launch failure: %s", run_id, exc)
        raise HandlerError(f"run {run_id} not started: {reason}")

    def terminate(self, work: SignedWork) -> dict[str, Any]:
        payload = _payload(work, "run_id")
        run_id, grace = payload["run_id"], int(payload.get("grace_seconds") or 20)
        container = self._find(run_id)
        if container is None:
            return {"stopped": False, "detail": "no container for this run here"}
        log.info("run %s: stopping %s (SIGTERM, %d s grace)", run_id, container.name, grace)
        try:
            self.engine.stop(container, grace_seconds=grace)  # SIGTERM: Dagster ends the run CANCELED
        except LauncherError as exc:
            raise HandlerError(str(exc)) from None
        return {"stopped": True}

    # -- the reaper ------------------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        """What the heartbeat says about runs: one entry per run container this appliance has."""
        return [{"runId": w.run_id, "location": w.location, "state": w.state,
                 "detail": None if w.state == "running" else _exit_detail(w)}
                for w in self.engine.workloads(labels.ROLE_RUN)]

    def reap(self) -> None:
        for workload in self.engine.workloads(labels.ROLE_RUN):
            if workload.live:
                continue
            run_id = workload.run_id
            try:
                self._reap_one(workload, run_id)
            except (httpx.HTTPError, LauncherError) as exc:  # relay restarting: next tick
                log.warning("run %s: not reaped yet: %s", run_id, exc)

    def _reap_one(self, container: Workload, run_id: str) -> None:
        if run_id not in self._reported:
            report = {"location": container.location, "exit_code": container.exit_code,
                      "oom_killed": container.oom_killed, "log_tail": self.engine.log_tail(container, 40),
                      "reason": container.error}
            self.relay.exited(run_id, report)
            self._reported.add(run_id)
            log.info("run %s: container exited (%s)", run_id, _exit_detail(container))
        if self.relay.pending(run_id) == 0:
            self.engine.remove(container)
            self._reported.discard(run_id)
            log.info("run %s: everything forwarded; removed %s", run_id, container.name)

    def _find(self, run_id: str) -> Workload | None:
        name = run_container_name(self.engine.appliance_id, run_id)
        return next((w for w in self.engine.workloads(labels.ROLE_RUN) if w.name == name), None)


def _payload(work: SignedWork, *required: str) -> dict[str, Any]:
    try:
        payload = json.loads(work.payload)
    except ValueError:
        raise HandlerError(f"{work.kind.value}: payload is not JSON") from None
    missing = [k for k in required if not isinstance(payload.get(k), str) or not payload.get(k)]
    if missing:
        raise HandlerError(f"{work.kind.value}: payload lacks {', '.join(missing)}")
    return payload


def _exit_detail(workload: Workload) -> str:
    detail = f"exit code {workload.exit_code}"
    if workload.oom_killed:
        detail += ", OOM-killed"
    return detail
