"""Whose data a storage call touches, checked against the caller's scope before it runs.

A run token's scope is one run of one location: it writes only that run's events, state, tags and compute
logs, reads that run's records and snapshots, and reads asset state (which Dagster's IO and partition logic
need, whatever location wrote it). Everything else is refused with the reason, which the audit log keeps.
Checks see decoded arguments; each is a small function in a table, as the allowlist is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from protocol.storage_calls import StorageCallRefused

__all__ = ["LOCATION_WIDE", "Scope", "check", "only_own_runs"]


LOCATION_WIDE = "*"  # the run id of a location token (a code server: its sensors and schedules)


@dataclass(frozen=True)
class Scope:
    """What the metadata relay vouched for: the run (and its location) whose token made the call, or the
    location alone (run id LOCATION_WIDE) for a code server's read-only token."""

    run_id: str
    location: str

    @property
    def location_wide(self) -> bool:
        return self.run_id == LOCATION_WIDE


Bound = Mapping[str, Any]
Check = Callable[[Scope, Bound, Any], None]  # (scope, bound arguments, instance) -> None or raise

ASSET_EVENT_TYPES = frozenset({
    "ASSET_MATERIALIZATION", "ASSET_OBSERVATION", "ASSET_MATERIALIZATION_PLANNED", "ASSET_CHECK_EVALUATION",
    "ASSET_CHECK_EVALUATION_PLANNED", "ASSET_FAILED_TO_MATERIALIZE",
})


def _refuse(message: str) -> None:
    raise StorageCallRefused(message)


def _own_run(name: str) -> Check:
    def check(scope: Scope, bound: Bound, _instance: Any) -> None:
        if bound.get(name) != scope.run_id:
            _refuse(f"{name}={bound.get(name)!r} is not this token's run {scope.run_id}")

    return check


def _own_events(name: str) -> Check:
    def check(scope: Scope, bound: Bound, _instance: Any) -> None:
        value = bound.get(name)
        events = value if isinstance(value, list) else [value]  # a NamedTuple event is a tuple too
        for event in events:
            if getattr(event, "run_id", None) != scope.run_id:
                _refuse(f"an event of run {getattr(event, 'run_id', None)!r} is not this token's run {scope.run_id}")

    return check


def _own_log_key(scope: Scope, bound: Bound, _instance: Any) -> None:
    key = bound.get("log_key") or []
    if not key or key[0] != scope.run_id:
        _refuse(f"compute log key {list(key)} is not under this token's run {scope.run_id}")


def _runs_filter(scope: Scope, bound: Bound, _instance: Any) -> None:
    filters = bound.get("filters")
    run_ids = list(getattr(filters, "run_ids", None) or [])
    if not run_ids or set(run_ids) != {scope.run_id}:
        _refuse(f"a run token may list only its own run {scope.run_id}, not filter {filters!r}")


def _own_snapshot(kind: str) -> Check:
    def check(scope: Scope, bound: Bound, instance: Any) -> None:
        wanted = next((v for k, v in bound.items() if k.endswith("snapshot_id")), None)
        run = instance.get_run_by_id(scope.run_id)
        own = getattr(run, f"{kind}_snapshot_id", None) if run else None
        if wanted is None or wanted != own:
            _refuse(f"{kind} snapshot {wanted!r} is not the one of this token's run {scope.run_id}")

    return check


def _asset_events(scope: Scope, bound: Bound, _instance: Any) -> None:
    records_filter = bound.get("event_records_filter")
    event_type = getattr(getattr(records_filter, "event_type", None), "value", None)
    if event_type not in ASSET_EVENT_TYPES:
        _refuse(f"a run token may query asset events only, not {event_type!r}")


def _anything(_scope: Scope, _bound: Bound, _instance: Any) -> None:
    return None


