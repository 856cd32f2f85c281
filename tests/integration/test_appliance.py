"""The appliance on real Docker: supervised programs, the reconcile loop, adoption, bad config, CIS §5."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from tests import harness
from tests.integration.cis import cis_container_checks


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    return harness.images()


@pytest.fixture
def appliance(images: dict[str, str], tmp_path: Path) -> Iterator[harness.Appliance]:
    app = harness.Appliance(harness.client(), harness.unique_id(), tmp_path, images["appliance"])
    app.write_locations(harness.locations_yaml(harness.location_entry("example", images["example-location"])))
    try:
        yield app
    finally:
        app.remove()


def _process_users(app: harness.Appliance) -> dict[str, str]:
    code, out = app.exec(
        "sh", "-c", "for p in /proc/[0-9]*; do echo \"$(stat -c %U $p) $(tr '\\0' ' ' < $p/cmdline)\"; done"
    )
    assert code == 0, out
    users: dict[str, str] = {}
    for line in out.splitlines():
        user, _, cmd = line.partition(" ")
        for program in ("appliance.sockguard", "appliance.egress", "appliance.agent", "supervisord"):
            if program in cmd and "setpriv" not in cmd:
                users[program] = user
    return users


def test_example_location_loads_and_answers_ping(appliance: harness.Appliance) -> None:
    appliance.start()
    status = appliance.wait_for("example", "LOADED")
    code, out = appliance.exec("airlock", "ping", "example", "--count", "2")
    assert code == 0 and out.count("answered") == 2, out
    users = _process_users(appliance)
    assert users == {
        "supervisord": "root",
        "appliance.sockguard": "airlock-sockguard",
        "appliance.egress": "airlock-egress",
        "appliance.agent": "airlock-agent",
    }, users
    assert status["container"].startswith(f"airlock-{appliance.appliance_id}-example-")


def test_agent_cannot_open_the_real_docker_socket(appliance: harness.Appliance) -> None:
    appliance.start()
    appliance.wait_for("example", "LOADED")
    probe = (
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1]); print('CONNECTED')\nexcept OSError as e: print('REFUSED', e.errno)"
    )
    _, out = appliance.exec("python3", "-c", probe, "/var/run/docker.sock", user="airlock-agent")
    assert "REFUSED 13" in out, out  # EACCES
    _, out = appliance.exec("python3", "-c", probe, "/run/airlock/sockguard/docker.sock", user="airlock-agent")
    assert "CONNECTED" in out, out  # the filtered socket is the agent's way in
    _, out = appliance.exec("python3", "-c", probe, "/run/airlock/sockguard/docker.sock", user="airlock-egress")
    assert "REFUSED 13" in out, out  # and nobody else's


def test_restart_adopts_code_server_and_loads_again(appliance: harness.Appliance) -> None:
    appliance.start()
    first = appliance.wait_for("example", "LOADED")
    appliance.container.restart(timeout=20)
    # The status file survives the restart: wait for the new agent's first pass to say what it did.
    deadline = time.monotonic() + 120
    while "adopted code server" not in appliance.logs() and time.monotonic() < deadline:
        time.sleep(1)
    assert "adopted code server" in appliance.logs()
    again = appliance.wait_for("example", "LOADED")
    assert again["container_id"] == first["container_id"]


def test_spec_change_replaces_and_removed_location_is_cleaned_up(
    appliance: harness.Appliance, images: dict[str, str]
) -> None:
    appliance.start()
    first = appliance.wait_for("example", "LOADED")
    appliance.write_locations(
        harness.locations_yaml(
            harness.location_entry("example", images["example-location"], extra="resources: {memory: 512m}")
        )
    )
    second = appliance.wait_for("example", "LOADED", not_container=first["container_id"])
    dc = appliance.docker
    assert dc.containers.get(second["container_id"]).attrs["HostConfig"]["Memory"] == 512 * 1024**2
    with pytest.raises(docker.errors.NotFound):
        dc.containers.get(first["container_id"])
    appliance.write_locations("version: 1\nlocations: []\n")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        owned = dc.containers.list(all=True, filters={"label": f"airlock.appliance-id={appliance.appliance_id}"})
        nets = dc.networks.list(filters={"label": f"airlock.appliance-id={appliance.appliance_id}"})
        if not owned and not nets:
            break
        time.sleep(1)
    assert not owned and not nets, (owned, nets)


def test_import_error_shows_error_then_recovers_without_operator(
    appliance: harness.Appliance, images: dict[str, str]
) -> None:
    appliance.write_locations(
        harness.locations_yaml(
            harness.location_entry("example", images["example-location"], module="example_location.no_such_module")
        )
    )
    appliance.start()
    error = appliance.wait_for("example", "ERROR")
    assert "no_such_module" in error["error"], error
    appliance.write_locations(harness.locations_yaml(harness.location_entry("example", images["example-location"])))
    appliance.wait_for("example", "LOADED", timeout=180)


def test_killed_code_server_comes_back(appliance: harness.Appliance) -> None:
    appliance.start()
    first = appliance.wait_for("example", "LOADED")
    appliance.docker.containers.get(first["container_id"]).kill()
    appliance.wait_for("example", "LOADED", not_container=first["container_id"], timeout=180)


@pytest.mark.parametrize(
    ("file", "content", "expected"),
    [
        (
            "locations",
            "version: 1\nlocations:\n  - name: Bad Name\n    image: x\n    module: m\n",
            "locations.yaml: locations[0].name",
        ),
        (
            "locations",
            "version: 1\nlocations:\n  - name: ex\n    image: x\n    module: m\n    resources: {memory: 64g}\n",
            "locations.yaml: locations[0].resources.memory",
        ),
        ("policy", "version: 1\nallow_pull: yes-please\n", "images.yaml: allow_pull"),
    ],
)
def test_bad_config_refuses_to_start_naming_file_and_field(
    appliance: harness.Appliance, tmp_path: Path, file: str, content: str, expected: str
) -> None:
    if file == "locations":
        appliance.write_locations(content)
    else:
        policy = tmp_path / "policy"
        policy.mkdir()
        for src in (harness.ROOT / "policy").iterdir():
            (policy / src.name).write_text(src.read_text())
        (policy / "images.yaml").write_text(content)
        for p in [policy, *policy.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        appliance.extra_env["AIRLOCK_POLICY_DIR"] = "/etc/airlock/test-policy"
        appliance.extra_volumes[str(policy)] = {"bind": "/etc/airlock/test-policy", "mode": "ro"}
    appliance.start()
    result = appliance.container.wait(timeout=60)
    assert result["StatusCode"] == 2, result
    logs = appliance.logs()
    assert expected in logs, logs
    assert not appliance.docker.containers.list(
        all=True, filters={"label": [f"airlock.appliance-id={appliance.appliance_id}", "airlock.role=code-server"]}
    )


def test_code_server_passes_cis_docker_benchmark_section_5(appliance: harness.Appliance) -> None:
    appliance.start()
    status = appliance.wait_for("example", "LOADED")
    dc: docker.DockerClient = appliance.docker
    attrs = dc.api.inspect_container(status["container_id"])
    info = dc.info()
    results = cis_container_checks(attrs, info)
    failed = {k: v for k, v in results.items() if v.startswith("FAIL")}
    print("\n".join(f"  {k}: {v}" for k, v in results.items()))
    assert not failed, failed
    assert len([v for v in results.values() if v.startswith("PASS")]) >= 20
