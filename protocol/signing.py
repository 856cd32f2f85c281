"""RFC 9421 request signatures (Ed25519, RFC 9530 Content-Digest) for every appliance -> control plane call.

The signature base is built and checked by `http-message-signatures`, never by hand: the signer uses its
prepare/apply split so the private key stays inside `SigningKey`, and the verifier trusts only what the
library's `verify()` reports as covered. Around it airlock adds the policy the library leaves to callers:
one label ("airlock"), a fixed covered set, a clock-skew window on an injectable clock, and a nonce cache.

`RequestVerifier.verify` runs every stateless check first and touches the nonce cache only after the
signature and the body digest verified, so an unsigned or forged request cannot burn a nonce.
"""

from __future__ import annotations

import datetime
import heapq
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import http_sf
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from http_message_signatures import ContentDigest, HTTPMessageSigner, HTTPMessageVerifier, MappingKeyResolver
from http_message_signatures.algorithms import ED25519
from http_message_signatures.exceptions import HTTPMessageSignaturesException
from http_message_signatures.structures import get_header_fields

from protocol.errors import SignatureError
from protocol.keys import SigningKey, key_id_of, load_public_key, verify_bytes

__all__ = [
    "COVERED",
    "LABEL",
    "NonceCache",
    "RequestVerifier",
    "SignatureError",
    "SigningKey",
    "Verified",
    "key_id_of",
    "load_public_key",
    "sign_request",
    "verify_bytes",
]

COVERED = ("@method", "@path", "@query", "content-digest")
LABEL = "airlock"
# On enrollAgent only: base64 of the raw Ed25519 public key being enrolled (its key id must be the keyid).
ENROLL_KEY_HEADER = "x-airlock-public-key"
ALGORITHM = ED25519
_METADATA = frozenset({"alg", "created", "expires", "keyid", "nonce", "tag"})
_MAX_KEYID, _MAX_NONCE = 256, 128  # untrusted strings that end up in the nonce cache: keep them small
# @authority is not covered, so an origin-form URL ("/agent/graphql?x=1") is given a placeholder origin.
_PLACEHOLDER_ORIGIN = "https://airlock.invalid"


@dataclass(frozen=True)
class Verified:
    """What a verified request proves: which key signed it, when, and with which (now consumed) nonce."""

    key_id: str
    created: int
    nonce: str


@dataclass
class _Request:
    """The minimal request view the library reads: uppercase method, encoded URL, header container."""

    method: str
    url: str
    headers: Any


class _FieldLines:
    """Read-only headers that keep repeated field lines, as the library's verifier expects from `.items()`."""

    def __init__(self, lines: list[tuple[str, str]]) -> None:
        self._lines = lines

    def items(self) -> Iterable[tuple[str, str]]:
        return iter(self._lines)


class _Verifier(HTTPMessageVerifier):
    """The library verifier minus its wall-clock check: RequestVerifier applies the one skew policy itself,
    on its injectable clock, before the library runs, so two clocks can never disagree about a request."""

    def validate_created_and_expires(self, sig_input: Any, max_age: Any = None) -> None:
        return None


def _absolute(url: str) -> str:
    return _PLACEHOLDER_ORIGIN + url if url.startswith("/") else url


def sign_request(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    key: SigningKey,
    *,
    nonce: str | None = None,
    created: int | None = None,
) -> dict[str, str]:
    """Return the headers to add, named in lowercase: content-digest (sha-256), signature-input, signature.

    Any Content-Digest or Signature* already in `headers` is ignored and superseded by the returned ones.
    `url` is the encoded URL as sent (absolute, or origin-form starting with "/").
    """
    skip = {"content-digest", "signature", "signature-input"}
    view = _Request(method, _absolute(url), {k: v for k, v in headers.items() if k.lower() not in skip})
    when = int(time.time()) if created is None else created
    signer = HTTPMessageSigner(signature_algorithm=ALGORITHM)
    try:
        prepared = signer.prepare(
            view,
            key_id=key.key_id,
            created=datetime.datetime.fromtimestamp(when, tz=datetime.UTC),
            nonce=secrets.token_urlsafe(16) if nonce is None else nonce,
            label=LABEL,
            covered_component_ids=COVERED,
            body=body,
        )
        signer.apply(view, prepared, key.sign_raw(prepared.signature_base))
    except (HTTPMessageSignaturesException, ValueError, TypeError, OverflowError) as exc:
        raise SignatureError("malformed", f"cannot sign {method} {url}: {exc}") from exc
    # Lowercase names, as HTTP/2 and ASGI carry them, so `headers | added` replaces rather than duplicates.
    return {name.lower(): view.headers[name] for name in ("Content-Digest", "Signature-Input", "Signature")}


