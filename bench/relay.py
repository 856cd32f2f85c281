#!/usr/bin/env python3
"""Relay latency and throughput: enqueue -> agent, relayed vs direct Dagster Ping, 8 concurrent callers.

    python bench/relay.py                  # everything, about a minute on 2 cores
    python bench/relay.py --calls 200      # fewer sequential calls per path
    python bench/relay.py --poll           # the agent long-polls instead of holding its work channel
    python bench/relay.py --fastpath off   # every relayed call through the Python relay and the work channel

Everything runs on this machine: a real Dagster code server (the example-location image, hardened as the
appliance starts it, on an internal Docker network made for this run), the agent API gateway (uvicorn, TLS,
SQLite file) with the gRPC relay on the same event loop in this process (as controlplane/serve_gateway.py runs
them), the real ConnectedAgent in a second process holding its work channel (a WebSocket), and the callers in
a third (so the callers, the control plane and the agent do not share a GIL, as they do not in production).
Timestamps are time.perf_counter, i.e. CLOCK_MONOTONIC, comparable across processes on one host.

With airlock-fastpath installed or built (`make fastpath`), the relay's compiled data path runs as shipped: the
edge as a child of this process in front of the relay port, the tunnel end as a child of the agent process
(docs/FASTPATH.md); Ping then goes caller -> edge -> tunnel -> agent's child -> code server. `--fastpath off`
measures the Python path alone. Each process's CPU includes its fast-path child.

Figures (targets from the issue; the bench prints met / NOT met and asserts nothing):
  1. enqueue -> agent receives: WorkQueue.enqueue of a durable item until the agent has it, verified, the
     channel's pump (or, with --poll, the agent's long poll) already parked.            target p50 <= 5 ms
  2. Ping latency, sequential, one persistent channel per path: direct to the code server vs through
     relay -> work channel -> agent -> code server.                       target relayed p50 <= direct p50 + 1 ms
  3. Ping throughput with 8 concurrent callers (one channel each), relayed / direct.         target >= 0.70
Also printed (no target): where a relayed call's time goes, leg by leg; the gateway's database calls per
relayed call; the CPU each process spends per call; Ping with a new channel per call (what Dagster's
DagsterGrpcClient does); one signed GraphQL request vs a bare HTTPS GET; a few fixed per-request costs.
The legs come from wrappers the bench puts around live objects (an ASGI wrapper outside the gateway app, timed
methods on its WorkQueue and AgentStore instances, subclasses of GatewayClient, WorkChannel, WorkQueueCalls and
ChannelCalls); no project code is changed. The database is opened as the control plane opens it
(controlplane/db.py: SQLite, WAL).

Cleanup: the code server container and the network (labelled airlock.test-run=<run id>) are removed in a
finally block, also on Ctrl-C or SIGTERM; the child processes are stopped; the temp directory is deleted.
"""

# ruff: noqa: E402  (the repository root goes on sys.path before the project's imports)
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc

from protocol.dagster_grpc import DEFAULT_PORT, PING, decode_echo, encode_echo
from protocol.fastpath import find_binary

DEPLOYMENT, QUEUE, LOCATION = "bench", "default", "example"
ECHO = "airlock-bench"
LABEL = "airlock.test-run"
CALL_TIMEOUT = 10.0  # seconds; a Ping that takes this long is a failure, not a sample
now = time.perf_counter


# --------------------------------------------------------------------------------------------- figures
def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f} ms"


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of another process (a fast-path child), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ------------------------------------------------------------------------------------ caller process
def _ping_call(channel: grpc.Channel) -> Callable[[], None]:
    call = channel.unary_unary(PING)  # raw bytes in and out, as Dagster's webserver would send them
    request = encode_echo(ECHO)

    def once() -> None:
        if decode_echo(call(request, timeout=CALL_TIMEOUT)) != ECHO:
            raise RuntimeError("Ping echo mismatch")

    return once


def _sequential(address: str, calls: int, warmup: int) -> list[tuple[float, float]]:
    with grpc.insecure_channel(address) as channel:
        once = _ping_call(channel)
        for _ in range(warmup):
            once()
        samples = []
        for _ in range(calls):
            started = now()
            once()
            samples.append((started, now()))
    return samples


def _fresh(address: str, calls: int, warmup: int) -> list[float]:
    from appliance.agent.health import ping  # a new channel per call, as Dagster's DagsterGrpcClient does

    out = []
    for i in range(warmup + calls):
        started = now()
        result = ping(address, timeout=CALL_TIMEOUT, echo=ECHO)
        elapsed = now() - started
        if not result.ok:
            raise RuntimeError(f"Ping to {address} failed: {result.detail}")
        if i >= warmup:
            out.append(elapsed)
    return out


def _throughput(address: str, callers: int, warmup_s: float, duration_s: float) -> dict[str, Any]:
    """`callers` threads, each with its own channel, call back to back; count what completes in the window."""
    start = now() + 0.2  # every thread is connected before the warm-up clock starts
    measure_from, measure_to = start + warmup_s, start + warmup_s + duration_s
    latencies: list[list[float]] = [[] for _ in range(callers)]
    last_end = [measure_from] * callers
    total = [0] * callers  # every call, warm-up included: what the CPU figures are divided by
    errors: list[BaseException] = []
    cpu = time.process_time()

    def worker(i: int) -> None:
        try:
            with grpc.insecure_channel(address) as channel:
                once = _ping_call(channel)
                once()
                while now() < start:
                    time.sleep(0.001)
                while (t0 := now()) < measure_to:
                    once()
                    t1 = now()
                    total[i] += 1
                    if t0 >= measure_from:
                        latencies[i].append(t1 - t0)
                        last_end[i] = t1
        except BaseException as exc:  # reported to the parent, which fails the bench
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} caller(s) failed: {errors[0]!r}")
    flat = [x for lat in latencies for x in lat]
    elapsed = max(last_end) - measure_from
    return {"calls": len(flat), "elapsed": elapsed, "rate": len(flat) / elapsed, "latencies": flat,
            "all_calls": sum(total), "cpu": time.process_time() - cpu}


