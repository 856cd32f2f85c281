"""Connected mode: desired locations come from the control plane, work arrives over the work channel
(a WebSocket the agent holds open, appliance/agent/channel.py) or, with `open_channel=None`, by long poll.

Three loops, each small: the work loop (receive work, verify, dispatch), the heartbeat (what runs here),
and the reconcile loop (the same Reconciler as standalone mode). Signals only set `stop`.
A result goes back the way its work came: down the channel that brought it, or posted (postResults). If that
channel has closed, a durable item's result is posted instead; a relayed call's is dropped, because the
gateway has already queued that call again.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.agent.channel import WorkChannel
from appliance.agent.dispatcher import Dispatcher, Handler, HandlerError, Starter
from appliance.agent.fastpath import FastPathTunnel, tunnel_address
from appliance.agent.grpc_handler import code_server_addresses
from appliance.agent.reconciler import Reconciler
from appliance.agent.results import ResultBatcher
from appliance.agent.runs import RunManager
from appliance.agent.status import next_pass_in, write_status
from appliance.agent.transport import GatewayClient
from appliance.policy import DesiredSet, Location, Policy, PolicyError, desired_set_from_data
from protocol.backoff import Delays
from protocol.errors import PermanentError
from protocol.files import write_atomic
from protocol.locations import LOCATION_NAME
from protocol.work import SignedWork, WorkKind, failed_result, ok_result

log = logging.getLogger("airlock.agent.connected")
DESIRED_FILE = "desired.json"


class DesiredLocations:
    """The last desired set the control plane sent, checked against local policy location by location, on disk.

    A refused entry affects only its own location: one that was accepted before keeps its last accepted spec
    (its code server goes on as it was), a new one is reported in ERROR with the reason. Only a set whose
    envelope is broken (no version, no list) is refused whole, and then nothing changes.
    """

    def __init__(self, state_dir: str, policy: Policy) -> None:
        self.path, self.policy = Path(state_dir) / DESIRED_FILE, policy
        self._lock = threading.Lock()
        self.locations: tuple[Location, ...] = ()
        self.refused: dict[str, str] = {}
        self.purge: tuple[str, ...] = ()  # removed locations whose artifact volume is to be deleted
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                checked = self._check(data)
                self.locations, self.refused, self.purge = checked.accepted, dict(checked.refused), _purge(data)
            except (PolicyError, ValueError) as exc:
                log.error("ignoring the stored desired locations: %s", exc)

    def _check(self, data: Any) -> DesiredSet:
        """The payload is {deployment, queue, as_of, locations: [...]}; each entry in locations.yaml's shape."""
        entries = data.get("locations") if isinstance(data, dict) else None
        return desired_set_from_data({"version": 1, "locations": entries}, self.policy,
                                     source="control plane RECONCILE_LOCATIONS")

    def update(self, data: Any) -> DesiredSet:
        try:
            checked, purge = self._check(data), _purge(data)
        except PolicyError as exc:
            raise HandlerError(f"refused by this appliance's policy: {exc}") from None
        with self._lock:
            previous = {loc.name: loc for loc in self.locations}
            kept = tuple(previous[name] for name in checked.refused if name in previous)
            write_atomic(self.path, json.dumps(data), mode=0o600)
            self.locations = checked.accepted + kept
            self.refused = dict(checked.refused)
            self.purge = purge
        for name, reason in checked.refused.items():
            log.warning("location %s refused by this appliance's policy%s: %s", name,
                        " (its last accepted spec stays)" if name in previous else "", reason)
        return checked


def _purge(data: Any) -> tuple[str, ...]:
    """The payload's optional `purge`: names of removed locations whose files the operator chose to delete."""
    names = data.get("purge", []) if isinstance(data, dict) else []
    if not isinstance(names, list) or not all(isinstance(n, str) and re.fullmatch(LOCATION_NAME, n) for n in names):
        raise PolicyError("control plane RECONCILE_LOCATIONS: purge must be a list of location names")
    return tuple(names)


