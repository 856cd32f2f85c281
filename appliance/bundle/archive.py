"""The bundle's container: one uncompressed tar with manifest.json, manifest.sig and images/<name>.tar.

Writing streams each image straight into the tar: its header is written with size 0, the data follows,
then the header is rewritten with the real size (GNU headers are 512 bytes for any size), so a
gigabyte of `docker save` output is written once, never staged. Reading never extracts to disk: members
are only listed, checked by name and type, and read as streams.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from appliance.bundle.errors import BundleError
from appliance.bundle.manifest import MANIFEST, SIGNATURE

BLOCK = 512
CHUNK = 1 << 20
_IMAGE_MEMBER = re.compile(r"images/[a-z0-9][a-z0-9._-]{0,63}\.tar")


def _header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    if len(header) != BLOCK:
        raise BundleError("member", f"member name {name!r} is too long for the bundle format")
    return header


def _pad(out: BinaryIO, size: int) -> None:
    out.write(b"\0" * (-size % BLOCK))


class Writer:
    """Appends members to an open, seekable file; `close` writes the end-of-archive blocks."""

    def __init__(self, out: BinaryIO, mtime: int) -> None:
        self.out, self.mtime = out, mtime

    def add_bytes(self, name: str, data: bytes) -> None:
        self.out.write(_header(name, len(data), self.mtime))
        self.out.write(data)
        _pad(self.out, len(data))

    def add_stream(self, name: str, chunks: Iterable[bytes]) -> int:
        """Write a member of unknown size; returns the size."""
        start = self.out.tell()
        self.out.write(_header(name, 0, self.mtime))
        size = 0
        for chunk in chunks:
            self.out.write(chunk)
            size += len(chunk)
        _pad(self.out, size)
        end = self.out.tell()
        self.out.seek(start)
        self.out.write(_header(name, size, self.mtime))
        self.out.seek(end)
        return size

    def close(self) -> None:
        self.out.write(b"\0" * (2 * BLOCK))
        self.out.flush()
        os.fsync(self.out.fileno())


class Reader:
    """An opened bundle: its members by name, checked to be regular files with expected names, no duplicates."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            self.tar = tarfile.open(self.path, mode="r:")  # noqa: SIM115 - held open; closed by close()/__exit__
        except (OSError, tarfile.TarError) as exc:
            raise BundleError("member", f"{self.path} is not a readable bundle (an uncompressed tar): {exc}") from None
        try:
            self.members = self._check(self.tar)
        except BaseException:
            self.tar.close()
            raise

    def _check(self, tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
        try:
            listed = tar.getmembers()
        except (OSError, tarfile.TarError) as exc:
            raise BundleError("member", f"{self.path} is not a readable bundle (an uncompressed tar): {exc}") from None
        members: dict[str, tarfile.TarInfo] = {}
        for member in listed:
            if member.name in members:
                raise BundleError("member", f"{self.path}: member {member.name!r} appears twice")
            if member.name not in (MANIFEST, SIGNATURE) and not _IMAGE_MEMBER.fullmatch(member.name):
                raise BundleError("member", f"{self.path}: unexpected member {member.name[:200]!r} (a bundle holds "
                                            f"only {MANIFEST}, {SIGNATURE} and images/<name>.tar)")
            if not member.isreg():
                raise BundleError("member", f"{self.path}: member {member.name!r} is not a regular file")
            members[member.name] = member
        return members

    def read_small(self, name: str, limit: int) -> bytes:
        member = self._member(name)
        if member.size > limit:
            raise BundleError("member", f"{self.path}: {name} is {member.size} bytes; more than {limit} is refused")
        with self._open(member) as f:
            return f.read()

    def stream(self, name: str) -> Iterator[bytes]:
        try:
            with self._open(self._member(name)) as f:
                while chunk := f.read(CHUNK):
                    yield chunk
        except (OSError, tarfile.TarError) as exc:
            raise BundleError("member", f"{self.path}: {name} cannot be read (truncated bundle?): {exc}") from None

    def size(self, name: str) -> int:
        return self._member(name).size

    def _member(self, name: str) -> tarfile.TarInfo:
        try:
            return self.members[name]
        except KeyError:
            raise BundleError("member", f"{self.path}: {name} is missing from the bundle") from None

    def _open(self, member: tarfile.TarInfo) -> BinaryIO:
        f = self.tar.extractfile(member)
        if f is None:  # pragma: no cover - isreg() was checked
            raise BundleError("member", f"{self.path}: {member.name} cannot be read")
        return f

    def close(self) -> None:
        self.tar.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