def caller_main(conn: Connection) -> None:
    """The callers' process (in production: dagster-webserver and dagster-daemon). Runs commands from the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C and stops us
    jobs: dict[str, Callable[..., Any]] = {"seq": _sequential, "fresh": _fresh, "tput": _throughput}
    while True:
        command, args = conn.recv()
        if command == "stop":
            return
        try:
            conn.send(("ok", jobs[command](*args)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


# ------------------------------------------------------------------------------------- agent process
def agent_main(conn: Connection, base_url: str, ca_file: str, state_dir: str, token: str, code_server: str,
               mode: str, fastpath_binary: str | None) -> None:
    """The real ConnectedAgent with a stand-in reconciler that reports the bench's code server as LOADED.
    `mode` is how work arrives: "channel" (as shipped) or "poll" (signed long polls)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from appliance.agent.channel import WorkChannel
    from appliance.agent.connected import ConnectedAgent, DesiredLocations
    from appliance.agent.fastpath import FastPathTunnel
    from appliance.agent.grpc_handler import grpc_call_handler, grpc_call_starter
    from appliance.agent.grpc_replay import GrpcReplayer
    from appliance.agent.identity import ensure_enrolled, load_or_create_key
    from appliance.agent.status import ApplianceStatus, LocationStatus, State
    from appliance.agent.transport import GatewayClient, https_client, tls_context
    from appliance.policy import load_policy
    from protocol.work import SignedWork, WorkKind

    events: list[tuple[Any, ...]] = []  # list.append is atomic; the parent drains it between phases

    class TimedClient(GatewayClient):
        def claim_work(self, queues: list[str], **kwargs: Any) -> list[SignedWork]:
            items = super().claim_work(queues, **kwargs)
            received = now()
            events.extend(("claimed", w.id, received) for w in items)
            return items

        def post_results(self, results: list[dict[str, Any]]) -> int:
            started = now()
            accepted = super().post_results(results)
            done = now()
            events.extend(("posted", r["id"], started, done, len(results)) for r in results)
            return accepted

    class TimedChannel(WorkChannel):
        def receive(self, timeout: float) -> list[SignedWork]:
            items = super().receive(timeout)
            received = now()
            events.extend(("claimed", w.id, received) for w in items)
            return items

        def send_results(self, results: list[dict[str, Any]]) -> bool:
            started = now()
            sent = super().send_results(results)
            done = now()
            events.extend(("posted", r["id"], started, done, len(results)) for r in results)
            return sent

    class StandInReconciler:
        """What the real Reconciler would report once the location's code server is up."""

        def __init__(self) -> None:
            self.statuses = {LOCATION: LocationStatus(LOCATION, State.LOADED, container=code_server)}

        def reconcile(self, _locations: object, **_: object) -> ApplianceStatus:
            return ApplianceStatus("bench", time.time(), dict(self.statuses))

    http = https_client(base_url, ca_file)  # as appliance/agent/run.py builds it
    client = TimedClient(http, load_or_create_key(state_dir))
    ensure_enrolled(client, state_dir, token=token, queues=[QUEUE])
    reconciler = StandInReconciler()
    replayer = GrpcReplayer()  # as appliance/agent/run.py wires it: a Starter for unary calls, a Handler else

    def statuses() -> dict[str, Any]:
        return dict(reconciler.statuses)

    replay, start = grpc_call_handler(replayer, statuses), grpc_call_starter(replayer, statuses)

    def timed_replay(work: SignedWork) -> dict[str, Any]:
        started = now()
        result = replay(work)
        events.append(("replayed", work.id, started, now()))
        return result

    def timed_start(work: SignedWork, on_value: Callable[[dict[str, Any]], None]) -> bool:
        started = now()

        def answered(value: dict[str, Any]) -> None:
            events.append(("replayed", work.id, started, now()))
            on_value(value)

        return start(work, answered)

    tls = tls_context(ca_file)

    def open_channel() -> WorkChannel:  # as appliance/agent/run.py opens it
        return TimedChannel.open(client, base_url, [QUEUE], ssl_context=tls)

    tunnel = FastPathTunnel(fastpath_binary) if fastpath_binary and mode == "channel" else None
    agent = ConnectedAgent(client, reconciler, DesiredLocations(state_dir, load_policy(ROOT / "policy")),  # type: ignore[arg-type]
                           queues=[QUEUE], state_dir=state_dir, handlers={WorkKind.GRPC_CALL: timed_replay},
                           starters={WorkKind.GRPC_CALL: timed_start},
                           open_channel=open_channel if mode == "channel" else None,
                           fastpath=tunnel, control_plane_url=base_url)
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,), name="bench-agent", daemon=True)
    runner.start()
    conn.send("ready")
    while True:
        command = conn.recv()
        if command == "events":
            batch = events[:]
            del events[: len(batch)]
            conn.send(batch)
        elif command == "cpu":  # this process and its fast-path child
            pid = tunnel.pid if tunnel is not None else None
            conn.send(time.process_time() + (process_cpu(pid) if pid is not None else 0.0))
        elif command == "tunnel":
            conn.send(tunnel is not None and tunnel.up.is_set())
        elif command == "rtt":
            conn.send(round_trips(client, http))
        elif command == "replay":  # the replay alone, from this process's main thread: no channel, no dispatcher
            conn.send(replays(code_server))
        elif command == "stop":
            stop.set()
            agent.wake.set()  # out of the reconcile wait at once
            runner.join(10)
            http.close()
            return


