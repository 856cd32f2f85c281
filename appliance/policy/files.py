"""Reading one policy file from disk into Fields: the I/O half of protocol.fields.yaml_fields."""

from __future__ import annotations

from pathlib import Path

from protocol.errors import PolicyError
from protocol.fields import Fields, yaml_fields


def file_stamp(path: Path) -> object:
    """What changes when a file is replaced or edited (inode, size, times), or why it cannot be read: readers
    that stat on every decision compare stamps and re-read only on a change (egress routes, operator images)."""
    try:
        st = path.stat()
    except OSError as exc:
        return ("unreadable", exc.errno)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_yaml(path: Path) -> Fields:
    """The file's fields, its `version:` checked; an unreadable or invalid file raises PolicyError naming it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    return yaml_fields(text, str(path))
