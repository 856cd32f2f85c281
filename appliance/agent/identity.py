"""The appliance's identity: its Ed25519 key (created once, 0600, never leaves the state volume) and the
enrollment it got from the control plane, with the control plane's key pinned."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from appliance.agent.transport import Enrollment, GatewayClient
from protocol.signing import SigningKey

log = logging.getLogger("airlock.agent.identity")
KEY_FILE, ENROLLMENT_FILE = "agent.key", "enrollment.json"


def load_or_create_key(state_dir: str) -> SigningKey:
    path = Path(state_dir) / KEY_FILE
    key, created = SigningKey.load_or_create(path)
    if created:
        log.info("created the appliance key %s in %s", key.key_id, path)
    return key


def load_enrollment(state_dir: str) -> Enrollment | None:
    try:
        data = json.loads((Path(state_dir) / ENROLLMENT_FILE).read_text())
    except FileNotFoundError:
        return None
    return Enrollment(**data)


def save_enrollment(state_dir: str, enrollment: Enrollment) -> None:
    path = Path(state_dir) / ENROLLMENT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(enrollment.__dict__, indent=2))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


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