def replays(code_server: str, calls: int = 300) -> list[float]:
    from appliance.agent.grpc_replay import GrpcReplayer
    from protocol.grpc_calls import GrpcCall

    replayer = GrpcReplayer()
    payload = GrpcCall(LOCATION, PING, encode_echo(ECHO), CALL_TIMEOUT).to_payload()
    address = f"{code_server}:{DEFAULT_PORT}"
    samples = []
    for i in range(calls + 30):
        started = now()
        replayer.replay(payload, address)
        if i >= 30:
            samples.append(now() - started)
    replayer.close()
    return samples


def round_trips(client: Any, http: Any, calls: int = 200) -> dict[str, list[float]]:
    """The agent's cost of one request to the gateway, with nothing else queued: signed GraphQL vs bare HTTPS."""

    def healthz() -> None:
        http.get("/healthz").raise_for_status()

    out = {}
    for name, request in (("signed GraphQL query (whoami: sign, verify, 2 key reads, GraphQL)", client.whoami),
                          ("bare HTTPS GET /healthz (same connection pool)", healthz)):
        for _ in range(20):
            request()
        samples = []
        for _ in range(calls):
            started = now()
            request()
            samples.append(now() - started)
        out[name] = samples
    return out


class Child:
    """A spawned helper process driven over a pipe."""

    def __init__(self, ctx: Any, target: Callable[..., None], *args: Any, name: str) -> None:
        self.conn, child_end = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(child_end, *args), name=name, daemon=True)
        self.process.start()
        child_end.close()

    def ask(self, command: Any, timeout: float = 120.0) -> Any:
        self.conn.send(command)
        if not self.conn.poll(timeout):
            raise RuntimeError(f"{self.process.name} did not answer {command!r} within {timeout:.0f} s")
        return self.conn.recv()

    def run(self, job: str, *args: Any) -> Any:
        status, value = self.ask((job, args))
        if status != "ok":
            raise RuntimeError(f"{self.process.name}: {value}")
        return value

    def stop(self, command: Any, wait: float = 12.0) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(command)
            self.process.join(wait)
        if self.process.is_alive():  # our own child, by handle
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


# ------------------------------------------------------------------------------------------ docker
def example_image(explicit: str | None) -> str:
    if explicit:
        return explicit
    built = subprocess.run([sys.executable, str(ROOT / "images/build.py"), "example-location"], cwd=ROOT,
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise SystemExit(f"images/build.py example-location failed:\n{built.stdout[-2000:]}{built.stderr[-2000:]}")
    return json.loads((ROOT / ".cache/images.json").read_text())["example-location"]


class CodeServer:
    """A real `dagster api grpc` for the example location, hardened as the appliance runs code servers."""

    def __init__(self, image: str, run_id: str) -> None:
        import docker

        from appliance.launcher.spec import hardened_kwargs
        from appliance.policy import load_policy

        self.client = docker.from_env(timeout=120)
        self.run_id, self.image = run_id, image
        self.network: Any = None
        self.container: Any = None
        policy = load_policy(ROOT / "policy")
        self._hardening = hardened_kwargs(policy, policy.hardening.limits, policy.hardening.runtime)
        self.address = ""

    def start(self, timeout: float = 90.0) -> str:
        from appliance.agent.health import ping

        labels = {LABEL: self.run_id}
        name = f"airlock-bench-{self.run_id}"
        # internal: no route out of the network; the host still reaches the container on its bridge address
        self.network = self.client.networks.create(name, driver="bridge", internal=True, labels=labels)
        self.container = self.client.containers.run(
            self.image, ["dagster", "api", "grpc", "--host", "0.0.0.0", "--port", str(DEFAULT_PORT),
                         "--module-name", "example_location.definitions"],
            name=f"{name}-code-server", detach=True, network=name, labels=labels,
            environment={"DAGSTER_HOME": "/tmp/dagster_home", "HOME": "/home/dagster"}, **self._hardening)
        self.container.reload()
        ip = self.container.attrs["NetworkSettings"]["Networks"][name]["IPAddress"]
        self.address = f"{ip}:{DEFAULT_PORT}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ping(self.address, timeout=1.0).ok:
                return ip
            self.container.reload()
            if self.container.status not in ("created", "running"):
                break
            time.sleep(0.3)
        logs = self.container.logs().decode(errors="replace")[-3000:]
        raise RuntimeError(f"the code server did not answer Ping at {self.address}; logs:\n{logs}")

    def cpu_seconds(self) -> float:
        """CPU time the code server container has used so far (cgroup accounting)."""
        stats = self.container.stats(stream=False, one_shot=True)
        return stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9

    def remove(self) -> None:
        import docker.errors

        if self.container is not None:
            with contextlib.suppress(docker.errors.NotFound):
                self.container.remove(force=True)
        if self.network is not None:
            with contextlib.suppress(docker.errors.NotFound):
                self.network.remove()
        # anything else this run labelled (e.g. left by an interrupted start)
        for c in self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.run_id}"}):
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True)
        for n in self.client.networks.list(filters={"label": f"{LABEL}={self.run_id}"}):
            with contextlib.suppress(docker.errors.NotFound):
                n.remove()


