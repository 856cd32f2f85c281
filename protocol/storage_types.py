"""Which types cross the storage boundary: read from the type hints of every allowlisted storage method.

The codec (protocol/storage_codec.py) must encode whatever Dagster passes to, or returns from, the methods in
protocol/storage_calls.CALLS. Rather than wait for a user's run to find a gap (DagsterEventType once failed
every partitioned asset with a partitioned upstream), `boundary_types()` walks the hints of those methods on
Dagster's storage base classes, down through containers, unions and the fields of the record types the codec
carries, and sorts every class it meets:

- `enums`: Enum classes. The codec encodes these by member name; this set *is* its enum allowlist, so an enum
  is on it exactly when an allowlisted method can take or return it.
- `serdes`: classes Dagster's serdes registers; serdes carries them whole.
- `records`: the codec's own record types (`_RECORDS`), whose fields were walked in turn.
- `unknown`: anything else. A test requires it to be empty.

Imported only where Dagster is installed, like the codec.
"""

from __future__ import annotations

import collections.abc
import datetime as dt
import enum
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from protocol.storage_calls import CALLS

__all__ = ["BoundaryTypes", "boundary_types", "storage_methods"]

# Methods airlock serves itself (not a Dagster storage method): their arguments are plain JSON values.
AIRLOCK_METHODS = frozenset({"compute_logs.upload"})
_PLAIN = (str, int, float, bool, type(None), dt.datetime, dt.date, dt.timedelta, bytes)
_CONTAINERS = (list, tuple, set, frozenset, dict, collections.abc.Sequence, collections.abc.Mapping,
               collections.abc.Iterable, collections.abc.Iterator, collections.abc.Set, collections.abc.Collection,
               collections.abc.Generator, collections.abc.Callable, collections.abc.Hashable)


@dataclass(frozen=True)
class BoundaryTypes:
    enums: frozenset[type]
    serdes: frozenset[type]
    records: frozenset[type]
    unknown: tuple[tuple[str, str], ...]  # (where it was met, the type's name)


def storage_methods() -> dict[str, Any]:
    """`<storage>.<method>` -> the function on Dagster's base class, for every allowlisted Dagster method."""
    from dagster._core.storage.event_log.base import EventLogStorage
    from dagster._core.storage.runs.base import RunStorage
    from dagster._core.storage.schedules.base import ScheduleStorage

    owners = {"runs": RunStorage, "events": EventLogStorage, "schedules": ScheduleStorage}
    out = {}
    for method in CALLS:
        if method in AIRLOCK_METHODS:
            continue
        storage, _, name = method.partition(".")
        out[method] = getattr(owners[storage], name)  # AttributeError: the allowlist names a method Dagster lacks
    return out


def _serdes_classes() -> set[type]:
    from dagster_shared.serdes.serdes import _WHITELIST_MAP

    known = set()
    for serializer in (*_WHITELIST_MAP.object_serializers.values(), *_WHITELIST_MAP.enum_serializers.values()):
        klass = getattr(serializer, "klass", None)
        if isinstance(klass, type):
            known.add(klass)
    return known


@cache
def boundary_types() -> BoundaryTypes:
    from protocol.storage_codec import record_classes  # the codec's own record table

    methods = storage_methods()  # first: importing the storage modules registers their serdes types
    serdes_known, records = _serdes_classes(), record_classes()
    enums: set[type] = set()
    serdes: set[type] = set()
    walked: set[type] = set()
    unknown: list[tuple[str, str]] = []

    def visit(hint: Any, where: str) -> None:
        origin = typing.get_origin(hint)
        if origin is typing.Annotated:
            visit(typing.get_args(hint)[0], where)
            return
        if origin is typing.Literal:
            return
        if origin is not None:  # Sequence[X], Mapping[K, V], X | None, Union[...]
            for arg in typing.get_args(hint):
                if arg is not Ellipsis and not isinstance(arg, list):
                    visit(arg, where)
            if isinstance(origin, type) and origin not in _CONTAINERS and origin not in (types.UnionType,):
                visit(origin, where)
            return
        if hint is Any or isinstance(hint, typing.TypeVar) or hint in _PLAIN or hint in _CONTAINERS:
            return
        if not isinstance(hint, type):
            return  # a forward reference Dagster could not resolve either; nothing to check
        if issubclass(hint, enum.Enum) and hint not in serdes_known:
            enums.add(hint)
        elif hint in records:  # first, as the codec packs them: by field even when serdes knows them
            if hint not in walked:
                walked.add(hint)
                for name, field_hint in _hints(hint).items():
                    visit(field_hint, f"{hint.__name__}.{name}")
        elif hint in serdes_known:
            if hint not in serdes:
                serdes.add(hint)
                for name, field_hint in ({} if issubclass(hint, enum.Enum) else _hints(hint)).items():
                    serdes_field(field_hint, f"{hint.__name__}.{name}", hint)
        else:
            unknown.append((where, f"{hint.__module__}.{hint.__qualname__}"))

    def serdes_field(hint: Any, where: str, owner: type) -> None:
        """serdes refuses a plain (unregistered) enum anywhere inside a type it carries: such an owner must be
        one of the codec's records instead, so its fields are packed one by one."""
        for arg in (hint, *typing.get_args(hint)):
            if isinstance(arg, type) and issubclass(arg, enum.Enum) and arg not in serdes_known:
                unknown.append((where, f"{arg.__module__}.{arg.__qualname__} inside serdes type {owner.__name__}"))
            elif isinstance(arg, type) and arg in serdes_known and arg not in serdes:
                visit(arg, where)
            elif arg is not hint and typing.get_origin(arg) is not None:
                serdes_field(arg, where, owner)

    for method, function in methods.items():
        for name, hint in _hints(function).items():
            visit(hint, f"{method}({name})" if name != "return" else f"{method} -> ")
    return BoundaryTypes(frozenset(enums), frozenset(serdes), frozenset(walked), tuple(sorted(set(unknown))))


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # a hint naming a type only imported under TYPE_CHECKING
        return {k: v for k, v in getattr(obj, "__annotations__", {}).items() if not isinstance(v, str)}
