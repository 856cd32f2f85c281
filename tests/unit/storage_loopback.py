"""A run worker's storage looped back to a control-plane executor in this process: the storage boundary
(codec, scope, allowlist) without Docker, for tests that run real Dagster jobs through it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetKey, DagsterInstance

from controlplane.storage.executor import StorageExecutor
from controlplane.storage.scope import Scope
from protocol.storage_calls import CALLS
from userland.client import RelayClient

__all__ = ["EXAMPLE", "Loopback", "example_run", "execute", "run_for", "user_instance"]

EXAMPLE = Path(__file__).resolve().parents[2] / "images" / "example-location"


def run_for(instance: DagsterInstance, root: Path, module: str, job_name: str, *, location: str,
            tags: dict[str, str] | None = None, asset_selection: frozenset[AssetKey] | None = None,
            run_config: dict[str, Any] | None = None):
    """A run of `job_name` from the code at `root`, created on the control plane's instance as the daemon would."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.remote_origin import (
        InProcessCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    repo = ReconstructableRepository.for_module(module, "defs", working_directory=str(root))
    recon = repo.get_reconstructable_job(job_name)
    if asset_selection is not None:
        recon = recon.get_subset(asset_selection=asset_selection)
    config = run_config if run_config is not None else {"execution": {"config": {"in_process": {}}}}
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name=module), location_name=location),
        "__repository__"), job_name)
    return recon, instance.create_run_for_job(
        job_def=recon.get_definition(), execution_plan=create_execution_plan(recon, config, tags=tags),
        job_code_origin=recon.get_python_origin(), remote_job_origin=origin, run_config=config, tags=tags,
        asset_selection=asset_selection)


def example_run(instance: DagsterInstance, job_name: str):
    """A run of the example location's `job_name` (location "example")."""
    return run_for(instance, EXAMPLE, "example_location.definitions", job_name, location="example")


class Loopback:
    """What the relay and gateway do, in one step: run each call on the control plane's executor."""

    def __init__(self, executor: StorageExecutor, scope: Scope) -> None:
        self.executor, self.scope, self.methods = executor, scope, []

    def __call__(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        result = None
        for call in body.get("writes") or [body]:
            assert CALLS[call["method"]] == path.rsplit("/", 1)[-1]
            self.methods.append(call["method"])
            result = self.executor.execute(self.scope, call["method"], call["args"], call["kwargs"])
        return {"result": result}


def user_instance(monkeypatch: pytest.MonkeyPatch, send: Loopback, tmp_path: Path) -> DagsterInstance:
    import userland.client
    import userland.compute_logs
    import userland.storage
    from controlplane.runs.instance_ref import userland_instance_ref

    client = RelayClient(send)
    for module in (userland.client, userland.storage, userland.compute_logs):
        monkeypatch.setattr(module, "client_from_env", lambda url=None: client)
    ref = userland_instance_ref()
    scratch = str(tmp_path / "scratch")  # one per test: storage that outlives each run
    ref = ref._replace(local_artifact_storage_data=ref.local_artifact_storage_data._replace(
        config_yaml=f"base_dir: {scratch}\n"), compute_logs_data=ref.compute_logs_data._replace(
        config_yaml=f"base_dir: {scratch}/logs\n"))
    return DagsterInstance.from_ref(ref)


def execute(run_id: str, worker: DagsterInstance) -> int:
    """What `dagster api execute_run` does in a run container, on the worker's userland instance."""
    from dagster._cli.api import _execute_run_command_body

    return _execute_run_command_body(run_id, worker, lambda _e: None, set_exit_code_on_failure=True)