# ------------------------------------------------------------------------------------- control plane
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Probe:
    """Timings of the gateway's database calls, by wrapping methods on the live instances (nothing is edited)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float]] = []
        self.on = False

    def wrap(self, obj: object, method: str, label: str) -> None:
        inner = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = now()
            try:
                return inner(*args, **kwargs)
            finally:
                if self.on:
                    self.records.append((label, now() - started))

        setattr(obj, method, timed)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[str, float]]]:
        self.records.clear()
        self.on = True
        try:
            yield self.records
        finally:
            self.on = False


class GatewayTimes:
    """ASGI wrapper outside the gateway app: when each request reaches it and when its answer is sent.

    Records ("gw", operation, start, end), and per work item ("gw_claim_sent", id, t) for a claimWork answer
    and ("gw_post", id, start, end) for the postResults request that carried its result.
    """

    def __init__(self, app: Any, events: list[tuple[Any, ...]]) -> None:
        self.app, self.events = app, events

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/graphql":
            await self.app(scope, receive, send)
            return
        started = now()
        request: list[bytes] = []
        response: list[bytes] = []

        async def timed_receive() -> Any:
            message = await receive()
            request.append(message.get("body", b""))
            return message

        async def timed_send(message: Any) -> None:
            response.append(message.get("body", b""))
            await send(message)

        await self.app(scope, timed_receive, timed_send)
        ended = now()
        try:
            body = json.loads(b"".join(request))
            operation = body["query"].split("(")[0].split("{")[0].split()[-1]
        except (ValueError, KeyError, IndexError, AttributeError):
            return
        self.events.append(("gw", operation, started, ended))
        if operation == "PostResults":
            self.events.extend(("gw_post", r.get("id"), started, ended) for r in body["variables"]["results"])
        elif operation == "ClaimWork":
            with contextlib.suppress(ValueError, KeyError, TypeError):
                items = json.loads(b"".join(response))["data"]["claimWork"]
                self.events.extend(("gw_claim_sent", item["id"], ended) for item in items)


class ControlPlane:
    """The gateway (uvicorn + TLS, SQLite file) and the relay on one event loop thread, as serve_gateway runs them:
    relayed calls go straight down an agent's work channel when one is open (controlplane/relay/calls.py)."""

    def __init__(self, workdir: Path, loop: str = "auto", fastpath_binary: str | None = None) -> None:
        import uvicorn

        from controlplane.gateway.app import build_app
        from controlplane.gateway.queue import WorkQueue
        from controlplane.relay.calls import ChannelCalls
        from controlplane.relay.fastpath import FastPathEdge
        from controlplane.relay.server import RelayServer, WorkQueueCalls
        from controlplane.tls import ensure_tls
        from protocol.channel import MAX_FRAME_BYTES
        from protocol.signing import SigningKey

        self.db_url = f"sqlite:///{workdir / 'controlplane.db'}"
        self.engine = self.make_engine()
        self.app = build_app(self.engine, SigningKey.generate())
        self.queue: WorkQueue = self.app.state.queue
        self.tls = ensure_tls(workdir / "tls", ["127.0.0.1"])
        self.port = free_port()
        self.base_url = f"https://127.0.0.1:{self.port}"
        self.events: list[tuple[Any, ...]] = []
        # as controlplane/serve_gateway.py configures it
        config = uvicorn.Config(GatewayTimes(self.app, self.events), host="127.0.0.1", port=self.port,
                                ssl_certfile=str(self.tls.cert), ssl_keyfile=str(self.tls.key),
                                log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2,
                                ws_max_size=MAX_FRAME_BYTES, ws_per_message_deflate=False, loop=loop)
        self.server = uvicorn.Server(config)
        self.probe = Probe()
        for method in ("enqueue", "claim", "complete", "result", "_has_work"):
            self.probe.wrap(self.queue, method, f"queue.{method}")
        for method in ("audit", "by_key", "record_heartbeat", "live_agents"):
            self.probe.wrap(self.app.state.store, method, f"store.{method}")

        events = self.events

        class TimedQueueCalls(WorkQueueCalls):
            def submit(self, location: str, payload: dict[str, Any], *, ttl_seconds: float) -> str:
                started = now()
                call_id = super().submit(location, payload, ttl_seconds=ttl_seconds)
                events.append(("enqueued", call_id, started, now()))
                return call_id

            async def wait(self, call_id: str, timeout: float) -> Any:
                result = await super().wait(call_id, timeout)
                events.append(("answered", call_id, now()))
                return result

        class TimedChannelCalls(ChannelCalls):
            async def call(self, location: str, payload: dict[str, Any], wait: float) -> Any:
                handed = now()
                channel = self.hub.pick(self.deployment, self.queue)
                result = await super().call(location, payload, wait)
                if channel is not None:
                    events.append(("handed", handed, now()))
                return result

        def route(_location: str) -> tuple[str, str]:
            return DEPLOYMENT, QUEUE

        calls = TimedChannelCalls(self.app.state.hub, TimedQueueCalls(self.queue, route), DEPLOYMENT, QUEUE)
        self.relay = RelayServer(LOCATION, calls)
        self.loop = (config.get_loop_factory() or asyncio.new_event_loop)()  # as serve_gateway picks it
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-control-plane", daemon=True)
        self.served: Any = None
        self.relay_port = 0
        # as serve_gateway runs it: the edge owns the relay port, the Python relay listens behind it
        self.edge = FastPathEdge(fastpath_binary, "127.0.0.1:0") if fastpath_binary else None

    def make_engine(self) -> Any:
        """Exactly as the control plane opens its database (controlplane/db.py: SQLite in WAL mode)."""
        from controlplane.db import create_engine

        return create_engine(self.db_url)

    def sqlite_mode(self) -> str:
        with self.engine.connect() as conn:
            journal = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            level = conn.exec_driver_sql("PRAGMA synchronous").scalar()
        sync = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(level, level)
        return f"journal_mode={journal} synchronous={sync}"

    def start(self) -> None:
        self.thread.start()
        self.served = asyncio.run_coroutine_threadsafe(self.server.serve(), self.loop)
        deadline = time.monotonic() + 20
        while not self.server.started:
            if self.served.done() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)
        self.relay_port = self.on_loop(self.relay.start())
        if self.edge is not None:
            self.on_loop(self.edge.start())
            self.app.state.hub.fastpath = self.edge
            self.relay_port = self.on_loop(self.edge.listen(LOCATION, f"127.0.0.1:{free_port()}",
                                                            f"127.0.0.1:{self.relay_port}", DEPLOYMENT, QUEUE))

    def cpu_seconds(self) -> float:
        """This process and the edge."""
        pid = self.edge.pid if self.edge is not None else None
        return time.process_time() + (process_cpu(pid) if pid is not None else 0.0)

    def on_loop(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def channels(self) -> int:
        return len(self.app.state.hub)

    def agent_waiting(self) -> bool:
        # Read-only look at the queue's wake-up registry: is a long poll, or a channel's pump, parked on our queue?
        return ("work", DEPLOYMENT, QUEUE) in self.queue._waiters

    def stop(self) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                self.on_loop(self.relay.stop(0.5), timeout=5)
            if self.edge is not None:
                with contextlib.suppress(Exception):
                    self.on_loop(self.edge.stop(), timeout=10)
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                self.served.result(10)
            if not self.served.done():
                self.server.force_exit = True
                with contextlib.suppress(Exception):
                    self.served.result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        self.engine.dispose()


# ------------------------------------------------------------------------------------------- phases
def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.0002)


