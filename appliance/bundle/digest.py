"""sha256 and size of a byte stream, computed as it passes through (and shown on a progress bar)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from appliance.bundle.progress import Progress


class Digest:
    def __init__(self, progress: Progress | None = None) -> None:
        self._sha = hashlib.sha256()
        self.size = 0
        self.progress = progress

    def update(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        self.size += len(chunk)
        if self.progress is not None:
            self.progress.update(len(chunk))

    def wrap(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.update(chunk)
            yield chunk
        if self.progress is not None:
            self.progress.close()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()
