"""Reading one policy file from disk into Fields: the I/O half of protocol.fields.yaml_fields."""

from __future__ import annotations

from pathlib import Path

from protocol.errors import PolicyError
from protocol.fields import Fields, yaml_fields


def read_yaml(path: Path) -> Fields:
    """The file's fields, its `version:` checked; an unreadable or invalid file raises PolicyError naming it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    return yaml_fields(text, str(path))
