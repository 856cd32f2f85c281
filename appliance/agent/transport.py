"""The agent's side of the agent API: signed GraphQL over HTTPS, and verification of the work it gets.

Every request is signed (RFC 9421, Ed25519) by an httpx.Auth, so no call can go out unsigned. Work
that does not carry a valid signature by the pinned control-plane key is refused, never run.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.agent import operations
from protocol.errors import AirlockError, PermanentError, SignatureError
from protocol.keys import rotation_message
from protocol.signing import (
    ENROLL_KEY_HEADER,
    SigningKey,
    key_id_of,
    load_public_key,
    sign_request,
    verify_bytes,
)
from protocol.work import SignedWork, WorkKind, work_signing_bytes

log = logging.getLogger("airlock.agent.transport")


class GatewayError(AirlockError, RuntimeError):
    """The gateway refused a request (4xx with its message) or answered with GraphQL errors."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class GatewayRefusedKey(GatewayError, PermanentError):
    """401/403: the gateway does not accept this appliance's key (revoked, or enrolled elsewhere). Retrying
    cannot help; the operator enrolls the appliance again."""


def gateway_error(message: str, *, status: int | None = None, code: str | None = None) -> GatewayError:
    """The error for a refusal: permanent for a refused key, otherwise one a loop may retry."""
    kind = GatewayRefusedKey if status in (401, 403) else GatewayError
    return kind(message, status=status, code=code)


class SigningAuth(httpx.Auth):
    """Sign each request (method, path, query, Content-Digest of the exact body) with the appliance key."""

    requires_request_body = True

    def __init__(self, key: SigningKey, *, offer_public_key: bool = False) -> None:
        self.key, self.offer_public_key = key, offer_public_key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.offer_public_key:
            raw = self.key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            request.headers[ENROLL_KEY_HEADER] = base64.b64encode(raw).decode()
        added = sign_request(request.method, str(request.url), dict(request.headers), request.content, self.key)
        request.headers.update(added)
        yield request


@dataclass(frozen=True)
class Enrollment:
    agent_id: str
    deployment: str
    control_plane_key: str  # PEM, to pin
    control_plane_key_id: str


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """The one trust rule for the control plane, for HTTPS and the work channel alike: the operator's CA file
    when there is one (a self-hosted control plane), else the system's CAs."""
    return ssl.create_default_context(cafile=ca_file or None)


def https_client(url: str, ca_file: str = "", *, timeout: float = 60.0) -> httpx.Client:
    """The one HTTPS client factory for the agent API (the agent, the metadata relay, the CLI, the bench)."""
    return httpx.Client(base_url=url, verify=tls_context(ca_file), timeout=httpx.Timeout(timeout, connect=10.0))


class KeySource(Protocol):
    def current(self) -> SigningKey: ...


