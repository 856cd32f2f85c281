"""Dagster instance storage for run workers that forwards every call to the appliance's metadata relay.

A run container's instance ref names these classes instead of SQLite or Postgres storage. Each abstract
method of Dagster's RunStorage, EventLogStorage and ScheduleStorage becomes a forwarder: the arguments are
encoded with protocol/storage_codec (serdes plus explicit codecs, never pickle), the relay checks the run's
capability token and the method allowlist, and the control plane executes the call on its own instance.

Nothing here knows a path, a database or a credential of the control plane: the ref carries only the relay
URL, and the token comes from the container's environment (AIRLOCK_RUN_TOKEN).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from dagster._core.storage.event_log.base import EventLogStorage
from dagster._core.storage.runs.base import RunStorage
from dagster._core.storage.schedules.base import ScheduleStorage
from dagster._serdes import ConfigurableClass, ConfigurableClassData

from userland.client import RelayClient, client_from_env

__all__ = ["RelayEventLogStorage", "RelayRunStorage", "RelayScheduleStorage"]

# Answered here, not remotely: they describe this storage itself.
_LOCAL: dict[str, Mapping[str, Any]] = {
    "runs": {"supports_bucket_queries": False, "supports_run_telemetry": False},
    "events": {
        "is_persistent": True,
        # The control plane stores each event with its instance's handle_new_event, which also updates the run.
        "handles_run_events_in_store_event": True,
        "supports_global_concurrency_limits": False,
    },
    "schedules": {"supports_batch_queries": False, "supports_auto_materialize_asset_evaluations": False},
}

# Not abstract in Dagster, but answered from the instance's own config there: ask the control plane's.
_REMOTE: dict[str, tuple[str, ...]] = {"runs": (), "events": ("get_pool_config",), "schedules": ()}

# Lifecycle hooks a storage gets from the instance: nothing to do on this side.
_NOOPS = ("optimize_for_webserver", "upgrade", "migrate", "optimize", "end_watch", "alembic_version")


def _forwarder(storage: str, name: str) -> Callable[..., Any]:
    def forward(self: _RelayStorage, *args: Any, **kwargs: Any) -> Any:
        return self._client.call(f"{storage}.{name}", args, kwargs)

    forward.__name__ = name
    forward.__qualname__ = f"Relay[{storage}].{name}"
    return forward


def _noop(*_args: Any, **_kwargs: Any) -> None:
    return None


def _store_event(self: _RelayStorage, event: Any) -> None:
    """Write-behind for the bulk of a run's events; a run status change (and all before it) goes at once."""
    from dagster._core.events import EVENT_TYPE_TO_PIPELINE_RUN_STATUS

    status_change = event.is_dagster_event and event.dagster_event_type in EVENT_TYPE_TO_PIPELINE_RUN_STATUS
    self._client.write("events.store_event", (event,), {}, lazy=not status_change)


def _dispose(self: _RelayStorage) -> None:
    """The instance is done: what waits in the write-behind buffer goes now."""
    self._client.flush()


class _RelayStorage(ConfigurableClass):
    """Shared plumbing: config (the relay URL), inst_data, the client."""

    storage: str = ""

    def __init__(self, url: str | None = None, inst_data: ConfigurableClassData | None = None,
                 client: RelayClient | None = None) -> None:
        self._inst_data = inst_data
        self._client = client or client_from_env(url)
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict:
        from dagster import Field, StringSource

        return {"url": Field(StringSource, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]) -> Any:
        return cls(url=config_value.get("url"), inst_data=inst_data)


def _build(name: str, storage: str, base: type) -> type:
    namespace: dict[str, Any] = {"storage": storage, "__module__": __name__,
                                 "__doc__": f"{base.__name__} forwarded to the appliance's metadata relay."}
    local = _LOCAL[storage]
    for attr in sorted(set(base.__abstractmethods__) | set(local) | set(_REMOTE[storage])):
        if attr in local:
            value = local[attr]
            static = inspect.getattr_static(base, attr, None)
            namespace[attr] = property(lambda _self, v=value: v) if isinstance(static, property) else (
                lambda _self, *_a, v=value, **_k: v)
        else:
            namespace[attr] = _forwarder(storage, attr)
    for attr in _NOOPS:  # abstract or not, nothing to do on this side
        if hasattr(base, attr):
            namespace[attr] = _noop
    namespace["dispose"] = _dispose
    if storage == "events":
        namespace["store_event"] = _store_event
    return type(name, (_RelayStorage, base), namespace)


RelayRunStorage = _build("RelayRunStorage", "runs", RunStorage)
RelayEventLogStorage = _build("RelayEventLogStorage", "events", EventLogStorage)
RelayScheduleStorage = _build("RelayScheduleStorage", "schedules", ScheduleStorage)
