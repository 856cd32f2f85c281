"""The relay's compiled data path, control-plane side: drive `airlock-fastpath edge` (fastpath/src/edge.rs).

With the edge running, it owns each location's relay port and the Python relay (server.py) listens on a
loopback port behind it. A call whose method is plain (relayed, nothing to scrub, nothing to cache: `FAST_METHODS`)
goes down the tunnel of an agent that serves the location's queue, if one is open; every other call, and every
call while no tunnel serves the location, reaches the Python relay unchanged. The tunnel's key is the third key
of the agent's work channel (protocol/channel.py), handed to the edge when the channel opens (`ticket`) and
withdrawn when it closes (`revoke`), so a tunnel lives exactly as long as an authenticated channel.

The edge is a child of the gateway process, driven by JSON lines on its stdin (fastpath/src/control.rs). If it
dies it is started again and told everything again; while it is down, its ports are closed (Dagster retries).
Why a compiled path at all: docs/BENCHMARKS.md, relay section (two Python gRPC hops cost more than the +1 ms
the relay may add).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from controlplane.relay.scrub import CARRIES_INSTANCE_REF
from controlplane.relay.server import GET_SERVER_ID, RELOADS, RelayLimits
from protocol.dagster_grpc import LIST_REPOSITORIES
from protocol.fastpath import log_child_line
from protocol.grpc_calls import METHODS

__all__ = ["FAST_METHODS", "FastPathEdge"]

log = logging.getLogger("airlock.relay.fastpath")

# Relayed methods whose bytes the Python relay would pass through untouched: no InstanceRef to scrub, no
# cached answer, no cache to drop. Everything else keeps taking the Python road, where those rules live.
# ListRepositories too: where no code server runs, the agent answers it with the location's load error (an
# image the appliance refused, a start that failed), which Dagster shows in the UI; that verdict is Python's.
FAST_METHODS: tuple[str, ...] = tuple(sorted(
    m.path for m in METHODS
    if m.relayed and m.path not in CARRIES_INSTANCE_REF and m.path not in (GET_SERVER_ID, LIST_REPOSITORIES)
    and m.path not in RELOADS
))
RESTART_DELAY = 1.0
LISTEN_TIMEOUT = 10.0


@dataclass(frozen=True)
class _Listen:
    location: str
    address: str
    fallback: str
    deployment: str
    queue: str


class FastPathEdge:
    """One `airlock-fastpath edge` child of this event loop; every method but `start`/`stop` is fire and forget
    except `listen`, which waits for the edge to bind (or refuse) the port."""

    def __init__(self, binary: str, tunnel_address: str, *, advertised_port: int | None = None,
                 limits: RelayLimits | None = None, stats_seconds: float = 60.0) -> None:
        self.binary, self.tunnel_address = binary, tunnel_address
        self._advertised_port, self._limits = advertised_port, limits or RelayLimits()
        self._stats_seconds = stats_seconds
        self.roads: Counter[str] = Counter()  # calls by road since start, from the edge's reports
        self._process: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._listens: dict[str, _Listen] = {}
        self._tickets: dict[str, dict[str, Any]] = {}
        self._bound: dict[str, asyncio.Future[int]] = {}
        self._ready: asyncio.Future[int] | None = None
        self._stopping = False
        self.tunnels_up: set[str] = set()
        self.bound_port = 0

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (benches read its CPU time)."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def port(self) -> int:
        """The tunnel port agents are told to dial (the advertised one, else the one bound)."""
        return self._advertised_port or self.bound_port

    async def start(self) -> None:
        """Run the edge and wait until its tunnel port is bound; OSError if it cannot start."""
        await self._spawn()
        self._tasks.append(asyncio.create_task(self._supervise()))

    async def _spawn(self) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        self._process = await asyncio.create_subprocess_exec(
            self.binary, "edge", "--tunnel-listen", self.tunnel_address,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        process = self._process
        readers = [asyncio.create_task(self._read_events(process)), asyncio.create_task(self._read_log(process))]
        self._tasks.extend(readers)
        waiter = asyncio.create_task(process.wait())
        done, _ = await asyncio.wait([self._ready, waiter], timeout=LISTEN_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._ready not in done:
            waiter.cancel()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise OSError(f"airlock-fastpath edge did not start on {self.tunnel_address} (see its log above)")
        waiter.cancel()
        self.bound_port = self._ready.result()
        # A restarted edge must bind the same port: agents were told it (port 0 is for tests and benches).
        self.tunnel_address = f"{self.tunnel_address.rsplit(':', 1)[0]}:{self.bound_port}"
        self._send(op="methods", methods=list(FAST_METHODS), default_wait=self._limits.default_wait,
                   max_wait=self._limits.max_wait, no_deadline_above=self._limits.no_deadline_above,
                   stats_seconds=self._stats_seconds)
        log.info("fast path edge running (pid %d), tunnel port %d; %d fast methods", process.pid, self.bound_port,
                 len(FAST_METHODS))

    async def _supervise(self) -> None:
        """Start the edge again if it dies, and tell it again every listener and ticket."""
        while not self._stopping:
            assert self._process is not None
            code = await self._process.wait()
            if self._stopping:
                return
            log.error("fast path edge exited with %s; restarting in %.0f s (relay ports are closed until then)",
                      code, RESTART_DELAY)
            self.tunnels_up.clear()
            await asyncio.sleep(RESTART_DELAY)
            try:
                await self._spawn()
            except OSError as exc:
                log.error("%s", exc)
                continue
            for listen in list(self._listens.values()):
                self._send(op="listen", **listen.__dict__)
            for channel, ticket in self._tickets.items():
                self._send(op="ticket", channel=channel, **ticket)

    async def listen(self, location: str, address: str, fallback: str, deployment: str, queue: str) -> int:
        """Serve `address` (host:port, a fixed port: a restarted edge binds it again) for the location; calls the
        edge does not tunnel go to `fallback`. Returns the port; OSError if the edge cannot bind it."""
        if address.endswith(":0"):
            raise ValueError(f"the edge serves fixed relay ports, not {address!r}")
        listen = _Listen(location, address, fallback, deployment, queue)
        bound = self._bound[address] = asyncio.get_running_loop().create_future()
        self._send(op="listen", **listen.__dict__)
        try:
            port = await asyncio.wait_for(bound, LISTEN_TIMEOUT)
        except TimeoutError:
            raise OSError(f"fast path edge did not bind {address} within {LISTEN_TIMEOUT:.0f} s") from None
        finally:
            self._bound.pop(address, None)
        self._listens[address] = listen
        return port

    def unlisten(self, address: str) -> None:
        self._listens.pop(address, None)
        self._send(op="unlisten", address=address)

    def ticket(self, channel: str, key: bytes, deployment: str, queues: list[str]) -> None:
        """The work channel `channel` opened: its agent may open a tunnel with `key` for these queues."""
        self._tickets[channel] = {"key": key.hex(), "deployment": deployment, "queues": list(queues)}
        self._send(op="ticket", channel=channel, **self._tickets[channel])

    def revoke(self, channel: str) -> None:
        """The work channel closed: its tunnel (if any) closes and cannot be opened again."""
        self._tickets.pop(channel, None)
        self._send(op="revoke", channel=channel)

    async def stop(self) -> None:
        self._stopping = True
        if self._process is not None and self._process.returncode is None:
            if self._process.stdin is not None:
                self._process.stdin.close()  # the edge exits when its owner's pipe closes
            try:
                await asyncio.wait_for(self._process.wait(), 5)
            except TimeoutError:
                self._process.kill()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _send(self, **command: Any) -> None:
        process = self._process
        if process is None or process.stdin is None or process.returncode is not None:
            return  # the supervisor replays the state when the edge is back
        process.stdin.write(json.dumps(command, separators=(",", ":")).encode() + b"\n")

    async def _read_events(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                log.error("fast path edge wrote a line that is not an event: %r", line[:200])
                continue
            self._on_event(event)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "ready" and self._ready is not None and not self._ready.done():
            self._ready.set_result(int(event.get("tunnel_port") or 0))
        elif kind in ("listening", "listen_failed"):
            bound = self._bound.get(str(event.get("address")))
            if kind == "listen_failed":
                log.error("fast path edge: %s", event.get("error"))
            if bound is not None and not bound.done():
                if kind == "listening":
                    bound.set_result(int(event.get("port") or 0))
                else:
                    bound.set_exception(OSError(str(event.get("error"))))
        elif kind == "stats":
            roads = {road: int(event.get(road) or 0) for road in ("tunnel", "python", "handed_back")}
            self.roads.update(roads)
            log.info("relay fast path, last %.0f s: %d call(s) through agents' tunnels, %d to the Python relay "
                     "(%d of them after a tunnel failed)", float(event.get("seconds") or 0), roads["tunnel"],
                     roads["python"] + roads["handed_back"], roads["handed_back"])
        elif kind == "tunnel_up":
            self.tunnels_up.add(str(event.get("channel")))
            log.info("fast path tunnel up for channel %s", event.get("channel"))
        elif kind == "tunnel_down":
            self.tunnels_up.discard(str(event.get("channel")))
            log.info("fast path tunnel down for channel %s: %s", event.get("channel"), event.get("reason"))
        else:
            log.error("fast path edge: %s", event.get("error") or event)

    @staticmethod
    async def _read_log(process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            log_child_line(log, line)
