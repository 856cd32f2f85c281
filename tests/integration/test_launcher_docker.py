"""The launcher contract (tests/launcher_contract.py) on the Docker engine: the same checks the FakeLauncher
passes, so the agent's fake-backed tests speak for the real launcher too."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance import labels
from appliance.launcher.engine import Engine
from appliance.launcher.spec import ContainerSpec, artifacts_mount, artifacts_prep_spec
from appliance.policy import load_policy
from appliance.policy.loader import desired_set_from_data
from tests import harness, launcher_contract


@pytest.fixture(scope="module")
def bench() -> Iterator[launcher_contract.Bench]:
    images, dc = harness.images(), harness.client()
    appliance_id = harness.unique_id()
    image = images["example-location"]
    stand_in = dc.containers.run(image, ["sleep", "300"], detach=True, name=f"airlock-{appliance_id}-appliance",
                                 labels={"airlock.test-run": appliance_id})

    policy = load_policy(harness.ROOT / "policy")

    def spec(name: str, role: str, artifacts_of: str | None = None, command: str = "echo ready; exec sleep 300",
             ) -> ContainerSpec:
        full = f"airlock-{appliance_id}-{name}"
        kwargs = {"image": image, "name": full, "command": ["sh", "-c", command], "user": policy.hardening.user,
                  "read_only": True, "labels": {labels.MANAGED: "true", labels.ROLE: role,
                                                labels.APPLIANCE_ID: appliance_id, labels.RUN_ID: "contract"}}
        if artifacts_of:
            kwargs["mounts"] = [artifacts_mount(appliance_id, artifacts_of)]
        return ContainerSpec(full, kwargs, "h")

    def prep(location: str) -> ContainerSpec:
        entry = {"name": location, "image": image, "module": "m"}
        [loc] = desired_set_from_data({"version": 1, "locations": [entry]}, policy, source="test").accepted
        return artifacts_prep_spec(loc, policy,
                                   appliance_id=appliance_id, image_id=dc.images.get(image).id)

    try:
        yield launcher_contract.Bench(Engine(dc, appliance_id), image, stand_in.id, spec, prep)
    finally:
        stand_in.remove(force=True)
        harness.cleanup(dc, appliance_id)


@pytest.mark.parametrize("check", launcher_contract.CONTRACT, ids=lambda c: c.__name__)
def test_the_docker_launcher_keeps_the_contract(bench: launcher_contract.Bench, check) -> None:
    check(bench)


def test_artifacts_outlive_a_container_and_are_nosuid_nodev_noexec(bench: launcher_contract.Bench) -> None:
    """What the contract cannot say about the fake: the non-root user writes, the next container reads, and the
    kernel refuses to execute from the volume."""
    engine, location = bench.launcher, "contract-files"
    engine.ensure_artifacts(location, prep=bench.prep(location))
    writer = bench.spec("art-writer", labels.ROLE_RUN, artifacts_of=location,
                        command="echo materialized > /opt/dagster/artifacts/upstream && cp /bin/true "
                                "/opt/dagster/artifacts/t && echo wrote")
    reader = bench.spec("art-reader", labels.ROLE_RUN, artifacts_of=location,
                        command="cat /opt/dagster/artifacts/upstream; grep ' /opt/dagster/artifacts ' "
                                "/proc/mounts; /opt/dagster/artifacts/t; echo exec=$?; id -u")
    try:
        for spec in (writer, reader):
            workload = engine.start(spec)
            launcher_contract._eventually(lambda w=workload: not next(
                x for x in engine.workloads(labels.ROLE_RUN) if x.id == w.id).live)
        out = engine.log_tail(next(w for w in engine.workloads(labels.ROLE_RUN) if w.name == reader.name), 20)
        assert "wrote" in engine.log_tail(next(w for w in engine.workloads(labels.ROLE_RUN) if w.name == writer.name))
        assert "materialized" in out
        options = next(line for line in out.splitlines() if "/opt/dagster/artifacts" in line).split()[3]
        assert {"nosuid", "nodev", "noexec"} <= set(options.split(","))
        assert "exec=126" in out and "Permission denied" in out  # noexec: the planted binary does not run
        assert out.strip().splitlines()[-1] == "10001"
    finally:
        for w in engine.workloads(labels.ROLE_RUN):
            engine.remove(w)
        engine.remove_artifacts(location)


def test_a_workload_removed_between_listing_and_inspecting_is_skipped(bench: launcher_contract.Bench,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-py lists, then inspects each container: a run reaped in between (by the reaper thread) must not
    fail whoever was listing; it once failed a backfill's LAUNCH_RUN ("no such container")."""
    engine = bench.launcher
    gone, kept = (engine.start(bench.spec(f"race-{n}", labels.ROLE_RUN)) for n in ("gone", "kept"))
    api = engine.client.api
    inspect = api.inspect_container

    def reaped_first(container: str):  # the reaper wins the race for `gone`
        if container == gone.id:
            harness.client().containers.get(gone.id).remove(force=True)
        return inspect(container)

    monkeypatch.setattr(api, "inspect_container", reaped_first)
    try:
        listed = {w.id for w in engine.workloads(labels.ROLE_RUN)}
        assert kept.id in listed and gone.id not in listed
    finally:
        monkeypatch.undo()
        for w in (gone, kept):
            engine.remove(w)
