"""Two appliances on two agent queues: each location is served (code server and runs) by the appliance whose
queue it names; with one appliance stopped only its locations become unavailable, with the reason, and the
other's keep loading and running. The second appliance is started by README's `docker run` line, as written
(only its names, queue and image tag made unique to this test run)."""

from __future__ import annotations

import shutil
import subprocess

import docker.errors

from tests import harness
from tests.integration.stack import launch, wait, wait_terminal

LOCATION = """query($name: String!) { workspaceLocationEntryOrError(name: $name) { __typename
  ... on WorkspaceLocationEntry { locationOrLoadError { __typename ... on PythonError { message causes { message } }
    ... on RepositoryLocation { name } } } } }"""
RELOAD = """mutation($name: String!) { reloadRepositoryLocation(repositoryLocationName: $name) { __typename
  ... on WorkspaceLocationEntry { locationOrLoadError { __typename ... on PythonError { message } } } } }"""


def _state(cp, name: str) -> tuple[str, str]:
    entry = cp.graphql(LOCATION, {"name": name})["workspaceLocationEntryOrError"]
    location = (entry.get("locationOrLoadError") or {}) if entry.get("__typename") == "WorkspaceLocationEntry" else {}
    messages = [location.get("message", "")] + [c["message"] for c in location.get("causes") or []]
    return location.get("__typename", entry.get("__typename")), "\n".join(m for m in messages if m)


def readme_docker_run(appliance_id: str, queue: str, image: str) -> str:
    """README's docker-run block with this run's names; every replaced text must be there (README drift fails)."""
    text = (harness.ROOT / "README.md").read_text()
    block = text.split("<!-- docker-run-line")[1].split("```sh\n", 1)[1].split("```", 1)[0]
    for old, new in (("--name airlock-appliance ", f"--name airlock-appliance-{appliance_id} "),
                     ("airlock-state:", f"airlock-state-{appliance_id}:"),
                     ("airlock-operator:", f"airlock-operator-{appliance_id}:"),  # harness.Appliance removes it
                     ("AIRLOCK_APPLIANCE_ID=vm1", f"AIRLOCK_APPLIANCE_ID={appliance_id}"),
                     ("AIRLOCK_QUEUES=default", f"AIRLOCK_QUEUES={queue}"),
                     ("airlock/appliance:latest", image)):
        assert old in block, f"README's docker run line no longer has {old!r}"
        block = block.replace(old, new)
    return block


def _reloaded(cp, name: str) -> tuple[str, str]:
    """Ask the webserver to load the location again (as the UI's reload does), then read its state."""
    cp.graphql(RELOAD, {"name": name})
    return _state(cp, name)


def test_each_location_is_served_by_the_appliance_of_its_queue_and_one_down_leaves_the_other_running(
        loaded, tmp_path) -> None:
    cp, first = loaded
    dc = harness.client()
    second = harness.Appliance(dc, harness.unique_id(), tmp_path, first.image)
    ca = next(path for path, bind in first.extra_volumes.items() if bind["bind"] == "/etc/airlock/ca.pem")
    shutil.copy(ca, tmp_path / "ca.pem")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path), "PWD": str(tmp_path),
           "CONTROL_PLANE_URL": first.extra_env["AIRLOCK_CONTROL_PLANE_URL"],
           "ENROLL_TOKEN": cp.cli("agent-token", "create").strip().splitlines()[-1]}
    image_id = dc.images.get(harness.images()["example-location"]).id
    try:
        cp.cli("location", "add", "example-gpu", "--image", image_id, "--module", "example_location.definitions",
               "--queue", "gpu")
        started = subprocess.run(["bash", "-c", readme_docker_run(second.appliance_id, "gpu", first.image)],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        second.container = dc.containers.get(second.name)
        second.wait_for("example-gpu", "LOADED", timeout=240)
        wait("example-gpu loaded in the webserver", lambda: _reloaded(cp, "example-gpu")[0] == "RepositoryLocation",
             240)
        # Placement: each code server belongs to the appliance of its queue, and only to it.
        assert second.code_server("example-gpu") and first.code_server("example")
        assert "example-gpu" not in first.status().get("locations", {})
        assert "example" not in second.status().get("locations", {})
        run_on_second = launch(cp, "numbers_job", location="example-gpu")
        assert wait_terminal(cp, run_on_second) == "SUCCESS"
        placed = dc.containers.list(all=True, filters={"label": f"airlock.run-id={run_on_second}"})
        assert all(c.labels.get("airlock.appliance-id") == second.appliance_id for c in placed)

        second.container.stop(timeout=20)
        # Unavailable at once (calls time out); with the reason once its last heartbeat is over 30 s old.
        def unavailable_with_reason() -> str | None:
            text = _reloaded(cp, "example-gpu")[1]
            return text if "no agent serving queue 'gpu'" in text else None

        message = wait("example-gpu unavailable with the reason", unavailable_with_reason, 120)
        print(message[:600])
        assert _reloaded(cp, "example")[0] == "RepositoryLocation"
        assert wait_terminal(cp, launch(cp, "numbers_job")) == "SUCCESS"  # the other appliance keeps running
    finally:
        second.remove()
        try:
            cp.cli("location", "remove", "example-gpu")
        except (AssertionError, docker.errors.DockerException) as exc:
            print(f"cleanup: {exc}")
