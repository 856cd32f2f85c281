"""The work channel's wire format: a WebSocket the agent opens to the gateway and holds (egress only),
authenticated once with both parties' Ed25519 keys, then frame by frame with HMAC-SHA256.

Why a MAC per frame and not an Ed25519 signature: verifying one Ed25519 signature costs ~160 µs on a 2-core
VM, and a relayed call would need four (sign and verify, work and result): a third of the relay's +1 ms
budget. The handshake binds a fresh X25519 exchange to both long-term keys (the agent's RFC 9421 signature
covers its ephemeral key; the control plane signs the whole transcript), so the per-frame keys are known to
this gateway process and this agent only. A TLS-terminating proxy between them can read frames but cannot
forge, replay, drop or reorder one. What a MAC gives up is proof to a third party; the audit log records
which key opened the channel.

Handshake:
  1. agent   GET /v1/channel?queues=<q1,q2>&ek=<X25519 public key, base64url>   (RFC 9421, @query covered)
  2. gateway first message, text: {"v": 1, "channel": id, "ek": <its X25519 public key>, "signedBy": key id,
             "signature": Ed25519 over `transcript(...)`}; the agent checks it against its pinned key.
  3. both    HKDF-SHA256(X25519 secret, salt = SHA-256(transcript), info = "airlock-channel-v1 keys") -> 96
             bytes: the first 32 key frames gateway -> agent ("down"), the next 32 agent -> gateway ("up"), the
             last 32 are the pre-shared key of the relay's fast-path tunnel for this channel (docs/FASTPATH.md;
             HKDF's output is a stream, so the first 64 bytes are what they were before the tunnel existed).
The hello may also carry {"fastpath": {"port": N}}: where this gateway's tunnel listens (host: the gateway's).
It is outside the signature on purpose: the tunnel authenticates with the channel's key, so a changed port can
only make the tunnel fail, and relayed calls then go down the channel as before.
Frames: binary messages `tag (32 bytes) || body`, tag = HMAC-SHA256(key of the direction, seq || body), seq an
8-byte counter of that direction's frames from 0, never sent. A channel resends nothing, so any frame that
is dropped, replayed, reordered or altered fails its tag, and the receiver closes the channel.
Bodies are compact JSON: down {"work": [item, ...]}, up {"results": [result, ...]}.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.dagster_grpc import MAX_MESSAGE_BYTES
from protocol.errors import PermanentError, SignatureError
from protocol.keys import SigningKey, key_id_of, verify_bytes

__all__ = [
    "CHANNEL_PATH",
    "MAX_FRAME_BYTES",
    "ChannelError",
    "ChannelKeys",
    "Ephemeral",
    "FrameOpener",
    "FrameSealer",
    "accept_hello",
    "decode_body",
    "encode_body",
    "gateway_hello",
    "transcript",
]

CHANNEL_PATH = "/v1/channel"
VERSION = 1
TAG_BYTES = 32
# A result carries up to Dagster's 100 MB of response bytes, base64 in JSON: 4/3 of it, plus room for the rest.
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES * 4 // 3 + 4 * 1024 * 1024
_INFO = b"airlock-channel-v1 keys"


class ChannelError(PermanentError):
    """The channel cannot go on: a failed handshake or a frame that does not authenticate or parse."""


@dataclass(frozen=True)
class ChannelKeys:
    down: bytes  # gateway -> agent
    up: bytes  # agent -> gateway
    fastpath: bytes  # the Noise PSK of this channel's fast-path tunnel (fastpath/src/noise.rs)


class Ephemeral:
    """A one-channel X25519 key pair; the private half never leaves this object."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        raw = self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public = _b64(raw)

    def derive(self, peer_public: str, transcript_bytes: bytes) -> ChannelKeys:
        try:
            peer = X25519PublicKey.from_public_bytes(_unb64(peer_public))
            shared = self._private.exchange(peer)
        except ValueError as exc:  # wrong length, or a low-order point (all-zero shared secret)
            raise ChannelError(f"bad ephemeral key: {exc}") from None
        okm = HKDF(hashes.SHA256(), 96, hashlib.sha256(transcript_bytes).digest(), _INFO).derive(shared)
        return ChannelKeys(down=okm[:32], up=okm[32:64], fastpath=okm[64:])


