"""README's first command, end to end: the quickstart brings up the control plane and the appliance
(compose/quickstart.yml), serves the example location from the appliance, runs the example job to SUCCESS
and leaves the UI answering; a second `up` keeps both containers and runs again; `down` leaves nothing behind."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import docker
import httpx

from tests import harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quickstart(*args: str, run_id: str, port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AIRLOCK_QUICKSTART_ID": run_id, "AIRLOCK_UI_PORT": str(port)}
    return subprocess.run([sys.executable, str(harness.ROOT / "scripts/quickstart.py"), *args], env=env,
                          capture_output=True, text=True, timeout=900)


def test_quickstart_runs_the_example_job_again_and_down_leaves_nothing() -> None:
    harness.images()
    run_id, port = harness.unique_id(), _free_port()
    dc: docker.DockerClient = harness.client()
    names = (f"airlock-{run_id}", f"airlock-{run_id}-controlplane")
    try:
        first = _quickstart("up", run_id=run_id, port=port)
        print(first.stdout, first.stderr[-3000:])
        assert first.returncode == 0, first.stdout + first.stderr
        assert re.search(r"run [0-9a-f-]{36}: SUCCESS", first.stdout), first.stdout
        ui = re.search(r"Dagster UI: (http://127\.0\.0\.1:\d+)/runs/", first.stdout)
        assert ui and httpx.get(f"{ui.group(1)}/server_info", timeout=30).status_code == 200
        ids = [dc.containers.get(name).id for name in names]
        # The "Next:" the quickstart prints: the doctor probes with the served location's image.
        doctor = dc.containers.get(f"airlock-{run_id}").exec_run(["airlock", "doctor"])
        report = doctor.output.decode(errors="replace")
        assert doctor.exit_code == 0 and "every protection the policy asks for is enforced" in report, report
        assert "no 32-bit syscall ABI" in report, report

        again = _quickstart("up", run_id=run_id, port=port)
        assert again.returncode == 0, again.stdout + again.stderr
        assert re.search(r"run [0-9a-f-]{36}: SUCCESS", again.stdout), again.stdout
        assert [dc.containers.get(name).id for name in names] == ids  # kept, not recreated
    finally:
        down = _quickstart("down", run_id=run_id, port=port)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not dc.containers.list(all=True, filters={"label": f"airlock.appliance-id={run_id}"})
    assert not [c for c in dc.containers.list(all=True) if c.name in names]
    assert not dc.networks.list(filters={"label": f"airlock.appliance-id={run_id}"})
    assert not dc.networks.list(filters={"name": f"airlock-{run_id}"})
    assert not dc.volumes.list(filters={"name": f"airlock-state-{run_id}"})
    assert not dc.volumes.list(filters={"name": f"airlock-cp-state-{run_id}"})
