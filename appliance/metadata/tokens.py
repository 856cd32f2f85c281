"""Capability tokens for user containers: `v1.<run id>.<location>.<mac>`, an HMAC-SHA256 over the rest.

A run token (one run of one location) is minted by the agent at launch and put in the run container's
environment. A location token (run id `*`) goes to the location's code server: it may only read, what the
control plane allows a location's sensors and schedules to read (its own runs, asset state). The relay
verifies either on each call. The MAC key lives in the appliance's state volume (0600), shared by the agent
and the relay, so no token table is needed and a relay restart loses nothing. A run token is revoked for good
when the run's container ends (a marker file per run, also in the state volume); a location token lasts as
long as the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import PermanentError

__all__ = ["LOCATION_WIDE", "RunScope", "RunTokens", "TokenRefused"]

KEY_FILE = "run-token.key"
LOCATION_WIDE = "*"  # the run id of a location token: no run, reads only
_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")  # no dots: they separate the token's parts


class TokenRefused(PermanentError, PermissionError):
    """No token, a malformed or forged one, or one whose run has ended."""


@dataclass(frozen=True)
class RunScope:
    run_id: str  # LOCATION_WIDE for a location token
    location: str

    @property
    def location_wide(self) -> bool:
        return self.run_id == LOCATION_WIDE


class RunTokens:
    def __init__(self, key: bytes, revoked_dir: Path) -> None:
        self._key, self.revoked_dir = key, revoked_dir
        revoked_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @classmethod
    def load_or_create(cls, state_dir: str) -> RunTokens:
        path = Path(state_dir) / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        key = path.read_bytes()
        if len(key) != 32:
            raise TokenRefused(f"{path} is not a 32-byte token key")
        return cls(key, Path(state_dir) / "runs-ended")

    def mint(self, scope: RunScope) -> str:
        if not _NAME.fullmatch(scope.location) or not (scope.location_wide or _NAME.fullmatch(scope.run_id)):
            raise ValueError(f"{scope} cannot be put in a token")
        body = f"v1.{scope.run_id}.{scope.location}"
        return f"{body}.{self._mac(body)}"

    def verify(self, token: str) -> RunScope:
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != "v1":
            raise TokenRefused("not an airlock run token")
        body = ".".join(parts[:3])
        if not hmac.compare_digest(parts[3], self._mac(body)):
            raise TokenRefused("run token signature does not verify")
        scope = RunScope(run_id=parts[1], location=parts[2])
        if self.is_revoked(scope.run_id):
            raise TokenRefused(f"run {scope.run_id} has ended; its token is revoked")
        return scope

    def mint_location(self, location: str) -> str:
        """The read-only token of a location's code server (deterministic: the same after a restart)."""
        return self.mint(RunScope(run_id=LOCATION_WIDE, location=location))

    def revoke(self, run_id: str) -> None:
        if _NAME.fullmatch(run_id):
            (self.revoked_dir / run_id).touch()

    def is_revoked(self, run_id: str) -> bool:
        return (self.revoked_dir / run_id).exists()

    def _mac(self, body: str) -> str:
        digest = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
