"""What every Launcher (appliance/launcher/base.py) must do, as one set of checks run against each.

tests/unit/test_launcher_contract.py runs them on the in-memory FakeLauncher the agent's tests use;
tests/integration/test_launcher_docker.py on the Docker engine. A behaviour the agent relies on is written
here once, so the fake cannot drift from the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from appliance import labels
from appliance.launcher.base import Launcher
from appliance.launcher.engine import EngineUnavailable, LauncherError
from appliance.launcher.spec import ContainerSpec


@dataclass
class Bench:
    launcher: Launcher
    image: str  # a reference the launcher's engine has
    appliance: str  # the container that plays the appliance (attached to location networks)
    spec: Callable[..., ContainerSpec]  # (name, role, artifacts_of=None) -> runs `echo ready; sleep` in `image`,
    # with the artifact volume of location `artifacts_of` mounted when given
    prep: Callable[[str], ContainerSpec]  # location -> its artifacts_prep_spec


def _eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.2)


def images_resolve_and_a_missing_one_is_a_permanent_error(bench: Bench) -> None:
    image = bench.launcher.image(bench.image)
    assert image.id.startswith("sha256:") and bench.launcher.image(image.id).id == image.id
    with pytest.raises(LauncherError) as err:
        bench.launcher.image("airlock/no-such-image:never")
    assert not isinstance(err.value, EngineUnavailable) and "not on this Docker engine" in str(err.value)


def a_location_network_is_made_once_attached_listed_and_removed(bench: Bench) -> None:
    first = bench.launcher.ensure_network("contract", attach=bench.appliance)
    again = bench.launcher.ensure_network("contract", attach=bench.appliance)
    assert first.id == again.id and first.location == "contract" and first.subnets
    assert first.id in {n.id for n in bench.launcher.networks()}
    bench.launcher.remove_network(first, detach=bench.appliance)
    assert first.id not in {n.id for n in bench.launcher.networks()}


def a_workload_starts_is_listed_by_role_stops_and_is_removed(bench: Bench) -> None:
    launcher = bench.launcher
    spec = bench.spec("contract-run", labels.ROLE_RUN)
    workload = launcher.start(spec)
    try:
        listed = {w.id: w for w in launcher.workloads(labels.ROLE_RUN)}
        assert workload.id in listed and listed[workload.id].name == spec.name and listed[workload.id].live
        assert listed[workload.id].labels[labels.RUN_ID] == "contract"
        assert workload.id not in {w.id for w in launcher.workloads(labels.ROLE_CODE_SERVER)}
        with pytest.raises(LauncherError) as err:  # the same name again: refused, not retried
            launcher.start(spec)
        assert not isinstance(err.value, EngineUnavailable)
        _eventually(lambda: "ready" in launcher.log_tail(workload))
        launcher.stop(workload, grace_seconds=1)
        _eventually(lambda: not next(w for w in launcher.workloads(labels.ROLE_RUN) if w.id == workload.id).live)
        stopped = next(w for w in launcher.workloads(labels.ROLE_RUN) if w.id == workload.id)
        assert stopped.exit_code is not None
    finally:
        launcher.remove(workload)
    assert workload.id not in {w.id for w in launcher.workloads(labels.ROLE_RUN)}
    launcher.remove(workload)  # already gone: not an error


def an_artifact_volume_is_made_once_kept_while_mounted_and_purged(bench: Bench) -> None:
    launcher, location = bench.launcher, "contract-art"
    name = launcher.ensure_artifacts(location, prep=bench.prep(location))
    assert launcher.ensure_artifacts(location, prep=bench.prep(location)) == name  # idempotent
    assert location in launcher.artifact_locations()
    user = launcher.start(bench.spec("contract-user", labels.ROLE_RUN, artifacts_of=location))
    try:
        with pytest.raises(LauncherError) as err:  # in use: refused, the files stay
            launcher.remove_artifacts(location)
        assert not isinstance(err.value, EngineUnavailable)
        assert location in launcher.artifact_locations()
    finally:
        launcher.remove(user)
    launcher.remove_artifacts(location)
    assert location not in launcher.artifact_locations()
    launcher.remove_artifacts(location)  # already gone: not an error


CONTRACT = (images_resolve_and_a_missing_one_is_a_permanent_error,
            an_artifact_volume_is_made_once_kept_while_mounted_and_purged,
            a_location_network_is_made_once_attached_listed_and_removed,
            a_workload_starts_is_listed_by_role_stops_and_is_removed)
