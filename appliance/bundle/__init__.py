"""Air-gapped bundles: the airlock images in one signed file, verified completely before anything is loaded.

A bundle is one uncompressed tar::

    images/<name>.tar   `docker save` of one image (by id; tags are restored from the manifest)
    manifest.json       format, airlock version, created; per image: name, role, image id, tags, file,
                        sha256 and size of that file
    manifest.sig        {"key_id": ..., "signature": base64 Ed25519 over the exact manifest.json bytes}

`export_bundle` writes one; `verify_bundle` checks signature, members, sizes and sha256s without Docker;
`load_verified` loads, checks each loaded image id, tags, and adds the user-code images' ids to
images-imported.yaml (the digest allowlist the policy loader merges).
"""

from appliance.bundle.engine import DockerEngine, Engine, ImageInfo
from appliance.bundle.errors import BundleError
from appliance.bundle.export import DEFAULT_IMAGES, export_bundle
from appliance.bundle.load import Loaded, load_verified, preflight
from appliance.bundle.manifest import ImageEntry, Manifest
from appliance.bundle.verify import Verified, load_trust_key, verify_bundle

__all__ = [
    "DEFAULT_IMAGES",
    "BundleError",
    "DockerEngine",
    "Engine",
    "ImageEntry",
    "ImageInfo",
    "Loaded",
    "Manifest",
    "Verified",
    "export_bundle",
    "load_trust_key",
    "load_verified",
    "preflight",
    "verify_bundle",
]
