"""The appliance's identity: its Ed25519 key (created once, 0600, never leaves the state volume) and the
enrollment it got from the control plane, with the control plane's key pinned."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from appliance.agent.transport import Enrollment, GatewayClient
from protocol.files import write_atomic
from protocol.signing import SigningKey

log = logging.getLogger("airlock.agent.identity")
KEY_FILE, ENROLLMENT_FILE = "agent.key", "enrollment.json"


def load_or_create_key(state_dir: str) -> SigningKey:
    path = Path(state_dir) / KEY_FILE
    key, created = SigningKey.load_or_create(path)
    if created:
        log.info("created the appliance key %s in %s", key.key_id, path)
    return key


class KeyFile:
    """The appliance key as the file holds it now: `airlock keys rotate` replaces the file (atomically), and
    the agent and the metadata relay sign with the new key from their next request, without a restart."""

    def __init__(self, state_dir: str, *, recheck_seconds: float = 1.0) -> None:
        self.path = Path(state_dir) / KEY_FILE
        self.recheck_seconds = recheck_seconds
        self._key = load_or_create_key(state_dir)
        self._stamp = self._stat()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _stat(self) -> tuple[int, int]:
        info = self.path.stat()
        return info.st_ino, info.st_mtime_ns

    def current(self) -> SigningKey:
        with self._lock:
            if time.monotonic() - self._checked >= self.recheck_seconds:
                self._checked = time.monotonic()
                stamp = self._stat()
                if stamp != self._stamp:
                    key = SigningKey.load(self.path)
                    log.info("appliance key changed on disk: signing with %s (was %s)", key.key_id,
                             self._key.key_id)
                    self._key, self._stamp = key, stamp
            return self._key


def rotate_key(client: GatewayClient, state_dir: str) -> dict:
    """Register a new key with the control plane (signed by the current one), then put it in the key file.

    The new key is written next to the old one first, so a crash after the control plane accepted it
    leaves it on disk (`agent.key.next`): move it over agent.key by hand (the old key works until the
    control plane's grace period ends)."""
    enrollment = load_enrollment(state_dir)
    if enrollment is None:
        raise SystemExit("airlock keys rotate: this appliance is not enrolled (no enrollment.json)")
    client.pin(enrollment.control_plane_key)
    path = Path(state_dir) / KEY_FILE
    pending = path.with_name(KEY_FILE + ".next")
    new_key = SigningKey.generate()
    new_key.save(pending)
    try:
        answer = client.rotate_key(enrollment.agent_id, new_key)
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    os.replace(pending, path)
    return answer


def load_enrollment(state_dir: str) -> Enrollment | None:
    try:
        data = json.loads((Path(state_dir) / ENROLLMENT_FILE).read_text())
    except FileNotFoundError:
        return None
    return Enrollment(**data)


def save_enrollment(state_dir: str, enrollment: Enrollment) -> None:
    write_atomic(Path(state_dir) / ENROLLMENT_FILE, json.dumps(enrollment.__dict__, indent=2), mode=0o600)


def ensure_enrolled(client: GatewayClient, state_dir: str, *, token: str, queues: list[str],
                    fingerprint: str = "") -> Enrollment:
    """Enroll on first start (the token is one-time); afterwards reuse the stored enrollment and pinned key."""
    enrollment = load_enrollment(state_dir)
    if enrollment is None:
        if not token:
            raise SystemExit("airlock agent: not enrolled yet and no AIRLOCK_ENROLL_TOKEN (or _FILE) was given; "
                             "create one with `airlock-cp agent-token create`")
        enrollment = client.enroll(token, queues, expected_fingerprint=fingerprint or None)
        save_enrollment(state_dir, enrollment)
        log.info("enrolled as %s in deployment %s; control plane key %s pinned", enrollment.agent_id,
                 enrollment.deployment, enrollment.control_plane_key_id)
    else:
        client.pin(enrollment.control_plane_key)
    return enrollment