def transcript(agent_key_id: str, queues: Sequence[str], agent_ek: str, gateway_ek: str, channel_id: str) -> bytes:
    """What the control plane signs: every value both sides agreed on, as a JSON array (no field can shift)."""
    return json.dumps(["airlock-channel-v1", agent_key_id, list(queues), agent_ek, gateway_ek, channel_id],
                      separators=(",", ":")).encode()


def gateway_hello(key: SigningKey, agent_key_id: str, queues: Sequence[str],
                  agent_ek: str) -> tuple[dict[str, Any], ChannelKeys]:
    """The gateway's half of the handshake: its first message and the channel's keys."""
    ephemeral, channel_id = Ephemeral(), secrets.token_hex(16)
    signed = transcript(agent_key_id, queues, agent_ek, ephemeral.public, channel_id)
    hello = {"v": VERSION, "channel": channel_id, "ek": ephemeral.public, "signedBy": key.key_id,
             "signature": key.sign_bytes(signed)}
    return hello, ephemeral.derive(agent_ek, signed)


def accept_hello(hello: Any, pinned: Ed25519PublicKey, agent_key_id: str, queues: Sequence[str],
                 ephemeral: Ephemeral) -> tuple[str, ChannelKeys]:
    """The agent's half: check the gateway's hello against the pinned key; (channel id, keys)."""
    if not isinstance(hello, dict) or hello.get("v") != VERSION:
        raise ChannelError(f"not an airlock channel hello (version {VERSION}): {str(hello)[:200]}")
    fields = [hello.get(name) for name in ("channel", "ek", "signedBy", "signature")]
    if not all(isinstance(value, str) and value for value in fields):
        raise ChannelError("the hello lacks channel, ek, signedBy or signature")
    channel_id, gateway_ek, signed_by, signature = fields
    if signed_by != key_id_of(pinned):
        raise ChannelError(f"hello signed by {signed_by}, not the pinned control-plane key {key_id_of(pinned)}")
    signed = transcript(agent_key_id, queues, ephemeral.public, gateway_ek, channel_id)
    try:
        verify_bytes(pinned, signed, signature)
    except SignatureError as exc:
        raise ChannelError(f"the hello's signature does not verify: {exc}") from None
    return channel_id, ephemeral.derive(gateway_ek, signed)


class FrameSealer:
    """Tags this side's outgoing frames in order. Not thread-safe: callers hold the sending lock."""

    def __init__(self, key: bytes) -> None:
        self._key, self.seq = key, 0

    def seal(self, body: bytes) -> bytes:
        tag = hmac.new(self._key, self.seq.to_bytes(8, "big") + body, hashlib.sha256).digest()
        self.seq += 1
        return tag + body


class FrameOpener:
    """Checks the peer's frames in order; the first bad one raises and the channel must close."""

    def __init__(self, key: bytes) -> None:
        self._key, self.seq = key, 0

    def open(self, frame: bytes | str) -> bytes:
        if isinstance(frame, str):
            raise ChannelError(f"frame {self.seq} is text; every frame after the hello is binary")
        tag, body = frame[:TAG_BYTES], frame[TAG_BYTES:]
        expected = hmac.new(self._key, self.seq.to_bytes(8, "big") + body, hashlib.sha256).digest()
        if len(tag) != TAG_BYTES or not hmac.compare_digest(tag, expected):
            raise ChannelError(f"frame {self.seq} failed authentication (altered, replayed, reordered or dropped)")
        self.seq += 1
        return body


def encode_body(key: str, entries: list[dict[str, Any]]) -> bytes:
    return json.dumps({key: entries}, separators=(",", ":")).encode()


def decode_body(body: bytes, key: str) -> list[dict[str, Any]]:
    """The list under `key` in an authenticated frame, each entry an object; anything else is a ChannelError."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChannelError(f"frame body is not JSON: {exc}") from None
    entries = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ChannelError(f"frame body must be {{{key!r}: [object, ...]}}")
    return entries


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ChannelError(f"bad ephemeral key encoding: {exc}") from None
