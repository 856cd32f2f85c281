"""The storage calls a run worker may make, and how each crosses: spooled write or answered call.

One table, read by all three parties: userland (which endpoint to use), the appliance's metadata relay (refuse
anything else before it is spooled) and the control plane (which executes only these, each checked against
the caller's scope in controlplane/storage/scope.py). Dagster-free, so the appliance can import it.

- ``write``: no answer needed. The relay acknowledges once the call is on disk in the run's spool, then
  forwards it in order; the control plane applies it once (run id, client id, sequence).
- ``call``: the caller needs the answer (reads, and writes that return something). The relay forwards it
  only after the run's earlier writes, so a run always reads its own writes.

Method names are ``<storage>.<method>`` with storage one of runs, events, schedules, compute_logs.
"""

from __future__ import annotations

from typing import Literal

from protocol.errors import PermanentError

__all__ = ["CALLS", "COMPUTE_LOG_MAX_BYTES", "EXIT_METHOD", "CodecError", "Mode", "StorageCallRefused", "call_mode"]

Mode = Literal["write", "call"]

# The run's exit report: spooled by the agent's control socket only (never accepted from a run worker), applied
# by the control plane after the run's own events (controlplane/storage/service.py).
EXIT_METHOD = "airlock.run_exited"
# How much of one step's stdout or stderr the control plane keeps (userland uploads at most this much).
COMPUTE_LOG_MAX_BYTES = 50 * 1024 * 1024


class StorageCallRefused(PermanentError):
    """A storage call that is not on the allowlist, outside the caller's scope, or failed on the far side."""


class CodecError(PermanentError, ValueError):
    """A value that cannot cross the boundary (or text that is not one protocol/storage_codec wrote)."""


CALLS: dict[str, Mode] = {
    # Events and run state: the run worker's stream of writes, spooled and forwarded in order.
    "events.store_event": "write",
    "events.store_event_batch": "write",
    "runs.handle_run_event": "write",
    "runs.add_run_tags": "write",
    "compute_logs.upload": "write",
    # Reads a run worker and its steps make (the run's own records, and asset state its IO needs).
    "runs.get_runs": "call",
    "runs.get_run_records": "call",
    "runs.get_runs_count": "call",
    "runs.has_run": "call",
    "runs.get_run_tags": "call",
    "runs.get_run_tag_keys": "call",
    "runs.get_run_group": "call",
    "runs.get_run_ids": "call",
    "runs.has_job_snapshot": "call",
    "runs.get_job_snapshot": "call",
    "runs.has_execution_plan_snapshot": "call",
    "runs.get_execution_plan_snapshot": "call",
    "runs.add_job_snapshot": "call",
    "runs.add_execution_plan_snapshot": "call",
    "events.get_records_for_run": "call",
    "events.get_event_records": "call",
    "events.get_asset_records": "call",
    "events.has_asset_key": "call",
    "events.all_asset_keys": "call",
    "events.get_latest_materialization_events": "call",
    "events.get_materialized_partitions": "call",
    "events.get_latest_storage_id_by_partition": "call",
    "events.get_latest_tags_by_partition": "call",
    "events.get_latest_asset_partition_materialization_attempts_without_materializations": "call",
    "events.get_dynamic_partitions": "call",
    "events.has_dynamic_partition": "call",
    "events.get_pool_config": "call",
    "events.get_pool_limits": "call",
    "events.fetch_materializations": "call",
    "events.fetch_observations": "call",
    "events.get_updated_data_version_partitions": "call",
    "events.get_asset_check_summary_records": "call",
    "events.get_latest_planned_materialization_info": "call",
    "events.get_event_tags_for_asset": "call",
    "events.fetch_run_status_changes": "call",  # run-status sensors (a location token: its own runs only)
    "schedules.get_instigator_state": "call",
    "schedules.all_instigator_state": "call",
    "schedules.get_ticks": "call",
}


def call_mode(method: str) -> Mode:
    mode = CALLS.get(method)
    if mode is None:
        raise StorageCallRefused(f"{method} is not on the storage call allowlist")
    return mode