def reconcile_locations_handler(desired: DesiredLocations, wake: threading.Event) -> Handler:
    def handle(work: SignedWork) -> dict[str, Any]:
        checked = desired.update(json.loads(work.payload))
        wake.set()
        return {"accepted": [loc.name for loc in checked.accepted], "refused": dict(checked.refused)}

    return handle


class ConnectedAgent:
    def __init__(self, client: GatewayClient, reconciler: Reconciler, desired: DesiredLocations, *,
                 queues: list[str], state_dir: str, handlers: dict[WorkKind, Handler] | None = None,
                 reconcile_interval: float = 5.0, heartbeat_interval: float = 10.0,
                 max_concurrency: int = 8, runs: RunManager | None = None,
                 open_channel: Callable[[], WorkChannel] | None = None,
                 starters: dict[WorkKind, Starter] | None = None, max_started: int = 64,
                 fastpath: FastPathTunnel | None = None, control_plane_url: str = "") -> None:
        self.client, self.reconciler, self.desired, self.runs = client, reconciler, desired, runs
        self.open_channel = open_channel
        # The relay's compiled data path beside the channel (appliance/agent/fastpath.py); None: channel only.
        self.fastpath, self.control_plane_url = fastpath, control_plane_url
        # Channel work a Starter can run without a worker thread (unary relayed calls), at most max_started at once.
        self.starters, self._started = dict(starters or {}), threading.BoundedSemaphore(max_started)
        self.queues, self.state_dir = queues, state_dir
        self.reconcile_interval, self.heartbeat_interval = reconcile_interval, heartbeat_interval
        self.wake = threading.Event()  # set when the desired set changes: reconcile now, not at the next tick
        # Set when a location's state changes: the control plane (deploy, location list, the UI's reload) hears
        # of LOADED or ERROR at once, not at the next heartbeat tick.
        self.beat_now = threading.Event()
        self._reported: tuple[tuple[str, str, str | None, str | None], ...] = ()
        self.results = ResultBatcher(client.post_results)
        registry = {WorkKind.RECONCILE_LOCATIONS: reconcile_locations_handler(desired, self.wake), **(handlers or {})}
        if runs is not None:
            registry |= {WorkKind.LAUNCH_RUN: runs.launch, WorkKind.TERMINATE_RUN: runs.terminate}
        self.dispatcher = Dispatcher(registry, self.results.add, max_workers=max_concurrency)

    def run(self, stop: threading.Event) -> None:
        # One pass first: after a restart the running code servers are adopted (and known) before any
        # relayed call is taken, so no call is answered "no code server" while one is in fact up.
        self._reconcile_once()
        threads = [threading.Thread(target=self._poll_loop, args=(stop,), name="airlock-poll", daemon=True),
                   threading.Thread(target=self._heartbeat_loop, args=(stop,), name="airlock-heartbeat",
                                    daemon=True)]
        for thread in threads:
            thread.start()
        while not stop.is_set():
            self.wake.wait(next_pass_in(self.reconciler.statuses, self.reconcile_interval))
            self.wake.clear()
            self._reconcile_once()
        self.beat_now.set()  # the heartbeat loop sees stop now
        self.dispatcher.shutdown()
        self.results.close()
        if self.fastpath is not None:
            self.fastpath.close()

    def _reconcile_once(self) -> None:
        try:
            write_status(self.state_dir, self.reconciler.reconcile(self.desired.locations,
                                                                   refused=self.desired.refused,
                                                                   purge=self.desired.purge))
        except Exception as exc:  # a failed pass is retried on the next tick
            log.warning("reconcile pass failed, will retry: %s", exc)
        states = tuple(sorted((s.name, s.state.value, s.container_id, s.error)
                              for s in self.reconciler.statuses.values()))
        if states != self._reported:
            self._reported = states
            self.beat_now.set()
        if self.fastpath is not None:
            self.fastpath.servers(code_server_addresses(self.reconciler.statuses))
            self.fastpath.revive()
        if self.runs is not None:
            try:
                self.runs.reap()
            except Exception as exc:
                log.warning("run reaper pass failed, will retry: %s", exc)

    def _poll_loop(self, stop: threading.Event) -> None:
        def take_work() -> None:
            if self.open_channel is None:
                for work in self.client.claim_work(self.queues):
                    self.dispatcher.submit(work)
            else:
                self._serve_channel(self.open_channel(), stop)

        self._retrying(stop, take_work)

    def _serve_channel(self, channel: WorkChannel, stop: threading.Event) -> None:
        """Dispatch the channel's work until stop; a closed channel raises, and the retry loop reopens it."""
        if self.fastpath is not None and channel.fastpath is not None:
            port, key = channel.fastpath
            self.fastpath.connect(channel.id, key, tunnel_address(self.control_plane_url, port))
        try:
            while not stop.is_set():
                for work in channel.receive(timeout=1.0):
                    reply = self._reply(channel, work)
                    if not self._start(work, reply):
                        self.dispatcher.submit(work, reply)
        finally:
            if self.fastpath is not None:
                self.fastpath.disconnect(channel.id)
            channel.close()

    def _start(self, work: SignedWork, reply: Callable[[dict[str, Any]], None]) -> bool:
        """Run `work` through its Starter if it has one and there is room; False: use the dispatcher."""
        starter = self.starters.get(work.kind)
        if starter is None or not self._started.acquire(blocking=False):
            return False

        def on_value(value: dict[str, Any]) -> None:
            self._started.release()
            reply(ok_result(work.id, value))

        try:
            if starter(work, on_value):
                return True
        except Exception as exc:  # like a handler bug: answer, do not leave the caller waiting
            log.exception("work %s (%s) failed to start", work.id, work.kind.value)
            reply(failed_result(work.id, f"{type(exc).__name__}: {exc}"))
            self._started.release()
            return True
        self._started.release()
        return False

    def _reply(self, channel: WorkChannel, work: SignedWork) -> Callable[[dict[str, Any]], None]:
        def reply(result: dict[str, Any]) -> None:
            try:
                if channel.send_results([result]):
                    return
            except ValueError as exc:  # larger than a frame may be: the caller still gets an answer
                if channel.send_results([failed_result(result["id"], str(exc))]):
                    return
            if work.signed_by.startswith("channel:"):
                log.info("dropping the answer to relayed call %s: its channel closed and the gateway re-queued it",
                         work.id)
            else:
                self.results.add(result)

        return reply

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        def beat() -> None:
            states = [{"name": s.name, "state": s.state.value, "error": (s.error or "")[-2000:] or None,
                       "container": s.container_id} for s in list(self.reconciler.statuses.values())]
            runs = self.runs.runs() if self.runs is not None else []
            self.client.heartbeat(states, running_containers=len(states) + len(runs), runs=runs)
            self.beat_now.wait(self.heartbeat_interval)
            self.beat_now.clear()

        self._retrying(stop, beat)

    @staticmethod
    def _retrying(stop: threading.Event, step: Callable[[], object]) -> None:
        """Run step until stop; a failure that may pass is retried with backoff (capped at 30 s); a permanent
        one (the gateway refusing this appliance's key: revoked, or never enrolled here) stops the agent with
        the reason, for the operator to act on, instead of being retried forever."""
        delays = Delays(base=0.5, cap=30.0)
        while not stop.is_set():
            try:
                step()
                delays.reset()
            except PermanentError as exc:
                log.error("%s refused for good, stopping the agent: %s", getattr(step, "__name__", "call"), exc)
                stop.set()
                return
            except Exception as exc:  # network trouble, a gateway restarting, bad answers: all retried
                wait = delays.next()
                log.warning("%s failed (%s: %s); retrying in %.1f s", getattr(step, "__name__", "call"),
                            type(exc).__name__, exc, wait)
                stop.wait(wait)
