"""Typed readers for policy and spec fields: each returns a clean value or raises PolicyError naming the field.

Both sides read with these (the appliance its policy files and desired sets, the control plane its location
specs and deploy files), so an error reads the same wherever it is raised. Pure: `yaml_fields` parses text,
reading files is the caller's job.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

import yaml

from protocol.errors import PolicyError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
SUPPORTED_VERSION = 1  # every airlock file and desired set says `version: 1`
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class Fields:
    """Reads one mapping of a file, remembering where it is, so every error has file and field path."""

    def __init__(self, file: str, data: Any, path: str = "") -> None:
        if not isinstance(data, Mapping):
            raise PolicyError(file, path, f"must be a mapping, got {type(data).__name__}")
        self.file = file
        self.data = data
        self.path = path
        self._read: set[str] = set()

    def _where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> PolicyError:
        return PolicyError(self.file, self._where(key), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = ..., *, required: bool = False) -> Any:
        self._read.add(key)
        if key not in self.data or self.data[key] is None:
            if required or default is ...:
                raise self.error(key, "is required")
            return default
        return self.data[key]

    def str(self, key: str, default: Any = ..., *, pattern: str | None = None) -> str:
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        if pattern and not re.fullmatch(pattern, value):
            raise self.error(key, f"{value!r} does not match {pattern}")
        return value

    def bool(self, key: str, default: Any = ...) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def int(self, key: str, default: Any = ..., *, minimum: int | None = None) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be a whole number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: Any = ..., *, minimum: float | None = None) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, got {value!r}")
        if minimum is not None and value <= minimum:
            raise self.error(key, f"must be greater than {minimum}, got {value}")
        return float(value)

    def size(self, key: str, default: Any = ...) -> int:
        """A byte size: an integer or a string like ``512m``, ``1g``, ``64MiB``."""
        value = self.raw(key, default)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        match = _SIZE.match(str(value)) if isinstance(value, str) else None
        if not match:
            raise self.error(key, f"must be a size like '512m' or '1g', got {value!r}")
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])

    def list(self, key: str, default: Any = ...) -> list[Any]:
        value = self.raw(key, default)
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, got {type(value).__name__}")
        return value

    def str_list(self, key: str, default: Any = ...) -> tuple[str, ...]:
        items = self.list(key, default)
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item:
                raise PolicyError(self.file, f"{self._where(key)}[{i}]", f"must be a non-empty string, got {item!r}")
        return tuple(items)

    def str_map(self, key: str, default: Any = ...) -> dict[str, str]:
        value = self.raw(key, default)
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a mapping, got {type(value).__name__}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(k, str) or isinstance(v, list | dict) or v is None:
                raise PolicyError(self.file, f"{self._where(key)}.{k}", f"must be a string value, got {v!r}")
            out[k] = str(v)
        return out

    def cidrs(self, key: str, default: Any = ...) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        out = []
        for i, item in enumerate(self.str_list(key, default)):
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError as exc:
                raise PolicyError(self.file, f"{self._where(key)}[{i}]", f"not a CIDR: {exc}") from None
        return tuple(out)

    def child(self, key: str, default: Any = ...) -> Fields:
        value = self.raw(key, default)
        return Fields(self.file, value if value is not None else {}, self._where(key))

    def children(self, key: str, default: Any = ...) -> list[Fields]:
        return [Fields(self.file, item, f"{self._where(key)}[{i}]") for i, item in enumerate(self.list(key, default))]

    def done(self) -> None:
        """Refuse keys nobody read: a typo must not silently fall back to a default."""
        unknown = sorted(str(k) for k in self.data if k not in self._read)
        if unknown:
            raise self.error(unknown[0], f"unknown field (known here: {', '.join(sorted(self._read)) or 'none'})")


def yaml_fields(text: str, file: str, *, versioned: bool = True) -> Fields:
    """Parse one YAML document into Fields; with `versioned`, its `version:` must be SUPPORTED_VERSION."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(file, where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    fields = Fields(file, data if data is not None else {})
    if versioned:
        check_version(fields)
    return fields


def check_version(fields: Fields) -> None:
    version = fields.raw("version", required=True)
    if version != SUPPORTED_VERSION:
        raise fields.error("version", f"unsupported version {version!r}; this airlock reads {SUPPORTED_VERSION}")
