"""The instance ref a run container gets: userland's relay-backed storage, nothing of the control plane's.

Built from class names only (userland need not import here). No path, database URL or secret of the
control plane appears in it: the relay's address (the appliance on the location network) and the run's token
reach the container as environment variables.
"""

from __future__ import annotations

from dagster._core.instance.ref import InstanceRef
from dagster._serdes import ConfigurableClassData

from protocol.locations import ARTIFACTS_DIR

__all__ = ["SCRATCH", "userland_instance_ref"]

SCRATCH = "/tmp/dagster_home"  # the run container's tmpfs: local log capture before the relay ships it


def _data(module: str, cls: str, config: str = "{}\n") -> ConfigurableClassData:
    return ConfigurableClassData(module_name=module, class_name=cls, config_yaml=config)


def userland_instance_ref() -> InstanceRef:
    """The relay's address and the run's token reach userland through the container's environment.

    Artifacts (the default IO manager's files) go to the location's persistent volume at ARTIFACTS_DIR, so
    materializing a downstream asset in a later run finds its upstream; compute logs stay on the tmpfs."""
    return InstanceRef(
        local_artifact_storage_data=_data("dagster._core.storage.root", "LocalArtifactStorage",
                                          f"base_dir: {ARTIFACTS_DIR}\n"),
        compute_logs_data=_data("userland.compute_logs", "RelayComputeLogManager",
                                f"base_dir: {SCRATCH}/logs\n"),
        scheduler_data=None,
        run_coordinator_data=None,
        run_launcher_data=None,
        settings={"telemetry": {"enabled": False}},
        run_storage_data=_data("userland.storage", "RelayRunStorage"),
        event_storage_data=_data("userland.storage", "RelayEventLogStorage"),
        schedule_storage_data=_data("userland.storage", "RelayScheduleStorage"),
    )
