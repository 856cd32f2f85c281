"""The agent's end of the work channel (protocol/channel.py): a WebSocket it opens to the gateway and holds.

Outbound only, like every other request: the upgrade is a signed GET, the gateway's hello must verify against
the pinned control-plane key, and then every frame both ways carries the channel's MAC. Work comes in as
it is queued (no poll round trip per call); each result goes back in its own frame as soon as it is ready.

What the agent accepts on a channel:
  - an item with a control-plane signature: verified exactly as from claimWork (any kind of work);
  - an item without one: only a GRPC_CALL, which the gateway relays straight from a caller. Its frame's MAC
    is its authentication; everything that changes the appliance (runs, desired locations) stays signed
    item by item, so a frame key can never launch a run.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import urllib.parse
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from appliance.agent.transport import GatewayClient, GatewayError, gateway_error
from protocol.channel import (
    CHANNEL_PATH,
    MAX_FRAME_BYTES,
    ChannelError,
    Ephemeral,
    FrameOpener,
    FrameSealer,
    accept_hello,
    decode_body,
    encode_body,
)
from protocol.errors import SignatureError, TemporaryError
from protocol.signing import sign_request
from protocol.work import SignedWork, WorkKind

__all__ = ["ChannelClosed", "WorkChannel", "channel_url"]

log = logging.getLogger("airlock.agent.channel")
UNSIGNED_KINDS = frozenset({WorkKind.GRPC_CALL})


class ChannelClosed(TemporaryError):
    """The channel ended (the gateway went away, closed it, or sent a frame that failed)."""


def channel_url(base_url: str, queues: list[str], ephemeral_key: str) -> str:
    """wss://host/v1/channel?queues=..&ek=.. for the gateway at https://host (ws:// for http://)."""
    parts = urllib.parse.urlsplit(base_url)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"control plane URL {base_url!r} is not http(s)")
    query = urllib.parse.urlencode({"queues": ",".join(queues), "ek": ephemeral_key})
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + CHANNEL_PATH, query, ""))


class WorkChannel:
    """One open channel. `receive` from one thread; `send_results` from any (the sealer is locked)."""

    def __init__(self, connection: ClientConnection, channel_id: str, sealer: FrameSealer, opener: FrameOpener,
                 client: GatewayClient, fastpath: tuple[int, bytes] | None = None) -> None:
        self.connection, self.id, self.client = connection, channel_id, client
        self.fastpath = fastpath  # (the edge's tunnel port, the tunnel's key) if the gateway offers a fast path
        self._sealer, self._opener = sealer, opener
        self._send_lock = threading.Lock()
        self.closed = threading.Event()

    @classmethod
    def open(cls, client: GatewayClient, base_url: str, queues: list[str], *, ssl_context: ssl.SSLContext | None,
             open_timeout: float = 10.0) -> WorkChannel:
        """Connect, send the signed upgrade, check the hello. GatewayError(status=...) if the gateway refuses."""
        if client.pinned is None:
            raise GatewayError("no control-plane key is pinned; enroll first")
        key, ephemeral = client.key, Ephemeral()
        url = channel_url(base_url, queues, ephemeral.public)
        headers = sign_request("GET", url.replace("wss://", "https://", 1).replace("ws://", "http://", 1), {}, b"", key)
        try:
            connection = connect(url, ssl=ssl_context if url.startswith("wss://") else None,
                                 additional_headers=headers, max_size=MAX_FRAME_BYTES, compression=None,
                                 open_timeout=open_timeout, close_timeout=5, user_agent_header="airlock-agent",
                                 legacy=True)  # a plain connection: the agent's retry loop reconnects
        except InvalidStatus as exc:
            raise _refusal(exc) from None
        try:
            hello = json.loads(connection.recv(timeout=open_timeout))
            channel_id, keys = accept_hello(hello, client.pinned, key.key_id, queues, ephemeral)
        except (ChannelError, ValueError, TimeoutError, ConnectionClosed) as exc:
            connection.close(code=1008, reason="bad hello")
            raise GatewayError(f"work channel handshake failed: {exc}") from None
        log.info("work channel %s open for queues %s", channel_id, ",".join(queues))
        return cls(connection, channel_id, FrameSealer(keys.up), FrameOpener(keys.down), client,
                   fastpath=_offered_port(hello, keys.fastpath))

    def receive(self, timeout: float) -> list[SignedWork]:
        """The next frame's work, verified ([] if nothing came within `timeout`); ChannelClosed when it ends."""
        try:
            frame = self.connection.recv(timeout=timeout)
        except TimeoutError:
            return []
        except ConnectionClosed as exc:
            self.closed.set()
            raise ChannelClosed(f"channel {self.id} closed: {exc}") from None
        try:
            items = decode_body(self._opener.open(frame), "work")
        except ChannelError as exc:
            log.error("closing work channel %s: %s", self.id, exc)
            self.close(code=1008, reason=str(exc)[:120])
            raise ChannelClosed(f"channel {self.id}: {exc}") from None
        accepted = []
        for raw in items:
            try:
                accepted.append(self._verify(raw))
            except (SignatureError, KeyError, TypeError, ValueError) as exc:
                log.error("refusing work %s (%s) on channel %s: %s", raw.get("id"), raw.get("kind"), self.id, exc)
        return accepted

    def _verify(self, raw: dict[str, Any]) -> SignedWork:
        if "signature" in raw:
            return self.client.verify_work(raw)
        kind = WorkKind(raw["kind"])
        if kind not in UNSIGNED_KINDS:
            raise SignatureError("unsigned", f"{kind.value} work must carry the control plane's signature")
        return SignedWork(id=str(raw["id"]), kind=kind, queue=str(raw["queue"]), payload=str(raw["payload"]),
                          attempt=int(raw["attempt"]), signature="", signed_by=f"channel:{self.id}")

    def send_results(self, results: list[dict[str, Any]]) -> bool:
        """Send results in one frame; False if the channel is closed (the caller decides what else to do)."""
        body = encode_body("results", results)
        if len(body) + 32 > MAX_FRAME_BYTES:
            raise ValueError(f"results of {len(body)} bytes exceed the channel's frame limit ({MAX_FRAME_BYTES})")
        with self._send_lock:
            if self.closed.is_set():
                return False
            try:
                self.connection.send(self._sealer.seal(body))
                return True
            except ConnectionClosed:
                self.closed.set()
                return False

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed.set()
        self.connection.close(code=code, reason=reason)


def _offered_port(hello: dict[str, Any], key: bytes) -> tuple[int, bytes] | None:
    """The fast path the hello offers, if any (unsigned on purpose: protocol/channel.py says why)."""
    offer = hello.get("fastpath")
    port = offer.get("port") if isinstance(offer, dict) else None
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        return port, key
    return None


def _refusal(exc: InvalidStatus) -> GatewayError:
    status = exc.response.status_code
    try:
        first = json.loads(exc.response.body or b"{}")["errors"][0]
        message, code = first["message"], (first.get("extensions") or {}).get("code")
    except (ValueError, KeyError, IndexError, TypeError):
        message, code = f"HTTP {status}", None
    return gateway_error(f"work channel refused: {message}", status=status, code=code)
