"""README's first command, end to end: the quickstart brings the example location to LOADED and
answers a Dagster gRPC Ping; a second run reuses it; `down` leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys

import docker

from tests import harness


def _quickstart(*args: str, run_id: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AIRLOCK_QUICKSTART_ID": run_id}
    return subprocess.run([sys.executable, str(harness.ROOT / "scripts/quickstart.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_quickstart_up_again_and_down() -> None:
    harness.images()
    run_id = harness.unique_id()
    dc: docker.DockerClient = harness.client()
    try:
        first = _quickstart("up", run_id=run_id)
        print(first.stdout)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "example" in first.stdout and "LOADED" in first.stdout
        assert first.stdout.count("Ping via gRPC -> answered") == 3
        container_id = dc.containers.get(f"airlock-{run_id}").id

        again = _quickstart("up", run_id=run_id)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "reusing it" in again.stdout
        assert dc.containers.get(f"airlock-{run_id}").id == container_id
    finally:
        down = _quickstart("down", run_id=run_id)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not dc.containers.list(all=True, filters={"label": f"airlock.appliance-id={run_id}"})
    assert not dc.containers.list(all=True, filters={"name": f"airlock-{run_id}"})
    assert not dc.networks.list(filters={"label": f"airlock.appliance-id={run_id}"})
    assert not dc.volumes.list(filters={"name": f"airlock-state-{run_id}"})