def enqueue_to_claim(cp: ControlPlane, agent: Child, calls: int, warmup: int) -> list[float]:
    """Figure 1: enqueue a GRPC_CALL Ping while the agent is parked in claimWork; time until claim_work returns."""
    from protocol.grpc_calls import GrpcCall

    payload = GrpcCall(LOCATION, PING, encode_echo(ECHO), CALL_TIMEOUT).to_payload()
    started: dict[str, float] = {}
    for i in range(warmup + calls):
        wait_until(cp.agent_waiting, 30, "the agent's long poll")
        time.sleep(0.003)  # past the poll's first database check: the agent is waiting on its wake-up event
        t0 = now()
        item = cp.queue.enqueue(DEPLOYMENT, QUEUE, "GRPC_CALL", payload, ttl_seconds=60)
        if i >= warmup:
            started[item] = t0
        # let the agent finish (replay, post) so the next sample starts from a quiet system
        outcome = cp.on_loop(cp.queue.wait_for_result(item, CALL_TIMEOUT))
        if outcome is None or outcome.status != "done":
            raise RuntimeError(f"the agent did not answer work item {item}: {outcome}")
    claimed = {e[1]: e[2] for e in agent.ask("events") if e[0] == "claimed"}
    missing = [i for i in started if i not in claimed]
    if missing:
        raise RuntimeError(f"{len(missing)} item(s) never reported as claimed")
    return [claimed[i] - t0 for i, t0 in started.items()]


def relayed_breakdown(samples: list[tuple[float, float]], events: list[tuple[Any, ...]],
                      agent_events: list[tuple[Any, ...]]) -> list[tuple[str, float]]:
    """Median of each leg of a sequential relayed call, matched by work item id (k-th call = k-th enqueue)."""
    enqueued = [e for e in events if e[0] == "enqueued"]
    answered = {e[1]: e[2] for e in events if e[0] == "answered"}
    claim_sent = {e[1]: e[2] for e in events if e[0] == "gw_claim_sent"}
    gateway_post = {e[1]: (e[2], e[3]) for e in events if e[0] == "gw_post"}
    claimed = {e[1]: e[2] for e in agent_events if e[0] == "claimed"}
    replayed = {e[1]: (e[2], e[3]) for e in agent_events if e[0] == "replayed"}
    posted = {e[1]: (e[2], e[3]) for e in agent_events if e[0] == "posted"}
    if len(enqueued) != len(samples):
        raise RuntimeError(f"{len(samples)} relayed calls but {len(enqueued)} enqueues: the breakdown cannot match")
    legs: dict[str, list[float]] = defaultdict(list)
    for (call_start, call_end), (_, item, enq0, enq1) in zip(samples, enqueued, strict=True):
        if not all(item in m for m in (claimed, replayed, posted, answered, claim_sent, gateway_post)):
            continue
        (rep0, rep1), (post0, post1), (gw0, _gw1) = replayed[item], posted[item], gateway_post[item]
        legs["caller -> relay -> enqueue starts (gRPC in, relay handler, thread hop)"].append(enq0 - call_start)
        legs["enqueue: INSERT + COMMIT (SQLite)"].append(enq1 - enq0)
        legs["gateway: long-poll wake, has-work read, claim, sign, audit, answer sent"].append(claim_sent[item] - enq1)
        legs["answer -> agent: TLS, HTTP, JSON, Ed25519 verify"].append(claimed[item] - claim_sent[item])
        legs["agent: hand to a dispatcher thread"].append(rep0 - claimed[item])
        legs["agent: replay Ping on the code server (cached channel)"].append(rep1 - rep0)
        legs["agent: hand to the result batcher, sign, POST sent"].append(post0 - rep1)
        legs["POST -> gateway starts it (in flight; the loop busy with the agent's re-poll)"].append(gw0 - post0)
        legs["gateway: verify, GraphQL, complete() -> relay's waiter wakes, reads"].append(answered[item] - gw0)
        legs["relay -> caller (gRPC reply)"].append(call_end - answered[item])
        legs["(the agent's whole POST round trip, overlaps the two legs above)"].append(post1 - post0)
    return [(name, statistics.median(values)) for name, values in legs.items()]


