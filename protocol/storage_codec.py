"""Values of Dagster's instance storage calls, as JSON that crosses the trust boundary: never pickle.

Dagster's serdes encodes most of what storage methods take and return (runs, events, filters, asset keys).
What it lacks gets an explicit, tagged codec here: plain containers (tuples, sets, maps with non-string keys),
datetimes, a short allowlist of Dagster record types that serdes does not register (RunRecord,
AssetRecord, PoolConfig, ...), and the enums serdes does not register (DagsterEventType, ...), by member name.
The enum allowlist is every enum the allowlisted storage methods' type hints mention (protocol/storage_types.py),
so it is complete by construction; a test checks that the record table is too. Decoding never imports a name
it was sent: a tag is looked up in these tables, and anything else is refused with a CodecError naming it.

Imported only where Dagster is installed (userland in user-code images, the control plane); the appliance
forwards the encoded text without reading it.
"""

from __future__ import annotations

import datetime as dt
import enum
import importlib
import json
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from dagster._serdes import deserialize_value, serialize_value

from protocol.storage_calls import CodecError

__all__ = ["CodecError", "decode", "encode", "pack", "record_classes", "unpack"]


# Record types serdes does not register, by the name they cross under -> "module:Class". Fields cross as
# keyword arguments, each packed recursively.
_RECORDS: Mapping[str, str] = {
    "RunRecord": "dagster._core.storage.dagster_run:RunRecord",
    "RunsFilter": "dagster._core.storage.dagster_run:RunsFilter",
    "AssetRecord": "dagster._core.storage.event_log.base:AssetRecord",
    "AssetEntry": "dagster._core.storage.event_log.base:AssetEntry",
    "PoolConfig": "dagster._core.instance.config:PoolConfig",
    "PoolLimit": "dagster._core.storage.event_log.base:PoolLimit",
    "EventLogConnection": "dagster._core.storage.event_log.base:EventLogConnection",
    "AssetCheckSummaryRecord": "dagster._core.storage.event_log.base:AssetCheckSummaryRecord",
    "PlannedMaterializationInfo": "dagster._core.storage.event_log.base:PlannedMaterializationInfo",
    "ConcurrencyKeyInfo": "dagster._core.storage.event_log.base:ConcurrencyKeyInfo",
    # Found missing by the walk of the allowlisted methods' hints (protocol/storage_types.py):
    "AssetCheckExecutionRecord": "dagster._core.storage.asset_check_execution_record:AssetCheckExecutionRecord",
    "EventRecordsResult": "dagster._core.event_api:EventRecordsResult",
    "JobBucket": "dagster._core.storage.dagster_run:JobBucket",
    "TagBucket": "dagster._core.storage.dagster_run:TagBucket",
    # serdes registers these, but refuses the plain DagsterEventType inside them (found by the same walk):
    "EventRecordsFilter": "dagster._core.event_api:EventRecordsFilter",
    "RunStatusChangeRecordsFilter": "dagster._core.event_api:RunStatusChangeRecordsFilter",
    "RunShardedEventsCursor": "dagster._core.event_api:RunShardedEventsCursor",  # a field of EventRecordsFilter
}


@cache
def _record_class(name: str) -> type:
    module, _, attr = _RECORDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


@cache
def _record_names() -> dict[type, str]:
    found = {}
    for name in _RECORDS:
        try:
            found[_record_class(name)] = name
        except (ImportError, AttributeError):  # a type this Dagster version does not have
            continue
    return found


def record_classes() -> frozenset[type]:
    """The record types this codec carries field by field (those this Dagster version has)."""
    return frozenset(_record_names())


@cache
def _enums() -> dict[str, type[enum.Enum]]:
    """Enum name -> class, for every enum an allowlisted storage method can take or return."""
    from protocol.storage_types import boundary_types

    table: dict[str, type[enum.Enum]] = {}
    for klass in boundary_types().enums:
        if table.setdefault(klass.__name__, klass) is not klass:
            raise CodecError(f"two enums cross the storage boundary as {klass.__name__!r}")
    return table


def _pack_enum(value: enum.Enum) -> dict[str, Any]:
    name = type(value).__name__
    if _enums().get(name) is not type(value):
        raise CodecError(f"{type(value).__module__}.{type(value).__qualname__} is not an enum any allowlisted "
                         f"storage method takes or returns")
    return {"@": "enum", "t": name, "v": value.name}


