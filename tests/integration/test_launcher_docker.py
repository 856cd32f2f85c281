"""The launcher contract (tests/launcher_contract.py) on the Docker engine: the same checks the FakeLauncher
passes, so the agent's fake-backed tests speak for the real launcher too."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance import labels
from appliance.launcher.engine import Engine
from appliance.launcher.spec import ContainerSpec
from tests import harness, launcher_contract


@pytest.fixture(scope="module")
def bench() -> Iterator[launcher_contract.Bench]:
    images, dc = harness.images(), harness.client()
    appliance_id = harness.unique_id()
    image = images["example-location"]
    stand_in = dc.containers.run(image, ["sleep", "300"], detach=True, name=f"airlock-{appliance_id}-appliance",
                                 labels={"airlock.test-run": appliance_id})

    def spec(name: str, role: str) -> ContainerSpec:
        full = f"airlock-{appliance_id}-{name}"
        return ContainerSpec(full, {"image": image, "name": full, "command": ["sh", "-c", "echo ready; exec sleep 300"],
                                    "labels": {labels.MANAGED: "true", labels.ROLE: role,
                                               labels.APPLIANCE_ID: appliance_id, labels.RUN_ID: "contract"}}, "h")

    try:
        yield launcher_contract.Bench(Engine(dc, appliance_id), image, stand_in.id, spec)
    finally:
        stand_in.remove(force=True)
        harness.cleanup(dc, appliance_id)


@pytest.mark.parametrize("check", launcher_contract.CONTRACT, ids=lambda c: c.__name__)
def test_the_docker_launcher_keeps_the_contract(bench: launcher_contract.Bench, check) -> None:
    check(bench)
