"""The agent's loop: load policy and locations, reconcile every few seconds, stop cleanly on a signal.

Signals only set a flag (uvicorn's pattern); the current pass finishes, then the loop exits. Code
servers keep running when the agent stops: the next agent adopts them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import docker.errors

from appliance import labels
from appliance.agent.reconciler import Reconciler
from appliance.agent.status import next_pass_in, write_status
from appliance.launcher.engine import Engine
from appliance.logs import configure
from appliance.policy import Location, Policy, PolicyError, load_locations, load_policy
from appliance.policy.operator import LiveImages, operator_file
from appliance.settings import Settings

log = logging.getLogger("airlock.agent")


class LocationsFile:
    """locations.yaml, re-read when it changes; a bad edit keeps the last good set and says why."""

    def __init__(self, path: str, policy: Policy) -> None:
        self.path, self.policy = Path(path), policy
        self._stamp: tuple[float, int] | None = None
        self.locations: tuple[Location, ...] = ()

    def load(self) -> tuple[Location, ...]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            if self._stamp is not None or not self.locations:
                self._stamp, self.locations = None, ()
            return self.locations
        stamp = (stat.st_mtime, stat.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.locations = load_locations(self.path, self.policy)
                log.info("locations: %s", ", ".join(loc.name for loc in self.locations) or "none")
            except PolicyError as exc:
                log.error("keeping the previous locations; %s", exc)
        return self.locations


def wait_for_docker(engine: Engine, stop: threading.Event, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            engine.client.ping()
            return
        except (docker.errors.DockerException, OSError) as exc:
            if time.monotonic() > deadline or stop.is_set():
                raise SystemExit(f"airlock agent: Docker (through sockguard) is not answering: {exc}") from None
            stop.wait(1.0)


def own_container_id(engine: Engine, hint: str) -> str:
    """The appliance's full container id; it must carry airlock.role=appliance for sockguard to let it join."""
    try:
        container = engine.client.containers.get(hint)
    except docker.errors.DockerException as exc:
        raise SystemExit(
            f"airlock agent: cannot find its own container {hint!r} ({exc}); start the appliance with "
            f"--label {labels.ROLE}={labels.ROLE_APPLIANCE} and keep Docker's default hostname"
        ) from None
    if not labels.is_appliance(container.labels):
        raise SystemExit(f"airlock agent: container {hint} lacks the label {labels.ROLE}={labels.ROLE_APPLIANCE}")
    return str(container.id)


def main() -> None:
    configure("agent")
    settings = Settings.from_env()
    try:
        policy = load_policy(settings.policy_dir)
        locations = LocationsFile(settings.locations_file, policy)
        if Path(settings.locations_file).exists():
            load_locations(settings.locations_file, policy)  # refuse to start on a bad file
    except PolicyError as exc:
        print(f"airlock agent: refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("signal %s: finishing this pass, then stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    engine = Engine.connect(settings.docker_host, settings.appliance_id)
    wait_for_docker(engine, stop)
    reconciler = Reconciler(
        engine=engine,
        policy=policy,
        appliance_container=own_container_id(engine, settings.container_id),
        egress_routes=settings.egress_routes,
        egress_port=policy.egress.port,
        images=LiveImages(policy.images, operator_file()),
    )
    if settings.control_plane_url:
        run_connected(settings, policy, reconciler, stop)
    else:
        run_standalone(settings, locations, reconciler, stop)
    log.info("agent stopped; code servers keep running and will be adopted")


def run_standalone(settings: Settings, locations: LocationsFile, reconciler: Reconciler,
                   stop: threading.Event) -> None:
    log.info("agent %s (standalone: %s) running as uid %d, reconciling every %.0f s", settings.appliance_id,
             settings.locations_file, os.getuid(), settings.reconcile_interval)
    while not stop.is_set():
        try:
            write_status(settings.state_dir, reconciler.reconcile(locations.load()))
        except (docker.errors.DockerException, OSError) as exc:
            log.warning("reconcile pass failed, will retry: %s", exc)
        stop.wait(next_pass_in(reconciler.statuses, settings.reconcile_interval))


def run_connected(settings: Settings, policy: Policy, reconciler: Reconciler, stop: threading.Event) -> None:
    """Desired locations and work from the control plane, over the work channel or signed long polls."""
    from appliance.agent.channel import WorkChannel
    from appliance.agent.connected import ConnectedAgent, DesiredLocations
    from appliance.agent.fastpath import FastPathTunnel
    from appliance.agent.grpc_handler import grpc_call_handler, grpc_call_starter
    from appliance.agent.grpc_replay import GrpcReplayer
    from appliance.agent.identity import KeyFile, ensure_enrolled
    from appliance.agent.runs import RelayControl, RunManager
    from appliance.agent.status import LocationStatus
    from appliance.agent.transport import GatewayClient, https_client, tls_context
    from appliance.metadata.tokens import RunTokens
    from protocol.fastpath import find_binary
    from protocol.work import WorkKind

    client = GatewayClient(https_client(settings.control_plane_url, settings.ca_file), KeyFile(settings.state_dir))
    enrollment = ensure_enrolled(client, settings.state_dir, token=settings.enroll_token, queues=list(settings.queues),
                                 fingerprint=settings.control_plane_fingerprint)
    log.info("agent %s connected to %s as %s (queues %s)", settings.appliance_id, settings.control_plane_url,
             enrollment.agent_id, ",".join(settings.queues))
    desired = DesiredLocations(settings.state_dir, policy)
    tokens = RunTokens.load_or_create(settings.state_dir)
    reconciler.location_token = tokens.mint_location  # code servers read through the relay (sensors, schedules)
    runs = RunManager(reconciler.engine, policy, tokens,
                      RelayControl(settings.metadata_control_socket), lambda: desired.locations, settings.egress_port)
    open_channel = None
    if settings.work_channel == "channel":
        tls = tls_context(settings.ca_file)

        def open_channel() -> WorkChannel:
            return WorkChannel.open(client, settings.control_plane_url, list(settings.queues), ssl_context=tls)

    replayer = GrpcReplayer()

    def statuses() -> dict[str, LocationStatus]:
        return dict(reconciler.statuses)

    log.info("work arrives by %s", "the work channel (WebSocket)" if open_channel else "long poll")
    binary = find_binary(settings.fastpath) if open_channel else None
    fastpath = FastPathTunnel(binary) if binary else None
    log.info("relay fast path: %s", f"{binary} (when the gateway offers it)" if fastpath else
             "off" if settings.fastpath == "off" or not open_channel else "not installed")
    agent = ConnectedAgent(
        client, reconciler, desired, queues=list(settings.queues),
        state_dir=settings.state_dir, reconcile_interval=settings.reconcile_interval,
        handlers={WorkKind.GRPC_CALL: grpc_call_handler(replayer, statuses)},
        starters={WorkKind.GRPC_CALL: grpc_call_starter(replayer, statuses)},
        runs=runs, open_channel=open_channel, fastpath=fastpath, control_plane_url=settings.control_plane_url,
    )
    agent.run(stop)


if __name__ == "__main__":
    main()