def _unpack_enum(tree: Mapping[str, Any]) -> enum.Enum:
    klass = _enums().get(tree.get("t"))  # type: ignore[arg-type]
    if klass is None:
        raise CodecError(f"enum {tree.get('t')!r} is not on the storage codec's allowlist")
    member = tree["v"]
    if not isinstance(member, str) or member not in klass.__members__:
        raise CodecError(f"{klass.__name__} has no member {str(member)[:80]!r}")
    return klass[member]


def _fields(value: Any) -> dict[str, Any]:
    from dagster._record import as_dict, is_record

    if is_record(value):  # before _asdict: @record types refuse iteration
        return dict(as_dict(value))
    if hasattr(value, "_asdict"):
        return dict(value._asdict())
    if hasattr(value, "__dataclass_fields__"):
        return {name: getattr(value, name) for name in value.__dataclass_fields__}
    raise CodecError(f"cannot take the fields of {type(value).__name__}")


def _serdes_text(value: Any) -> str | None:
    """serdes JSON for registered types; None if serdes does not know the value's type."""
    from dagster_shared.serdes.serdes import _WHITELIST_MAP

    name = type(value).__name__
    known = _WHITELIST_MAP.object_serializers.get(name) or _WHITELIST_MAP.enum_serializers.get(name)
    if known is None or getattr(known, "klass", type(value)) is not type(value):
        return None
    return serialize_value(value)


def pack(value: Any) -> Any:
    """A Python value -> a JSON-able tree (tagged where plain JSON would lose the type)."""
    if value is None or (isinstance(value, (bool, int, float, str)) and not hasattr(value, "_value_")):
        return value
    if isinstance(value, dt.datetime):
        return {"@": "datetime", "v": value.isoformat()}
    if isinstance(value, bytes):
        raise CodecError("bytes do not cross the storage boundary")
    record = _record_names().get(type(value))
    if record is not None:
        return {"@": "record", "t": record, "v": {k: pack(v) for k, v in _fields(value).items()}}
    text = _serdes_text(value)
    if text is not None:
        return {"@": "serdes", "v": text}
    if isinstance(value, enum.Enum):
        return _pack_enum(value)
    if isinstance(value, list):
        return [pack(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"@": "tuple", "v": [pack(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"@": "frozenset" if isinstance(value, frozenset) else "set", "v": [pack(v) for v in value]}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {"@": "dict", "v": {k: pack(v) for k, v in value.items()}}
        return {"@": "map", "v": [[pack(k), pack(v)] for k, v in value.items()]}
    raise CodecError(f"{type(value).__module__}.{type(value).__qualname__} has no codec for the storage boundary")


_UNPACK: dict[str, Callable[[Any], Any]] = {
    "datetime": lambda v: dt.datetime.fromisoformat(v),
    "serdes": lambda v: deserialize_value(v),
    "tuple": lambda v: tuple(unpack(x) for x in v),
    "set": lambda v: {unpack(x) for x in v},
    "frozenset": lambda v: frozenset(unpack(x) for x in v),
    "dict": lambda v: {k: unpack(x) for k, x in v.items()},
    "map": lambda v: {unpack(k): unpack(x) for k, x in v},
}


def unpack(tree: Any) -> Any:
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [unpack(v) for v in tree]
    if not isinstance(tree, dict) or "@" not in tree or "v" not in tree:
        raise CodecError(f"not an encoded value: {str(tree)[:80]}")
    tag = tree["@"]
    if tag == "record":
        name = tree.get("t")
        if name not in _RECORDS:
            raise CodecError(f"record type {name!r} is not on the storage codec's allowlist")
        fields = tree["v"]
        if not isinstance(fields, dict):
            raise CodecError(f"record {name}: fields must be an object")
        return _record_class(name)(**{k: unpack(v) for k, v in fields.items()})
    if tag == "enum":
        return _unpack_enum(tree)
    decoder = _UNPACK.get(tag)
    if decoder is None:
        raise CodecError(f"unknown value tag {tag!r}")
    try:
        return decoder(tree["v"])
    except CodecError:
        raise
    except Exception as exc:  # serdes errors, bad isoformat, unhashable set members
        raise CodecError(f"cannot decode a {tag} value: {exc}") from None


def encode(value: Any) -> str:
    return json.dumps(pack(value), separators=(",", ":"))


def decode(text: str) -> Any:
    try:
        tree = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"not JSON: {exc}") from None
    return unpack(tree)
