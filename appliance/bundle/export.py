"""`airlock bundle export`: docker save each image into one signed bundle, hashing as it streams to disk."""

from __future__ import annotations

import contextlib
import datetime
import os
from importlib import metadata
from pathlib import Path
from typing import TextIO

from appliance.bundle.archive import Writer
from appliance.bundle.digest import Digest
from appliance.bundle.engine import Engine
from appliance.bundle.errors import BundleError
from appliance.bundle.manifest import FORMAT_VERSION, MANIFEST, SIGNATURE, ImageEntry, Manifest, sign_manifest
from appliance.bundle.progress import Progress
from protocol.keys import SigningKey

DEFAULT_IMAGES = ("airlock/appliance:latest", "airlock/controlplane:latest", "airlock/usercode-base:latest")
# Images the appliance and control plane run as themselves; every other image is user code and goes into
# the digest allowlist on import.
PLATFORM_REPOSITORIES = frozenset({"airlock/appliance", "airlock/controlplane"})


def airlock_version() -> str:
    try:
        return metadata.version("airlock")
    except metadata.PackageNotFoundError:
        return "unknown"


def repository(ref: str) -> str:
    last = ref.rsplit("/", 1)[-1]
    return ref.rsplit(":", 1)[0] if ":" in last else ref


def export_bundle(engine: Engine, refs: list[str], out: Path, key: SigningKey,
                  stream: TextIO | None = None) -> Manifest:
    """Write `out` (via a temp file renamed at the end, so a failed export leaves nothing that looks whole)."""
    infos = []
    for ref in refs:
        info = engine.inspect(ref)
        if info is None:
            raise BundleError("docker", f"image {ref} is not in this engine (build it first: python3 images/build.py)")
        if info.image_id not in {i.image_id for _, i in infos}:
            infos.append((ref, info))
    created = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    tmp = out.with_name(f".{out.name}.partial")
    entries: list[ImageEntry] = []
    names: set[str] = set()
    try:
        with open(tmp, "wb") as f:
            writer = Writer(f, int(created.timestamp()))
            for ref, info in infos:
                name = _unique(repository(ref).rsplit("/", 1)[-1].lower(), names)
                file = f"images/{name}.tar"
                digest = Digest(Progress(f"save {ref}", info.size, stream))
                writer.add_stream(file, digest.wrap(engine.save(info.image_id)))
                tags = tuple(sorted({*info.tags, ref} if ":" in ref.rsplit("/", 1)[-1] else info.tags))
                entries.append(ImageEntry(
                    name=name, role="platform" if repository(ref) in PLATFORM_REPOSITORIES else "usercode",
                    image_id=info.image_id, tags=tags, file=file, sha256=digest.hexdigest(),
                    size=digest.size, created=info.created,
                ))
            manifest = Manifest(format=FORMAT_VERSION, airlock_version=airlock_version(),
                                created=created.isoformat().replace("+00:00", "Z"), images=tuple(entries))
            raw = manifest.to_bytes()
            writer.add_bytes(MANIFEST, raw)
            writer.add_bytes(SIGNATURE, sign_manifest(raw, key))
            writer.close()
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return manifest


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate)
    return candidate