class NonceCache:
    """Nonces seen per key, kept until their request would be refused as expired anyway.

    An entry lives until `created + window_seconds`, so with window >= the verifier's skew a replay is
    caught for as long as its timestamp would still pass. Memory is bounded: when full, the entry closest
    to expiry (the oldest `created`) is evicted. Thread-safe, since a gateway may verify concurrently.
    """

    def __init__(
        self, window_seconds: float = 300, max_entries: int = 100_000, clock: Callable[[], float] = time.time
    ) -> None:
        if window_seconds <= 0 or max_entries <= 0:
            raise ValueError("NonceCache needs window_seconds > 0 and max_entries > 0")
        self.window_seconds = window_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._expiry: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []  # same entries as _expiry, soonest expiry first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def check_and_add(self, key_id: str, nonce: str, created: int) -> bool:
        """Record the nonce and return True; False if it was already seen (a replay) or is too old to track."""
        entry = (key_id, nonce)
        expires_at = created + self.window_seconds
        with self._lock:
            now = self._clock()
            while self._heap and self._heap[0][0] < now:
                del self._expiry[heapq.heappop(self._heap)[1]]
            if entry in self._expiry or expires_at < now:
                return False  # fail closed: a nonce older than the window cannot be proven fresh
            while len(self._expiry) >= self.max_entries:
                del self._expiry[heapq.heappop(self._heap)[1]]
            self._expiry[entry] = expires_at
            heapq.heappush(self._heap, (expires_at, entry))
            return True


def _parse_dictionary(fields: Mapping[str, str], name: str) -> dict[str, Any]:
    def reject_duplicate(key: str, context: str) -> None:
        if context == "dictionary":
            raise ValueError(f"duplicate member {key!r}")

    try:
        parsed = http_sf.parse(fields[name].encode(), tltype="dictionary", on_duplicate_key=reject_duplicate)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise SignatureError("malformed", f"{name} is not a valid structured-field dictionary: {exc}") from exc
    return parsed  # type: ignore[return-value]


