"""Execute one storage call from a run worker on the control plane's own Dagster instance.

decode (protocol/storage_codec) -> allowlist (protocol/storage_calls) -> scope (scope.py) -> run -> encode.
Events are stored through the instance's `handle_new_event`, exactly as a local run worker's instance would
store them, so run status, retries and subscribers behave as in plain Dagster. Compute logs land where the
instance's LocalComputeLogManager reads them, so the UI shows them unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from controlplane.storage import scope as scopes
from controlplane.storage.scope import Scope
from protocol.storage_calls import COMPUTE_LOG_MAX_BYTES, StorageCallRefused, call_mode
from protocol.storage_codec import CodecError, decode, encode

__all__ = ["StorageExecutor"]

log = logging.getLogger("airlock.controlplane.storage")
TRUNCATED_MARK = "\n[airlock: compute log truncated at {limit} bytes]\n"


class StorageExecutor:
    def __init__(self, instance: Any, *, compute_log_limit: int = COMPUTE_LOG_MAX_BYTES) -> None:
        self.instance, self.compute_log_limit = instance, compute_log_limit

    def store_events(self, scope: Scope, calls: list[tuple[str, str]]) -> list[str | None]:
        """Several `events.store_event` calls (args, kwargs texts) stored as one batch, each checked on its own.

        Returns one entry per call: None when stored, else why it was refused.
        """
        target, outcomes, events = self._store_event, [], []
        for args_text, kwargs_text in calls:
            try:
                args, kwargs = decode(args_text), decode(kwargs_text)
                if not isinstance(args, list) or not isinstance(kwargs, dict):
                    raise StorageCallRefused("arguments must be a list and keyword arguments a map")
                scopes.check(scope, "events.store_event", target, args, kwargs, self.instance)
                events.append(args[0] if args else kwargs["event"])
                outcomes.append(None)
            except (StorageCallRefused, CodecError, KeyError) as exc:
                outcomes.append(f"events.store_event: {exc}")
        self._store_in_order(events)
        return outcomes

    def _store_in_order(self, events: list[Any]) -> None:
        """On SQLite, plain log lines in one transaction each run of them; anything with side effects (run
        status, asset and check events) through handle_new_event, in between, so the run's order is kept. On
        other storage (Postgres) every event through handle_new_event, which also notifies watchers."""
        from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
        from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

        storage = self.instance.event_log_storage
        bulk = isinstance(storage, SqliteEventLogStorage)  # its store_event_batch is a loop of transactions
        plain: list[Any] = []

        def flush_plain() -> None:
            if plain:
                with storage.run_connection(plain[0].run_id) as conn:  # one executemany, one commit
                    conn.execute(SqlEventLogStorageTable.insert(), [storage._event_to_row(e) for e in plain])
                plain.clear()

        for event in events:
            if bulk and _plain(event):
                plain.append(event)
                continue
            flush_plain()
            # One by one elsewhere: Dagster's batched write on Postgres takes batches of asset events only.
            self.instance.handle_new_event(event)
        flush_plain()

    def execute(self, scope: Scope, method: str, args_text: str, kwargs_text: str) -> str:
        """Run the call and return the encoded answer; StorageCallRefused says why it was not run."""
        call_mode(method)
        try:
            args, kwargs = decode(args_text), decode(kwargs_text)
        except CodecError as exc:
            raise StorageCallRefused(f"{method}: arguments do not decode: {exc}") from None
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise StorageCallRefused(f"{method}: arguments must be a list and keyword arguments a map")
        target = self._target(method)
        scopes.check(scope, method, target, args, kwargs, self.instance)
        return encode(scopes.only_own_runs(scope, method, target(*args, **kwargs), self.instance))

    def _target(self, method: str) -> Callable[..., Any]:
        storage, _, name = method.partition(".")
        special = {
            "events.store_event": self._store_event,
            "events.store_event_batch": self._store_event_batch,
            "compute_logs.upload": self._upload_compute_log,
        }.get(method)
        if special is not None:
            return special
        owner = {"runs": self.instance.run_storage, "events": self.instance.event_log_storage,
                 "schedules": self.instance.schedule_storage}.get(storage)
        target = getattr(owner, name, None) if owner is not None and not name.startswith("_") else None
        if not callable(target):
            raise StorageCallRefused(f"{method} does not exist on this control plane's storage")
        return target

    def _store_event(self, event: Any) -> None:
        self.instance.handle_new_event(event)

    def _store_event_batch(self, events: list[Any]) -> None:
        """A worker's own batch goes the same way as a forwarded run of store_event writes."""
        self._store_in_order(list(events))

    def _upload_compute_log(self, log_key: list[str], io_type: str, text: str, offset: int = 0,
                            complete: bool = True, truncated: bool = False) -> None:
        """Write a chunk of a step's stdout/stderr at its offset, where the instance's LocalComputeLogManager
        serves it from. Offsets make a replayed chunk harmless; nothing lands past the size limit."""
        from dagster._core.storage.compute_log_manager import ComputeIOType
        from dagster._core.storage.local_compute_log_manager import IO_TYPE_EXTENSION, LocalComputeLogManager

        manager = self.instance.compute_log_manager
        if not isinstance(manager, LocalComputeLogManager):
            raise StorageCallRefused("this control plane's compute log manager does not accept uploads")
        if any(part in ("", ".", "..") or "/" in part for part in log_key):
            raise StorageCallRefused(f"bad compute log key {log_key}")
        if not isinstance(offset, int) or not 0 <= offset <= self.compute_log_limit:
            raise StorageCallRefused(f"compute log offset {offset!r} is outside 0..{self.compute_log_limit}")
        extension = IO_TYPE_EXTENSION[ComputeIOType(io_type)]
        path = manager.get_captured_local_path(log_key, extension)
        data = text.encode()
        cut = truncated or offset + len(data) > self.compute_log_limit
        data = data[: self.compute_log_limit - offset]
        if cut:
            data += TRUNCATED_MARK.format(limit=self.compute_log_limit).encode()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "r+b" if os.path.exists(path) else "wb") as f:  # never cut: a replay rewrites its bytes
            f.seek(offset)
            f.write(data)
        if complete:
            marker = manager.complete_artifact_path(log_key)
            with open(marker, "w"):
                pass


def _plain(event: Any) -> bool:
    """A log line or step event that only needs its row: no run status, asset or check bookkeeping."""
    if not event.is_dagster_event:
        return True
    from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS, EVENT_TYPE_TO_PIPELINE_RUN_STATUS

    kind = event.dagster_event_type
    special = kind in ASSET_EVENTS or kind in ASSET_CHECK_EVENTS or kind in EVENT_TYPE_TO_PIPELINE_RUN_STATUS
    return not special and not event.get_dagster_event().is_job_event
