"""Check a bundle completely before anything is loaded: members, signature, then every image's size and sha256.

Order matters: the manifest's signature is checked against the trusted key before the manifest is parsed,
and every image is hashed before the first `docker load`, so a bundle with one bad byte anywhere loads
nothing. Reading the bundle again for the load is guarded too (see load.py): it is re-hashed on the way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.bundle.archive import Reader
from appliance.bundle.digest import Digest
from appliance.bundle.errors import BundleError
from appliance.bundle.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE,
    Manifest,
    verify_manifest,
)
from appliance.bundle.progress import Progress
from protocol.errors import SignatureError
from protocol.keys import load_public_key


@dataclass(frozen=True)
class Verified:
    """A bundle whose every byte matched its signed manifest when it was read."""

    path: str
    manifest: Manifest
    manifest_sha256: str
    key_id: str


def load_trust_key(path: str | Path) -> Ed25519PublicKey:
    try:
        return load_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise BundleError("key", f"cannot read the trusted key {path}: {exc.strerror or exc}") from None
    except SignatureError as exc:
        raise BundleError("key", f"trusted key {path}: {exc}") from None


def verify_bundle(path: str | Path, trusted: Ed25519PublicKey, stream: TextIO | None = None) -> Verified:
    with Reader(path) as bundle:
        raw = bundle.read_small(MANIFEST, MAX_MANIFEST_BYTES)
        key_id = verify_manifest(raw, bundle.read_small(SIGNATURE, MAX_SIGNATURE_BYTES), trusted)
        manifest = Manifest.from_bytes(raw)
        listed = {image.file for image in manifest.images}
        present = set(bundle.members) - {MANIFEST, SIGNATURE}
        for name in sorted(listed - present):
            raise BundleError("member", f"{bundle.path}: {name} is listed in the manifest but missing")
        for name in sorted(present - listed):
            raise BundleError("member", f"{bundle.path}: unexpected member {name} (not in the manifest)")
        for image in manifest.images:
            if bundle.size(image.file) != image.size:
                raise BundleError("size", f"{image.file}: {bundle.size(image.file)} bytes, but the manifest "
                                          f"says {image.size}")
        for image in manifest.images:
            digest = Digest(Progress(f"verify {image.file}", image.size, stream))
            for _ in digest.wrap(bundle.stream(image.file)):
                pass
            check_digest(image.file, digest, image.sha256, image.size)
    return Verified(path=str(path), manifest=manifest, manifest_sha256=hashlib.sha256(raw).hexdigest(),
                    key_id=key_id)


def check_digest(file: str, digest: Digest, sha256: str, size: int) -> None:
    if digest.size != size:
        raise BundleError("size", f"{file}: read {digest.size} bytes, but the manifest says {size}")
    if digest.hexdigest() != sha256:
        raise BundleError("digest", f"{file}: sha256 {digest.hexdigest()} differs from the manifest's {sha256}: "
                                    "the image was changed after it was signed")
