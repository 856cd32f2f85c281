"""The launcher contract (tests/launcher_contract.py) on the in-memory FakeLauncher the agent's tests use."""

from __future__ import annotations

import pytest

from appliance import artifacts, labels
from appliance.launcher.spec import ContainerSpec
from tests import launcher_contract
from tests.fake_launcher import FakeLauncher


@pytest.fixture
def bench() -> launcher_contract.Bench:
    launcher = FakeLauncher(appliance_id="contract")
    image = launcher.add_image("airlock/example-location:latest")

    def spec(name: str, role: str, artifacts_of: str | None = None) -> ContainerSpec:
        launcher.logs[name] = "ready\n"
        mounts = [{"Type": "volume", "Source": artifacts.volume_name("contract", artifacts_of), "Target": "/a"}]
        return ContainerSpec(name, {"image": image.id, "name": name, "mounts": mounts if artifacts_of else [],
                                    "labels": {labels.MANAGED: "true", labels.ROLE: role,
                                               labels.APPLIANCE_ID: "contract", labels.RUN_ID: "contract"}}, "h")

    def prep(location: str) -> ContainerSpec:
        return ContainerSpec(f"{location}-prep", {"image": image.id, "labels": {labels.LOCATION: location}}, "p")

    return launcher_contract.Bench(launcher, "airlock/example-location:latest", "appliance", spec, prep)


@pytest.mark.parametrize("check", launcher_contract.CONTRACT, ids=lambda c: c.__name__)
def test_the_fake_launcher_keeps_the_contract(bench: launcher_contract.Bench, check) -> None:
    check(bench)
