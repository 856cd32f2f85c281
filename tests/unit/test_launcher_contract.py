"""The launcher contract (tests/launcher_contract.py) on the in-memory FakeLauncher the agent's tests use."""

from __future__ import annotations

import pytest

from appliance import labels
from appliance.launcher.spec import ContainerSpec
from tests import launcher_contract
from tests.fake_launcher import FakeLauncher


@pytest.fixture
def bench() -> launcher_contract.Bench:
    launcher = FakeLauncher(appliance_id="contract")
    image = launcher.add_image("airlock/example-location:latest")

    def spec(name: str, role: str) -> ContainerSpec:
        launcher.logs[name] = "ready\n"
        return ContainerSpec(name, {"image": image.id, "name": name, "labels": {
            labels.MANAGED: "true", labels.ROLE: role, labels.APPLIANCE_ID: "contract", labels.RUN_ID: "contract"}},
            "h")

    return launcher_contract.Bench(launcher, "airlock/example-location:latest", "appliance", spec)


@pytest.mark.parametrize("check", launcher_contract.CONTRACT, ids=lambda c: c.__name__)
def test_the_fake_launcher_keeps_the_contract(bench: launcher_contract.Bench, check) -> None:
    check(bench)
