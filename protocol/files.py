"""One atomic file write for both sides: a reader sees the old file or the new one, never half of either.

The temp file is made by mkstemp in the target's directory (same filesystem, so the rename is atomic, and a
unique name, so two writers never share one), its mode is pinned with fchmod before any byte is written (a key
is never briefly readable), the data is fsynced before the rename and the directory after it (a crash leaves
the old file or the new one, not an empty one). The only file I/O in protocol/: both sides write state files.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["fsync_dir", "write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o644, group: int | None = None,
                 durable: bool = True) -> None:
    """Replace `path` with `data`. `group`: a gid the file is given (the reader's group); `durable=False` skips
    the fsyncs for state that is rewritten every few seconds anyway (the agent's status file)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            if group is not None and os.fstat(handle.fileno()).st_gid != group:
                os.fchown(handle.fileno(), -1, group)
            handle.write(data.encode() if isinstance(data, str) else data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(target.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` survive a crash."""
    with contextlib.suppress(OSError):  # some filesystems refuse a directory fsync; the rename still happened
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
