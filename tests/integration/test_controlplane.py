"""The control plane and the appliance as separate containers: unmodified Dagster webserver and daemon
see user code that runs only in the appliance's hardened code server, through the gRPC relay and the
signed long-poll agent API. The appliance publishes nothing; every connection goes out from it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest
from docker.models.containers import Container

from tests import harness

WORKSPACE = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message stack }
    ... on RepositoryLocation { repositories { name jobs { name } assetNodes { assetKey { path } }
      schedules { name } sensors { name } } } } } } } }"""
SENSOR = {"repositoryLocationName": "example", "repositoryName": "__repository__", "sensorName": "new_numbers_sensor"}


@dataclass
class ControlPlane:
    dc: docker.DockerClient
    container: Container
    network: str

    @property
    def ip(self) -> str:
        self.container.reload()
        return self.container.attrs["NetworkSettings"]["Networks"][self.network]["IPAddress"]

    def cli(self, *args: str) -> str:
        result = self.container.exec_run(["airlock-cp", *args], demux=True)
        out = (result.output[0] or b"").decode()
        assert result.exit_code == 0, (args, out, (result.output[1] or b"").decode())
        return out

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        response = httpx.post(f"http://{self.ip}:3000/graphql", json={"query": query, "variables": variables or {}},
                              timeout=60)
        body = response.json()
        assert "errors" not in body, body
        return body["data"]


def _wait(what: str, check, timeout: float):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, AssertionError, KeyError, TypeError) as exc:
            last = exc
        time.sleep(2)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s; last: {last}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, harness.Appliance]]:
    images = harness.images()
    dc = harness.client()
    run = harness.unique_id()
    workdir = tmp_path_factory.mktemp("cp")
    network = f"airlock-{run}-cp"
    user_network = f"airlock-{run}-user"  # the user's side: a different network; only the host links the two
    dc.networks.create(network, driver="bridge", labels={"airlock.test-run": run})
    user_gateway = dc.networks.create(user_network, driver="bridge", labels={"airlock.test-run": run}) \
        .attrs["IPAM"]["Config"][0]["Gateway"]
    gateway_port = _free_port()
    appliance = harness.Appliance(dc, run, workdir, images["appliance"], network=user_network)
    cp_container = None
    try:
        # The gateway is published on the host (as a hosted control plane would be on the internet), bound
        # to the host's address on the user network only; the appliance reaches it through the host.
        cp_container = dc.containers.run(images["controlplane"], detach=True, name=f"airlock-{run}-controlplane",
                                          network=network, labels={"airlock.test-run": run},
                                          environment={"AIRLOCK_CP_TLS_HOSTNAMES": f"controlplane,{user_gateway}"},
                                          ports={"8443/tcp": (user_gateway, gateway_port)},
                                          volumes={f"airlock-{run}-cp-state": {"bind": "/var/lib/airlock-cp"}})
        cp = ControlPlane(dc, cp_container, network)
        _wait("control plane webserver", lambda: cp.graphql("{ version }"), 120)
        image_id = dc.images.get(images["example-location"]).id
        cp.cli("location", "add", "example", "--image", image_id, "--module", "example_location.definitions")
        token = cp.cli("agent-token", "create").strip().splitlines()[-1]
        ca = workdir / "ca.pem"
        bits, _ = cp_container.get_archive("/var/lib/airlock-cp/tls/ca.pem")
        _extract_single(b"".join(bits), ca)
        appliance.write_locations("version: 1\nlocations: []\n")
        appliance.extra_env.update({"AIRLOCK_CONTROL_PLANE_URL": f"https://{user_gateway}:{gateway_port}",
                                    "AIRLOCK_ENROLL_TOKEN": token, "AIRLOCK_CA_FILE": "/etc/airlock/ca.pem"})
        appliance.extra_volumes[str(ca)] = {"bind": "/etc/airlock/ca.pem", "mode": "ro"}
        appliance.start()
        yield cp, appliance
    finally:
        print(appliance.logs()[-3000:])
        if cp_container is not None:
            print(cp_container.logs().decode(errors="replace")[-3000:])
            cp_container.remove(force=True)
        appliance.remove()
        harness.cleanup(dc, run)
        for volume in dc.volumes.list(filters={"name": f"airlock-{run}-cp-state"}):
            volume.remove(force=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _extract_single(tar_bytes: bytes, target: Path) -> None:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        member = tar.getmembers()[0]
        target.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    target.chmod(0o644)


def test_webserver_shows_the_location_loaded_with_its_definitions(stack) -> None:
    cp, appliance = stack
    appliance.wait_for("example", "LOADED", timeout=240)

    def loaded() -> dict | None:
        entry = cp.graphql(WORKSPACE)["workspaceOrError"]["locationEntries"][0]
        ok = entry["loadStatus"] == "LOADED" and entry["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        return entry if ok else None

    entry = _wait("example LOADED in the Dagster UI", loaded, 180)
    repo = entry["locationOrLoadError"]["repositories"][0]
    assert {"numbers_job", "assets_job"} <= {j["name"] for j in repo["jobs"]}
    assert {tuple(a["assetKey"]["path"]) for a in repo["assetNodes"]} == {("raw_numbers",), ("squares",), ("summary",)}
    assert [s["name"] for s in repo["schedules"]] == ["every_five_minutes"]
    assert [s["name"] for s in repo["sensors"]] == ["new_numbers_sensor"]


def test_separate_networks_and_nothing_reaches_the_appliance(stack) -> None:
    cp, appliance = stack
    appliance.wait_for("example", "LOADED", timeout=240)  # the appliance reached the control plane
    appliance.container.reload()
    assert not any(appliance.container.attrs["NetworkSettings"]["Ports"].values())
    assert appliance.container.attrs["HostConfig"]["PortBindings"] in ({}, None)
    networks = appliance.container.attrs["NetworkSettings"]["Networks"]
    assert cp.network not in networks
    appliance_ip = next(n["IPAddress"] for name, n in networks.items() if name.endswith("-user"))
    probe = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)"
             "\n print('reached')\nexcept OSError as e: print('blocked', e)")
    for port in ("3128", "22", "8443"):
        result = cp.container.exec_run(["python3", "-c", probe, appliance_ip, port])
        assert result.output.decode().startswith("blocked"), (port, result.output)