class RequestVerifier:
    """Verify a signed request for the gateway; returns `Verified` or raises SignatureError with a reason."""

    def __init__(
        self,
        resolve_key: Callable[[str], Ed25519PublicKey | None],
        nonces: NonceCache,
        max_skew_seconds: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if nonces.window_seconds < max_skew_seconds:
            raise ValueError(
                f"nonce window {nonces.window_seconds}s is shorter than the clock skew {max_skew_seconds}s: "
                "a request could be replayed after its nonce was forgotten but before it expired"
            )
        self._resolve_key = resolve_key
        self._nonces = nonces
        self._max_skew = max_skew_seconds
        self._clock = clock

    def verify(
        self, method: str, url: str, headers: list[tuple[str, str]] | Mapping[str, str], body: bytes
    ) -> Verified:
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        view = _Request(method, _absolute(url), _FieldLines([(_text(name), _text(value)) for name, value in pairs]))
        fields = get_header_fields(view.headers)  # the library's own view of the fields, combined the same way
        if "signature" not in fields or "signature-input" not in fields:
            raise SignatureError("unsigned", "request is not signed (no Signature / Signature-Input header)")
        key_id, created, nonce, expires = self._check_input(fields)
        self._check_time(created, expires)
        self._check_digest(fields, body)
        public_key = self._resolve_key(key_id)
        if public_key is None:
            raise SignatureError("unknown-key", f"key {key_id} is not registered or was revoked")

        verifier = _Verifier(
            signature_algorithm=ALGORITHM,
            key_resolver=MappingKeyResolver(public_keys={key_id: public_key}, private_keys={}),
        )
        try:
            results = verifier.verify(view, max_age=None, require_components=COVERED)
        except (HTTPMessageSignaturesException, ValueError, TypeError) as exc:
            detail = str(exc) or "wrong key, or the method, path, query or Content-Digest changed after signing"
            raise SignatureError("bad-signature", f"signature by {key_id} does not verify: {detail}") from exc
        try:
            results = verifier.verify_body(view, results, body)
        except (HTTPMessageSignaturesException, ValueError, TypeError) as exc:
            raise SignatureError("digest-mismatch", f"body does not match the signed Content-Digest: {exc}") from exc

        # From here on only what the library verified counts: its covered components and signed parameters.
        result = results[0]
        proven = tuple(result.parameters.get(name) for name in ("keyid", "created", "nonce"))
        covered = all(f'"{component}"' in result.covered_components for component in COVERED)
        if result.label != LABEL or result.body is None or not covered or proven != (key_id, created, nonce):
            raise SignatureError("bad-signature", "the verified signature does not bind this request and body")

        if not self._nonces.check_and_add(key_id, nonce, created):
            raise SignatureError("replayed", f"nonce {nonce!r} was already used by key {key_id}")
        return Verified(key_id=key_id, created=created, nonce=nonce)

    def _check_input(self, fields: Mapping[str, str]) -> tuple[str, int, str, int | None]:
        """Structure of Signature-Input / Signature: one label "airlock", required parameters and coverage."""
        inputs, signatures = _parse_dictionary(fields, "Signature-Input"), _parse_dictionary(fields, "Signature")
        if set(inputs) != {LABEL} or set(signatures) != {LABEL}:
            raise SignatureError("malformed", f"expected one signature labelled {LABEL!r}, got {sorted(inputs)}")
        components, params = inputs[LABEL]
        if not isinstance(components, list) or not isinstance(signatures[LABEL][0], bytes):
            raise SignatureError("malformed", "Signature-Input must be an inner list and Signature a byte sequence")
        unknown = set(params) - _METADATA
        if unknown:
            raise SignatureError("malformed", f"unexpected signature parameters: {', '.join(sorted(unknown))}")
        key_id, nonce, created = params.get("keyid"), params.get("nonce"), params.get("created")
        if not isinstance(key_id, str) or not 0 < len(key_id) <= _MAX_KEYID:
            raise SignatureError("malformed", "signature has no usable 'keyid' parameter")
        if not isinstance(nonce, str) or not 0 < len(nonce) <= _MAX_NONCE:
            raise SignatureError("malformed", f"signature has no usable 'nonce' parameter (1..{_MAX_NONCE} characters)")
        if type(created) is not int:
            raise SignatureError("malformed", "signature has no integer 'created' parameter")
        expires = params.get("expires")
        if expires is not None and type(expires) is not int:
            raise SignatureError("malformed", "signature 'expires' parameter is not an integer")
        if params.get("alg", ALGORITHM.algorithm_id) != ALGORITHM.algorithm_id:
            raise SignatureError("malformed", f"signature algorithm {params['alg']!r} is not 'ed25519'")
        plain = {value for value, item_params in components if not item_params}
        missing = [component for component in COVERED if component not in plain]
        if missing:
            raise SignatureError(
                "malformed", f"signature does not cover {', '.join(missing)} (required: {', '.join(COVERED)})"
            )
        return key_id, created, nonce, expires

    @staticmethod
    def _check_digest(fields: Mapping[str, str], body: bytes) -> None:
        """Body against the Content-Digest header, before any crypto; verify_body re-checks the signed value."""
        if "content-digest" not in fields:
            raise SignatureError("digest-mismatch", "no Content-Digest header: the body is not bound to the signature")
        try:
            ContentDigest.verify(fields["content-digest"], body)
        except (HTTPMessageSignaturesException, ValueError, TypeError) as exc:
            raise SignatureError("digest-mismatch", f"body does not match its Content-Digest: {exc}") from exc

    def _check_time(self, created: int, expires: int | None) -> None:
        now = self._clock()
        if created < now - self._max_skew:
            raise SignatureError("expired", f"signature created {int(now - created)}s ago (limit {self._max_skew}s)")
        if created > now + self._max_skew:
            raise SignatureError("future", f"signature created {int(created - now)}s ahead (limit {self._max_skew}s)")
        if expires is not None and expires < now:
            raise SignatureError("expired", f"signature expired {int(now - expires)}s ago")


def _text(value: str | bytes) -> str:
    """ASGI hands headers over as bytes; decode them as the wire bytes they are (Latin-1)."""
    return value.decode("latin-1") if isinstance(value, bytes) else value