class GatewayClient:
    def __init__(self, client: httpx.Client, key: SigningKey | KeySource, *,
                 control_plane_key: str | None = None) -> None:
        self.client, self._key = client, key
        self.pinned: Ed25519PublicKey | None = load_public_key(control_plane_key) if control_plane_key else None

    @property
    def key(self) -> SigningKey:
        """The key to sign with now: a KeySource (identity.KeyFile) follows a rotation without a restart."""
        return self._key if isinstance(self._key, SigningKey) else self._key.current()

    def pin(self, control_plane_key: str) -> None:
        self.pinned = load_public_key(control_plane_key)

    def execute(self, query: str, variables: dict[str, Any] | None = None, *, timeout: float = 40.0,
                enrolling: bool = False) -> dict[str, Any]:
        response = self.client.post("/graphql", json={"query": query, "variables": variables or {}},
                                    auth=SigningAuth(self.key, offer_public_key=enrolling), timeout=timeout)
        try:
            body = response.json()
        except ValueError:
            status = response.status_code
            raise GatewayError(f"gateway answered {status} without JSON", status=status) from None
        errors = body.get("errors") if isinstance(body, dict) else None
        if response.status_code >= 400 or errors:
            first = (errors or [{}])[0]
            raise gateway_error(first.get("message", f"HTTP {response.status_code}"), status=response.status_code,
                               code=(first.get("extensions") or {}).get("code"))
        return body["data"]

    def enroll(self, token: str, labels: list[str], *, expected_fingerprint: str | None = None) -> Enrollment:
        """Enroll this key; pin the control plane's key (checked against a fingerprint given at install)."""
        data = self.execute(operations.ENROLL, {"token": token, "publicKey": self.key.public_pem(), "labels": labels},
                            enrolling=True)["enrollAgent"]
        key = load_public_key(data["controlPlaneKey"])
        if key_id_of(key) != data["controlPlaneKeyId"]:
            raise GatewayError("the control plane's key does not match its own key id")
        if expected_fingerprint and key_id_of(key) != expected_fingerprint:
            raise GatewayError(f"control plane key {key_id_of(key)} is not the expected {expected_fingerprint}")
        self.pinned = key
        return Enrollment(data["agentId"], data["deployment"], data["controlPlaneKey"], data["controlPlaneKeyId"])

    def claim_work(self, queues: list[str], *, wait_seconds: int = 25, limit: int = 16) -> list[SignedWork]:
        """Long poll; returns only work whose control-plane signature verifies (the rest is logged, dropped)."""
        data = self.execute(operations.CLAIM_WORK, {"queues": queues, "waitSeconds": wait_seconds, "limit": limit},
                            timeout=wait_seconds + 15)
        accepted = []
        for raw in data["claimWork"]:
            try:
                accepted.append(self.verify_work(raw))
            except SignatureError as exc:
                log.error("refusing work %s (%s): %s", raw.get("id"), raw.get("kind"), exc)
        return accepted

    def verify_work(self, raw: dict[str, Any]) -> SignedWork:
        if self.pinned is None:
            raise SignatureError("unknown-key", "no control-plane key is pinned; enroll first")
        if raw["signedBy"] != key_id_of(self.pinned):
            raise SignatureError("unknown-key", f"work signed by {raw['signedBy']}, not the pinned control-plane key")
        verify_bytes(self.pinned, work_signing_bytes(raw["id"], raw["kind"], raw["queue"], raw["payload"]),
                     raw["signature"])
        return SignedWork(id=raw["id"], kind=WorkKind(raw["kind"]), queue=raw["queue"], payload=raw["payload"],
                          attempt=raw["attempt"], signature=raw["signature"], signed_by=raw["signedBy"])

    def post_results(self, results: list[dict[str, Any]]) -> int:
        return self.execute(operations.POST_RESULTS, {"results": results})["postResults"]

    def heartbeat(self, locations: list[dict[str, Any]], running_containers: int,
                  runs: list[dict[str, Any]] | None = None) -> bool:
        variables = {"input": {"locations": locations, "runningContainers": running_containers, "runs": runs or []}}
        return self.execute(operations.HEARTBEAT, variables)["heartbeat"]

    def storage_write(self, run_id: str, location: str, writes: list[dict[str, Any]]) -> dict[str, Any]:
        variables = {"runId": run_id, "location": location, "writes": writes}
        return self.execute(operations.STORAGE_WRITE, variables, timeout=120.0)["storageWrite"]

    def storage_call(self, run_id: str, location: str, call: dict[str, Any]) -> dict[str, Any]:
        variables = {"runId": run_id, "location": location, "call": call}
        return self.execute(operations.STORAGE_CALL, variables, timeout=120.0)["storageCall"]

    def whoami(self) -> dict[str, Any]:
        return self.execute(operations.WHOAMI)["agent"]

    def rotate_key(self, agent_id: str, new_key: SigningKey) -> dict[str, Any]:
        """Register `new_key` in place of the key this client signs with (which must be the current one)."""
        proof = new_key.sign_bytes(rotation_message(agent_id, self.key.key_id, new_key.key_id))
        variables = {"publicKey": new_key.public_pem(), "proof": proof}
        return self.execute(operations.ROTATE_KEY, variables)["rotateAgentKey"]


def result_payload(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
