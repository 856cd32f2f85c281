"""The relay's compiled data path, appliance side: drive `airlock-fastpath agent` (fastpath/src/agent.rs).

While the agent holds a work channel whose gateway offers a fast path, the child holds a tunnel to that
gateway's edge (egress only, like the channel: it dials out), authenticated with the channel's third key
(protocol/channel.py), and answers the edge's plain relayed calls by forwarding them to this appliance's code
servers. It forwards only relayed methods (`protocol.grpc_calls`: the same table GrpcReplayer checks) and only
to the code servers this agent lists, by location name: the control plane can neither name an address nor reach
StartRun or ShutdownServer through it. Calls that are not plain still come down the work channel.

Nothing else reaches the child: no key but the tunnel's, no Docker socket, no token. It ends when this process
does (its stdin closes) and is restarted by `ensure_running` if it dies.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import urllib.parse
from typing import IO, Any

from protocol.fastpath import log_child_line
from protocol.grpc_calls import METHODS

__all__ = ["FastPathTunnel", "tunnel_address"]

log = logging.getLogger("airlock.agent.fastpath")
RELAYED = tuple(sorted(m.path for m in METHODS if m.relayed))


def tunnel_address(control_plane_url: str, port: int) -> str:
    """host:port of the edge: the gateway's host (as this agent reaches it) and the port its hello named."""
    host = urllib.parse.urlsplit(control_plane_url).hostname
    if not host:
        raise ValueError(f"control plane URL {control_plane_url!r} has no host")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class FastPathTunnel:
    """One `airlock-fastpath agent` child; thread-safe. Every call is one line on its stdin."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._servers: dict[str, str] = {}
        self._target: dict[str, Any] | None = None
        self.up = threading.Event()  # set while the tunnel is open (the child says so)

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (benches read its CPU time)."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def revive(self) -> None:
        """Start the child again if it was started and has died (the agent calls this every reconcile pass)."""
        if self._process is not None and self._process.poll() is not None:
            self.ensure_running()

    def ensure_running(self) -> None:
        """Start the child if it is not running, and tell it the current state."""
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                return
            if self._process is not None:
                log.error("fast path child exited with %s; starting it again", self._process.returncode)
            self.up.clear()
            self._process = subprocess.Popen([self.binary, "agent"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, close_fds=True, env=_child_env())
            for stream, reader in ((self._process.stdout, self._read_events), (self._process.stderr, self._read_log)):
                threading.Thread(target=reader, args=(stream,), name="airlock-fastpath-io", daemon=True).start()
            self._send_locked(op="methods", methods=list(RELAYED))
            self._send_locked(op="servers", servers=self._servers)
            if self._target is not None:
                self._send_locked(op="connect", **self._target)

    def connect(self, channel: str, key: bytes, address: str) -> None:
        """Hold the tunnel of work channel `channel` at `address` (replacing any other)."""
        self.ensure_running()
        with self._lock:
            self._target = {"channel": channel, "key": key.hex(), "address": address}
            self._send_locked(op="connect", **self._target)
        log.info("fast path: dialling the edge at %s for channel %s", address, channel)

    def disconnect(self, channel: str) -> None:
        """The work channel `channel` closed: so does its tunnel (a newer channel's tunnel is left alone)."""
        with self._lock:
            if self._target is None or self._target["channel"] != channel:
                return
            self._target = None
            self._send_locked(op="disconnect")

    def servers(self, servers: dict[str, str]) -> None:
        """Which code server (host:port) serves which location here; sent only when it changed."""
        with self._lock:
            if servers == self._servers:
                return
            self._servers = dict(servers)
            self._send_locked(op="servers", servers=self._servers)

    def close(self) -> None:
        with self._lock:
            process, self._process = self._process, None
        if process is not None and process.poll() is None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()

    def _send_locked(self, **command: Any) -> None:
        process = self._process
        if process is None or process.stdin is None or process.poll() is not None:
            return  # ensure_running tells a new child everything
        try:
            process.stdin.write(json.dumps(command, separators=(",", ":")).encode() + b"\n")
            process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def _read_events(self, stream: IO[bytes]) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                log.error("fast path child wrote a line that is not an event: %r", line[:200])
                continue
            kind = event.get("event")
            if kind == "tunnel_up":
                self.up.set()
                log.info("fast path tunnel up (channel %s)", event.get("channel"))
            elif kind == "tunnel_down":
                self.up.clear()
                log.info("fast path tunnel down (channel %s): %s", event.get("channel"), event.get("reason"))
            elif kind == "error":
                log.error("fast path child: %s", event.get("error"))
        self.up.clear()

    @staticmethod
    def _read_log(stream: IO[bytes]) -> None:
        for line in stream:
            log_child_line(log, line)


def _child_env() -> dict[str, str]:
    """Nothing of the agent's environment but PATH: the child needs no token, key or socket path."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