CHECKS: dict[str, Check] = {
    "events.store_event": _own_events("event"),
    "events.store_event_batch": _own_events("events"),
    "runs.handle_run_event": _own_run("run_id"),
    "runs.add_run_tags": _own_run("run_id"),
    "compute_logs.upload": _own_log_key,
    "runs.get_runs": _runs_filter,
    "runs.get_run_records": _runs_filter,
    "runs.get_runs_count": _runs_filter,
    "runs.get_run_ids": _runs_filter,
    "runs.has_run": _own_run("run_id"),
    "runs.get_run_group": _own_run("run_id"),
    "runs.has_job_snapshot": _own_snapshot("job"),
    "runs.get_job_snapshot": _own_snapshot("job"),
    "runs.has_execution_plan_snapshot": _own_snapshot("execution_plan"),
    "runs.get_execution_plan_snapshot": _own_snapshot("execution_plan"),
    "events.get_records_for_run": _own_run("run_id"),
    "events.get_event_records": _asset_events,
    # Asset and partition state: read by IO managers, partition and data-version logic, any location.
    "events.get_asset_records": _anything,
    "events.has_asset_key": _anything,
    "events.all_asset_keys": _anything,
    "events.get_latest_materialization_events": _anything,
    "events.get_materialized_partitions": _anything,
    "events.get_latest_storage_id_by_partition": _anything,
    "events.get_latest_tags_by_partition": _anything,
    "events.get_latest_asset_partition_materialization_attempts_without_materializations": _anything,
    "events.get_dynamic_partitions": _anything,
    "events.has_dynamic_partition": _anything,
    "events.get_pool_config": _anything,
    "events.get_pool_limits": _anything,
    "events.fetch_materializations": _anything,
    "events.fetch_observations": _anything,
    "events.get_updated_data_version_partitions": _anything,
    "events.get_asset_check_summary_records": _anything,
    "events.get_latest_planned_materialization_info": _anything,
    "events.get_event_tags_for_asset": _anything,
}


def _run_of_location(name: str) -> Check:
    def check(scope: Scope, bound: Bound, instance: Any) -> None:
        run = instance.get_run_by_id(bound.get(name)) if isinstance(bound.get(name), str) else None
        if run is None or _location_of(run) != scope.location:
            _refuse(f"{name}={bound.get(name)!r} is not a run of location {scope.location!r}")

    return check


def _location_of(run: Any) -> str | None:
    origin = getattr(run, "remote_job_origin", None)
    return origin.location_name if origin is not None else None


# A location token reads what sensors and schedules need: asset state (as a run does), and its own runs and
# their events. Run lists are filtered to the location after the call (see only_own_runs); nothing is written.
LOCATION_CHECKS: dict[str, Check] = {
    **{method: rule for method, rule in CHECKS.items() if rule is _anything},
    "events.get_event_records": _asset_events,
    "runs.get_runs": _anything,
    "runs.get_run_records": _anything,
    "events.get_records_for_run": _run_of_location("run_id"),
    "runs.get_run_tags": _anything,
    # Run-status sensors: status changes of every run come back, then are cut to this location's (only_own_runs).
    "events.fetch_run_status_changes": _anything,
}
FILTERED_FOR_LOCATION = frozenset({"runs.get_runs", "runs.get_run_records", "events.fetch_run_status_changes"})


def only_own_runs(scope: Scope, method: str, result: Any, instance: Any) -> Any:
    """A location token's run listing (or run status changes), cut to the runs of its own location. A sensor
    with monitor_all_code_locations therefore sees its own location's runs only (docs/SECURITY.md)."""
    if not scope.location_wide or method not in FILTERED_FOR_LOCATION:
        return result
    if method == "events.fetch_run_status_changes":
        from dagster._core.storage.dagster_run import RunsFilter

        run_ids = list({record.event_log_entry.run_id for record in result.records})
        own = {run.run_id for run in instance.get_runs(RunsFilter(run_ids=run_ids))
               if _location_of(run) == scope.location} if run_ids else set()
        return result._replace(records=[r for r in result.records if r.event_log_entry.run_id in own])
    return [item for item in result if _location_of(getattr(item, "dagster_run", item)) == scope.location]


def check(scope: Scope, method: str, target: Callable[..., Any], args: list[Any], kwargs: dict[str, Any],
          instance: Any) -> None:
    """Raise StorageCallRefused unless `method(*args, **kwargs)` stays inside `scope`."""
    rule = (LOCATION_CHECKS if scope.location_wide else CHECKS).get(method)
    if rule is None:
        _refuse(f"{method} is not allowed for a {'location' if scope.location_wide else 'run'} token")
    try:
        bound = inspect.signature(target).bind(*args, **kwargs)
    except TypeError as exc:
        raise StorageCallRefused(f"{method}: {exc}") from None
    bound.apply_defaults()
    rule(scope, bound.arguments, instance)
