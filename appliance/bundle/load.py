"""`airlock bundle import`, after verification: load each image, check its id, tag it, extend the allowlist.

Each image is streamed into `docker load` from the bundle and hashed again on the way; the last chunk is
held back until the hash matches, so a bundle changed between verification and load is cut off mid-stream
and the engine loads nothing from it (an unterminated chunked upload is an error, not an end of file).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from appliance.bundle.archive import Reader
from appliance.bundle.digest import Digest
from appliance.bundle.engine import Engine
from appliance.bundle.errors import BundleError
from appliance.bundle.manifest import ImageEntry
from appliance.bundle.progress import Progress
from appliance.bundle.verify import Verified, check_digest
from appliance.policy.imported import ImportedImage, check_writable, write_imported
from protocol.errors import PolicyError


@dataclass(frozen=True)
class Loaded:
    image: ImageEntry
    allowlisted: bool


def preflight(allowlist: Path | None) -> None:
    """What must hold before the first load, so an import does not stop half-way on a file it could have read."""
    if allowlist is None:
        return
    try:
        check_writable(allowlist)
    except PolicyError as exc:
        raise BundleError("allowlist", f"digest allowlist: {exc}") from None


def load_verified(verified: Verified, engine: Engine, allowlist: Path | None,
                  stream: TextIO | None = None) -> list[Loaded]:
    preflight(allowlist)
    loaded: list[Loaded] = []
    with Reader(verified.path) as bundle:
        for image in verified.manifest.images:
            existed = engine.inspect(image.image_id) is not None
            checked = _Checked(bundle, image, Progress(f"load {image.file}", image.size, stream))
            try:
                ids = engine.load(checked.chunks())
            except Exception:
                if checked.error is not None:
                    raise checked.error from None
                raise
            if checked.error is not None:  # pragma: no cover - the engine swallowed the broken stream
                raise checked.error
            if image.image_id not in ids:
                if not existed:
                    for other in ids:
                        engine.remove(other)
                raise BundleError("load", f"{image.file}: docker loaded {', '.join(ids) or 'nothing'}, not the "
                                          f"manifest's image id {image.image_id}")
            for tag in image.tags:
                engine.tag(image.image_id, tag)
            loaded.append(Loaded(image=image, allowlisted=allowlist is not None and image.role == "usercode"))
    if allowlist is not None:
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        try:
            write_imported(allowlist, [
                ImportedImage(digest=item.image.image_id, tags=item.image.tags, bundle=verified.manifest_sha256,
                              signed_by=verified.key_id, imported=now)
                for item in loaded if item.allowlisted
            ])
        except PolicyError as exc:
            raise BundleError("allowlist", f"images loaded, but the digest allowlist was not written: {exc}") from None
    return loaded


class _Checked:
    """The image's bytes from the bundle, re-hashed; the final chunk is released only if the hash matches."""

    def __init__(self, bundle: Reader, image: ImageEntry, progress: Progress) -> None:
        self.bundle, self.image, self.progress = bundle, image, progress
        self.error: BundleError | None = None

    def chunks(self) -> Iterator[bytes]:
        digest = Digest(self.progress)
        held: bytes | None = None
        for chunk in self.bundle.stream(self.image.file):
            digest.update(chunk)
            if held is not None:
                yield held
            held = chunk
        self.progress.close()
        try:
            check_digest(self.image.file, digest, self.image.sha256, self.image.size)
        except BundleError as exc:
            self.error = BundleError(exc.what, f"{exc.message} (changed after verification; load cut off)")
            raise self.error from None
        if held is not None:
            yield held