def channel_breakdown(samples: list[tuple[float, float]], events: list[tuple[Any, ...]],
                      agent_events: list[tuple[Any, ...]]) -> list[tuple[str, float]]:
    """Median of each leg of a sequential call over the work channel (the k-th call is the k-th item received)."""
    handed = [e for e in events if e[0] == "handed"]
    claimed = sorted((e[2], e[1]) for e in agent_events if e[0] == "claimed")
    replayed = {e[1]: (e[2], e[3]) for e in agent_events if e[0] == "replayed"}
    posted = {e[1]: (e[2], e[3]) for e in agent_events if e[0] == "posted"}
    if not (len(handed) == len(claimed) == len(samples)):
        raise RuntimeError(f"{len(samples)} relayed calls, {len(handed)} handed to the channel, {len(claimed)} "
                           "received: the breakdown cannot match")
    legs: dict[str, list[float]] = defaultdict(list)
    for (call_start, call_end), (_, hand0, hand1), (received, item) in zip(samples, handed, claimed, strict=True):
        if item not in replayed or item not in posted:
            continue
        (rep0, rep1), (_post0, post1) = replayed[item], posted[item]
        legs["caller -> relay handler starts (gRPC in)"].append(hand0 - call_start)
        legs["handed to the channel -> agent has the item (frame, TLS, WebSocket, MAC, JSON)"].append(received - hand0)
        legs["agent: item received -> call started (no worker thread for a unary call)"].append(rep0 - received)
        legs["agent: Ping on the code server, until gRPC's callback runs"].append(rep1 - rep0)
        legs["agent: result frame built and sent (JSON, MAC, TLS write)"].append(post1 - rep1)
        legs["result frame -> relay's call resumes (gateway reads, checks MAC, JSON)"].append(hand1 - post1)
        legs["relay -> caller (gRPC reply)"].append(call_end - hand1)
    return [(name, statistics.median(values)) for name, values in legs.items()]


def gateway_times(events: list[tuple[Any, ...]], operations: tuple[str, ...]) -> list[tuple[str, float, int]]:
    grouped: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e[0] == "gw" and e[1] in operations:
            grouped[e[1]].append(e[3] - e[2])
    return [(op, statistics.median(v), len(v)) for op, v in grouped.items()]


def db_per_call(records: list[tuple[str, float]], calls: int) -> list[tuple[str, float, float]]:
    """(operation, count per call, ms per call) for the gateway's database calls during a phase."""
    grouped: dict[str, list[float]] = defaultdict(list)
    for name, seconds in records:
        grouped[name].append(seconds)
    return sorted(((name, len(v) / calls, sum(v) / calls) for name, v in grouped.items()), key=lambda r: -r[2])


def fixed_costs(cp: ControlPlane, workdir: Path, calls: int = 200) -> list[tuple[str, float]]:
    """Medians of a few per-request costs, each measured alone on a quiet system."""
    import sqlalchemy as sa
    from graphql import parse, validate

    from appliance.agent import operations
    from controlplane.gateway.auth import operation_fields
    from controlplane.gateway.resolvers import bind
    from controlplane.gateway.schema import build_schema
    from protocol.channel import Ephemeral, FrameSealer, accept_hello, encode_body, gateway_hello
    from protocol.signing import NonceCache, RequestVerifier, SigningKey, sign_request

    def median_of(fn: Callable[[], object]) -> float:
        for _ in range(10):
            fn()
        samples = []
        for _ in range(calls):
            started = now()
            fn()
            samples.append(now() - started)
        return statistics.median(samples)

    scratch = sa.create_engine(f"sqlite:///{workdir / 'scratch.db'}")
    with scratch.connect() as conn:  # as controlplane/db.py opens the real one
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
    with scratch.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x TEXT)")
        conn.commit()

        def commit_one() -> None:
            conn.exec_driver_sql("INSERT INTO t VALUES ('x')")
            conn.commit()

        commit = median_of(commit_one)
    scratch.dispose()
    schema = build_schema(bind())
    claim_doc, post_doc = operations.CLAIM_WORK, operations.POST_RESULTS
    key = SigningKey.generate()
    payload = {"query": post_doc, "variables": {"results": [{"id": "x" * 32, "ok": True, "payload": "{}"}]}}
    body = json.dumps(payload)
    url = "https://gateway/graphql"
    headers = {"content-type": "application/json"}
    signed = [list({**headers, **sign_request("POST", url, headers, body.encode(), key)}.items())
              for _ in range(calls + 10)]  # one nonce each: the verifier refuses a replay
    verifier = RequestVerifier(lambda _kid: key.public_key, NonceCache(window_seconds=600), max_skew_seconds=300)
    pending = iter(signed)
    frame = encode_body("work", [{"id": "x" * 32, "kind": "GRPC_CALL", "queue": QUEUE, "attempt": 1,
                                  "payload": json.dumps({"method": PING, "request": "AA" * 20})}])
    frame_signature, sealer = key.sign_raw(frame), FrameSealer(b"k" * 32)

    def handshake() -> None:
        agent_ek = Ephemeral()
        hello, _ = gateway_hello(key, "agent-key", [QUEUE], agent_ek.public)
        accept_hello(hello, key.public_key, "agent-key", [QUEUE], agent_ek)

    return [
        ("SQLite INSERT + COMMIT, one row (this disk, this journal mode)", commit),
        ("GraphQL parse + validate, ClaimWork", median_of(lambda: validate(schema, parse(claim_doc)))),
        ("GraphQL parse + validate, PostResults", median_of(lambda: validate(schema, parse(post_doc)))),
        ("RFC 9421 sign a request (agent: Ed25519 + Content-Digest)",
         median_of(lambda: sign_request("POST", url, headers, body.encode(), key))),
        ("RFC 9421 verify a request (gateway middleware, without the key lookups)",
         median_of(lambda: verifier.verify("POST", url, next(pending), body.encode()))),
        ("middleware's own GraphQL parse to learn the operation (operation_fields)",
         median_of(lambda: operation_fields(payload))),
        ("Ed25519 sign (what a per-frame signature would cost each side)", median_of(lambda: key.sign_raw(frame))),
        ("Ed25519 verify", median_of(lambda: key.public_key.verify(frame_signature, frame))),
        ("work channel: HMAC-SHA256 tag of a Ping frame (what each frame costs instead)",
         median_of(lambda: sealer.seal(frame))),
        ("work channel: handshake crypto, both sides (X25519, HKDF, Ed25519 sign + verify; once per channel)",
         median_of(handshake)),
    ]


