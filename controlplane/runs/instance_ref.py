"""The instance ref a run container gets: userland's relay-backed storage, nothing of the control plane's.

Built from class names only (userland need not import here). No path, database URL or secret of the
control plane appears in it; the relay URL is the appliance's address on the location network, and the run's
token reaches the container as an environment variable, not through the ref.
"""

from __future__ import annotations

from dagster._core.instance.ref import InstanceRef
from dagster._serdes import ConfigurableClassData

__all__ = ["SCRATCH", "userland_instance_ref"]

SCRATCH = "/tmp/dagster_home"  # the run container's tmpfs: artifacts and local log capture


def _data(module: str, cls: str, config: str = "{}\n") -> ConfigurableClassData:
    return ConfigurableClassData(module_name=module, class_name=cls, config_yaml=config)


def userland_instance_ref(relay_url: str) -> InstanceRef:
    url = f"url: {relay_url}\n"
    return InstanceRef(
        local_artifact_storage_data=_data("dagster._core.storage.root", "LocalArtifactStorage",
                                          f"base_dir: {SCRATCH}\n"),
        compute_logs_data=_data("userland.compute_logs", "RelayComputeLogManager",
                                f"base_dir: {SCRATCH}/logs\n{url}"),
        scheduler_data=None,
        run_coordinator_data=None,
        run_launcher_data=None,
        settings={"telemetry": {"enabled": False}},
        run_storage_data=_data("userland.storage", "RelayRunStorage", url),
        event_storage_data=_data("userland.storage", "RelayEventLogStorage", url),
        schedule_storage_data=_data("userland.storage", "RelayScheduleStorage", url),
    )
