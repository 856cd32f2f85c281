"""The bundle manifest (what is inside, by sha256) and its detached Ed25519 signature.

The signature covers the exact bytes of manifest.json as stored in the bundle; the importer verifies those
bytes first and parses only what verified, so nothing unsigned ever reaches a decision.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.bundle.errors import BundleError
from protocol.errors import SignatureError
from protocol.keys import SigningKey, key_id_of, verify_bytes

FORMAT_VERSION = 1
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES = 1 << 20, 4096
ROLES = ("platform", "usercode")  # usercode images go into the digest allowlist on import; platform ones do not
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TAG = re.compile(r"[a-z0-9][a-z0-9._/-]{0,200}:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ImageEntry:
    """One image: its `docker save` tar is `file` in the bundle, `sha256`/`size` of exactly those bytes."""

    name: str
    role: str
    image_id: str
    tags: tuple[str, ...]
    file: str
    sha256: str
    size: int
    created: str = ""


@dataclass(frozen=True)
class Manifest:
    format: int
    airlock_version: str
    created: str
    images: tuple[ImageEntry, ...]

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["images"] = [{**image, "tags": list(image["tags"])} for image in data["images"]]
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse and validate; every problem is a BundleError("manifest", ...) naming the field."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError("manifest", f"{MANIFEST} is not valid JSON: {exc}") from None
        top = _Obj(data, MANIFEST, {"format", "airlock_version", "created", "images"})
        if top.get("format", int) != FORMAT_VERSION:
            raise BundleError("manifest", f"{MANIFEST}: format {data['format']!r} is not {FORMAT_VERSION}; "
                                          "this airlock cannot read it")
        images = top.get("images", list)
        if not images:
            raise BundleError("manifest", f"{MANIFEST}: images: the bundle lists no image")
        entries = tuple(_entry(item, f"{MANIFEST}: images[{i}]") for i, item in enumerate(images))
        for attr in ("name", "file", "image_id"):
            values = [getattr(e, attr) for e in entries]
            if len(set(values)) != len(values):
                raise BundleError("manifest", f"{MANIFEST}: images: two entries share a {attr}")
        return cls(format=FORMAT_VERSION, airlock_version=top.get("airlock_version", str),
                   created=top.get("created", str), images=entries)


class _Obj:
    """A JSON object whose keys are exactly `known`; typed reads with errors naming the field."""

    def __init__(self, data: Any, where: str, known: set[str], optional: frozenset[str] = frozenset()) -> None:
        if not isinstance(data, dict):
            raise BundleError("manifest", f"{where}: must be an object")
        missing, unknown = known - optional - data.keys(), data.keys() - known
        if missing or unknown:
            field = sorted(missing or unknown)[0]
            raise BundleError("manifest", f"{where}: {field}: {'is required' if missing else 'unknown field'}")
        self.data, self.where = data, where

    def get(self, key: str, kind: type, pattern: re.Pattern[str] | None = None) -> Any:
        value = self.data.get(key, "" if kind is str else None)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BundleError("manifest", f"{self.where}: {key}: must be a {kind.__name__}")
        if pattern is not None and not pattern.fullmatch(value):
            raise BundleError("manifest", f"{self.where}: {key}: {value!r} does not match {pattern.pattern}")
        return value


def _entry(item: Any, where: str) -> ImageEntry:
    o = _Obj(item, where, {"name", "role", "image_id", "tags", "file", "sha256", "size", "created"},
             optional=frozenset({"created"}))
    name = o.get("name", str, _NAME)
    file = o.get("file", str)
    if file != f"images/{name}.tar":
        raise BundleError("manifest", f"{where}: file: must be 'images/{name}.tar', got {file!r}")
    role = o.get("role", str)
    if role not in ROLES:
        raise BundleError("manifest", f"{where}: role: must be one of {', '.join(ROLES)}, got {role!r}")
    tags = o.get("tags", list)
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise BundleError("manifest", f"{where}: tags[{i}]: {tag!r} is not 'repository:tag'")
    size = o.get("size", int)
    if size <= 0:
        raise BundleError("manifest", f"{where}: size: must be positive, got {size}")
    return ImageEntry(name=name, role=role, image_id=o.get("image_id", str, _DIGEST), tags=tuple(tags), file=file,
                      sha256=o.get("sha256", str, _HEX), size=size, created=o.get("created", str))


def sign_manifest(raw: bytes, key: SigningKey) -> bytes:
    """manifest.sig: the signer's key id and a base64 Ed25519 signature over the exact manifest bytes."""
    return (json.dumps({"key_id": key.key_id, "signature": key.sign_bytes(raw)}, indent=2) + "\n").encode()


def verify_manifest(raw: bytes, signature: bytes, trusted: Ed25519PublicKey) -> str:
    """Raise BundleError("signature", ...) unless `signature` is the trusted key's over `raw`; return its key id."""
    trusted_id = key_id_of(trusted)
    try:
        sig = json.loads(signature)
        key_id, value = sig["key_id"], sig["signature"]
        if not isinstance(key_id, str) or not isinstance(value, str) or set(sig) != {"key_id", "signature"}:
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise BundleError("signature", f"{SIGNATURE} is malformed (expected key_id and signature)") from None
    if key_id != trusted_id:
        raise BundleError("signature", f"{SIGNATURE}: the signature is by key {key_id[:60]!r}, not by the trusted "
                                       f"key {trusted_id}")
    try:
        verify_bytes(trusted, raw, value)
    except SignatureError:
        raise BundleError("signature", f"{SIGNATURE}: the signature over {MANIFEST} does not verify: the manifest "
                                       f"was changed or the signature is not by the trusted key {trusted_id}") from None
    return trusted_id