def batches(agent_events: list[tuple[Any, ...]]) -> tuple[float, float]:
    """Mean items per claimWork answer and mean results per postResults POST."""
    claims: dict[float, int] = defaultdict(int)
    for e in agent_events:
        if e[0] == "claimed":
            claims[e[2]] += 1
    posts = {(e[2], e[3]): e[4] for e in agent_events if e[0] == "posted"}
    return (statistics.mean(claims.values()) if claims else 0.0,
            statistics.mean(posts.values()) if posts else 0.0)


# --------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500, help="measured sequential calls per path (500)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up calls before each measurement (50)")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers for throughput (8)")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput window per path (5 s)")
    parser.add_argument("--fresh-calls", type=int, default=100, help="calls with a new channel each (100)")
    parser.add_argument("--poll", action="store_true",
                        help="the agent long-polls instead of holding a work channel (AIRLOCK_WORK_CHANNEL=poll)")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="the gateway's event loop, as uvicorn's --loop (auto, as shipped: uvloop if installed)")
    parser.add_argument("--fastpath", default="auto",
                        help="the relay's compiled data path: auto (as shipped: used if installed or built), off, "
                             "or the binary's path")
    parser.add_argument("--image", help="code server image (default: build/reuse example-location)")
    args = parser.parse_args()

    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background, where SIGINT is ignored
        signal.signal(sig, on_term)
    run_id = "b" + uuid.uuid4().hex[:8]
    started = time.monotonic()
    ctx = mp.get_context("spawn")
    cpus = os.cpu_count()
    print(f"airlock relay bench {run_id}  {datetime.datetime.now():%Y-%m-%d %H:%M}  {cpus} CPUs  "
          f"{platform.system()} {platform.release()}  Python {platform.python_version()}  grpcio {grpc.__version__}")
    print(f"load average before: {load()}  (other work on this host skews every figure below)")

    image = example_image(args.image)
    code_server: CodeServer | None = None
    cp: ControlPlane | None = None
    agent: Child | None = None
    callers: Child | None = None
    workdir = Path(tempfile.mkdtemp(prefix="airlock-bench-"))
    try:
        code_server = CodeServer(image, run_id)
        ip = code_server.start()
        direct = code_server.address
        fastpath = find_binary(args.fastpath) if not args.poll else None
        cp = ControlPlane(workdir, args.loop, fastpath)
        cp.start()
        relayed = f"127.0.0.1:{cp.relay_port}"
        state = workdir / "agent-state"
        state.mkdir(mode=0o700)
        token = cp.app.state.store.create_token(DEPLOYMENT)
        mode = "poll" if args.poll else "channel"
        agent = Child(ctx, agent_main, cp.base_url, str(cp.tls.ca_cert), str(state), token, ip, mode, fastpath,
                      name="bench-agent")
        if not (agent.conn.poll(60) and agent.conn.recv() == "ready"):
            raise RuntimeError("the agent process did not start (enrollment failed?)")
        if mode == "channel":
            wait_until(lambda: cp.channels() == 1, 30, "the agent's work channel")
        if fastpath:
            wait_until(lambda: agent.ask("tunnel"), 30, "the agent's fast-path tunnel")
        callers = Child(ctx, caller_main, name="bench-callers")
        print(f"code server  {image} at {direct} (hardened, internal network airlock-bench-{run_id})")
        print(f"gateway      {cp.base_url} (uvicorn, TLS, {type(cp.loop).__module__.split('.')[0]} event loop, "
              f"SQLite file {cp.sqlite_mode()}"
              f", as shipped); relay {relayed} in the same process")
        print(f"agent        real ConnectedAgent in its own process, work by "
              f"{'the work channel (WebSocket, as shipped)' if mode == 'channel' else 'long poll (--poll)'}; "
              "callers in a third process")
        print("fast path    " + (f"{fastpath}: edge in front of the relay, tunnel to the agent (as shipped)"
                                 if fastpath else "off: every relayed call takes the Python relay"))
        print(f"setup        {time.monotonic() - started:.1f} s\n")

        # 1. enqueue -> agent receives
        wake = enqueue_to_claim(cp, agent, args.calls, args.warmup)
        wake_p50 = pct(wake, 50)
        parked = "its channel's pump waiting for work" if mode == "channel" else "the agent parked in its long poll"
        print(f"1. enqueue -> agent receives ({len(wake)} durable items, {parked})")
        print(f"   p50 {ms(wake_p50)}   p99 {ms(pct(wake, 99))}   target p50 <= 5 ms: {verdict(wake_p50 <= 0.005)}\n")

        # 2. sequential Ping, direct vs relayed
        direct_samples = callers.run("seq", direct, args.calls, args.warmup)
        agent.ask("events")
        cp.events.clear()
        # warm-up first, then only the measured calls' events are kept
        callers.run("seq", relayed, 0, args.warmup)
        agent.ask("events")
        cp.events.clear()
        with cp.probe.recording() as db_records:
            relayed_samples = callers.run("seq", relayed, args.calls, 0)
            time.sleep(0.05)  # the last POST's tail (audit) lands after the caller has its answer
        agent_events = agent.ask("events")
        d = [b - a for a, b in direct_samples]
        r = [b - a for a, b in relayed_samples]
        d50, r50 = pct(d, 50), pct(r, 50)
        print(f"2. Ping, {args.calls} sequential calls per path, one persistent channel each")
        print(f"   direct   p50 {ms(d50)}   p99 {ms(pct(d, 99))}")
        print(f"   relayed  p50 {ms(r50)}   p99 {ms(pct(r, 99))}")
        print(f"   relayed p50 - direct p50 = {(r50 - d50) * 1000:.2f} ms   "
              f"target <= 1 ms: {verdict(r50 <= d50 + 0.001)}")
        legs = [] if fastpath else (channel_breakdown if mode == "channel" else relayed_breakdown)(
            relayed_samples, cp.events, agent_events)
        if legs:
            print("   where a relayed call's time goes (median of each leg):")
        else:
            print("   (Ping took the fast path: the compiled legs are not instrumented; --fastpath off for the legs)")
        for name, value in legs:
            print(f"     {ms(value)}  {name}")
        if legs:
            print(f"     {ms(sum(v for n, v in legs if not n.startswith('(')))}  sum of the legs' medians "
                  f"(whole call median {r50 * 1000:.2f} ms)")
        if mode == "channel" and legs:
            handed = [e for e in legs if e[0].startswith("handed to the channel")]
            print(f"   (1b. a relayed call handed to the channel -> agent receives it: p50 "
                  f"{handed[0][1] * 1000:.2f} ms, no database row)" if handed else "")
        elif not fastpath:
            print("   gateway time per request, from reaching the app to its answer sent (median):")
            for operation, seconds, count in gateway_times(cp.events, ("PostResults",)):
                print(f"     {ms(seconds)}  {operation} ({count} requests)")
        if not fastpath:
            print("   gateway database calls per relayed call (count, time; includes waiting for the queue's lock):")
            for name, count, seconds in db_per_call(db_records, args.calls):
                print(f"     {count:5.2f} x {name:24} {ms(seconds)}")
        print()

        # 3. throughput
        def throughput(address: str) -> tuple[dict[str, Any], dict[str, float]]:
            """One throughput job, and the CPU time each process spent on it, per call (warm-up included)."""
            assert code_server is not None and agent is not None and callers is not None
            before = (cp.cpu_seconds(), agent.ask("cpu"), code_server.cpu_seconds())
            result = callers.run("tput", address, args.callers, 1.0, args.seconds)
            after = (cp.cpu_seconds(), agent.ask("cpu"), code_server.cpu_seconds())
            used = [b - a for a, b in zip(before, after, strict=True)]
            n = max(1, result["all_calls"])
            cpu = {"callers": result["cpu"] / n, "control plane (gateway + relay)": used[0] / n,
                   "agent": used[1] / n, "code server": used[2] / n}
            return result, cpu

        td, cpu_direct = throughput(direct)
        agent.ask("events")
        with cp.probe.recording() as load_records:
            tr, cpu_relayed = throughput(relayed)
        load_events = agent.ask("events")
        ratio = tr["rate"] / td["rate"]
        print(f"3. throughput, {args.callers} concurrent callers (own channel each), {args.seconds:.0f} s per path")
        for label, t in (("direct ", td), ("relayed", tr)):
            print(f"   {label}  {t['rate']:8.1f} calls/s   ({t['calls']} calls; latency p50 "
                  f"{ms(pct(t['latencies'], 50))}, p99 {ms(pct(t['latencies'], 99))})")
        print(f"   ratio relayed/direct {ratio:.2f}   target >= 0.70: {verdict(ratio >= 0.70)}")
        for label, cpu in (("direct ", cpu_direct), ("relayed", cpu_relayed)):
            parts = ", ".join(f"{name} {seconds * 1000:.2f}" for name, seconds in cpu.items())
            print(f"   CPU per call, {label}: {sum(cpu.values()) * 1000:6.2f} ms = {parts} ms")
        per_claim, per_post = batches(load_events)
        what = ("items per work frame", "results per result frame") if mode == "channel" else (
            "items per claimWork answer", "results per POST")
        load_calls = len([e for e in load_events if e[0] == "claimed"])
        if fastpath:
            print(f"   under load: {load_calls} calls came down the work channel (the rest took the tunnel)")
        else:
            print(f"   under load: {per_claim:.1f} {what[0]}, {per_post:.1f} {what[1]}; "
                  f"gateway database time per relayed call (incl. warm-up calls in the count):")
            for name, count, seconds in db_per_call(load_records, max(1, load_calls))[:5]:
                print(f"     {count:5.2f} x {name:24} {ms(seconds)}")
        print()
        cp.events.clear()

        # extras, no target
        print("extra (no target)")
        fd = callers.run("fresh", direct, args.fresh_calls, 10)
        fr = callers.run("fresh", relayed, args.fresh_calls, 10)
        print(f"   new channel per call (as Dagster's gRPC client does), {args.fresh_calls} calls per path:")
        print(f"     direct p50 {ms(pct(fd, 50))} p99 {ms(pct(fd, 99))}   relayed p50 {ms(pct(fr, 50))} "
              f"p99 {ms(pct(fr, 99))}   difference p50 {(pct(fr, 50) - pct(fd, 50)) * 1000:.2f} ms")
        agent.ask("events")
        alone = agent.ask("replay")
        print(f"   the agent's replay of Ping alone (GrpcReplayer from the agent process's main thread, 300 calls): "
              f"p50 {ms(pct(alone, 50))}  p99 {ms(pct(alone, 99))}")
        print("   the agent's cost of one request to the gateway, nothing queued (200 each):")
        cp.events.clear()
        for name, samples in agent.ask("rtt").items():
            print(f"     p50 {ms(pct(samples, 50))}  p99 {ms(pct(samples, 99))}  {name}")
        for operation, seconds, _count in gateway_times(cp.events, ("WhoAmI",)):
            print(f"     of which inside the gateway app (middleware + GraphQL), {operation}: {ms(seconds)}")
        print("   fixed costs, each measured alone (median):")
        for name, seconds in fixed_costs(cp, workdir):
            print(f"     {ms(seconds)}  {name}")
        print(f"\ntotal {time.monotonic() - started:.1f} s; load average after: {load()}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        if callers is not None:
            callers.stop(("stop", ()), wait=2.0)  # holds nothing outside itself; may be mid-job
        if agent is not None:
            agent.stop("stop")
        if cp is not None:
            with contextlib.suppress(Exception):  # release a claimWork still parked, so uvicorn stops at once
                cp.queue.enqueue(DEPLOYMENT, QUEUE, "GRPC_CALL", {}, ttl_seconds=5)
            cp.stop()
        if code_server is not None:
            code_server.remove()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