def _entry(cp: ControlPlane) -> dict:
    return cp.graphql(WORKSPACE)["workspaceOrError"]["locationEntries"][0]


def _ui_loaded(cp: ControlPlane) -> dict | None:
    entry = _entry(cp)
    return entry if entry["locationOrLoadError"]["__typename"] == "RepositoryLocation" else None


def test_import_error_shows_traceback_then_update_recovers_without_operator(stack) -> None:
    cp, appliance = stack
    cp.cli("location", "update", "example", "--module", "example_location.no_such_module")

    def ui_error() -> dict | None:
        entry = _entry(cp)
        error = entry["locationOrLoadError"]
        failed = error and error["__typename"] == "PythonError" and "no_such_module" in error["message"]
        return entry if failed else None

    entry = _wait("the import error in the Dagster UI", ui_error, 240)
    assert "DagsterImportError" in entry["locationOrLoadError"]["message"]
    assert entry["locationOrLoadError"]["stack"], "the UI gets the traceback, not just a message"
    assert "no_such_module" in appliance.wait_for("example", "ERROR", timeout=120)["error"]
    cp.cli("location", "update", "example", "--module", "example_location.definitions")
    _wait("example LOADED again in the Dagster UI", lambda: _ui_loaded(cp), 240)


def test_killed_code_server_comes_back_by_itself(stack) -> None:
    cp, appliance = stack
    first = appliance.wait_for("example", "LOADED", timeout=240)
    appliance.docker.containers.get(first["container_id"]).kill()
    appliance.wait_for("example", "LOADED", timeout=240, not_container=first["container_id"])
    _wait("example LOADED in the Dagster UI after the kill", lambda: _ui_loaded(cp), 180)


def test_agent_restart_adopts_and_loses_no_queued_work(stack) -> None:
    cp, appliance = stack
    before = appliance.wait_for("example", "LOADED", timeout=240)
    code, out = appliance.exec("supervisorctl", "-c", "/etc/airlock/supervisord.conf", "signal", "KILL", "agent")
    assert code == 0, out
    # Work queued while the agent is down (the webserver's reload relays ListRepositories) is answered
    # once supervisord has restarted it.
    reload = """mutation { reloadWorkspace { __typename ... on Workspace { locationEntries { name
      locationOrLoadError { __typename } } } } }"""
    result = cp.graphql(reload)["reloadWorkspace"]["locationEntries"][0]["locationOrLoadError"]
    assert result["__typename"] == "RepositoryLocation", result
    after = appliance.wait_for("example", "LOADED", timeout=120)
    assert after["container_id"] == before["container_id"]  # adopted, not redeployed
    assert appliance.logs().count("adopted code server") >= 1


def test_daemon_evaluates_the_sensor_through_the_relay_with_a_cursor(stack) -> None:
    cp, appliance = stack
    appliance.wait_for("example", "LOADED", timeout=240)
    start = """mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename
      ... on Sensor { sensorState { status } } ... on PythonError { message } } }"""
    _wait("sensor started", lambda: cp.graphql(start, {"s": SENSOR})["startSensor"]["__typename"] == "Sensor", 120)
    ticks_query = """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { __typename
      ... on Sensor { sensorState { status ticks(limit: 10) { status cursor error { message } } } } } }"""

    def two_ticks() -> list | None:
        ticks = cp.graphql(ticks_query, {"s": SENSOR})["sensorOrError"]["sensorState"]["ticks"]
        cursors = [t["cursor"] for t in ticks if t["status"] == "SUCCESS" and t["cursor"]]
        return ticks if len(set(cursors)) >= 2 else None

    ticks = _wait("two successful sensor ticks", two_ticks, 240)
    cursors = [int(t["cursor"]) for t in ticks if t["status"] == "SUCCESS" and t["cursor"]]
    assert cursors == sorted(cursors, reverse=True) and cursors[0] > cursors[-1], ticks  # newest first, advancing
    print(json.dumps(ticks[:3]))
