"""A control plane and an appliance as separate containers on separate networks, shared by the tests of
tests/integration that need both (one stack per session: starting it costs a minute).

The gateway is published on the host (as a hosted control plane would be on the internet), bound to the
host's address on the user network only; the appliance reaches it through the host, and nothing reaches
the appliance."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest
from docker.models.containers import Container

from tests import harness

LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message stack }
  ... on RunConfigValidationInvalid { errors { message } } } }"""
RUN = """query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"""
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
SPOOL_MAX_BYTES = 64 * 1024  # small, so a control plane outage mid-run fills it: backpressure, not loss
GRACE_SECONDS = 20  # how long an appliance key rotated away from keeps working on the test control plane
JOBS = """{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename
  ... on RepositoryLocation { repositories { jobs { name } } } } } } } }"""


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


def wait(what: str, check, timeout: float):
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


# Package scope: the stack goes when tests/integration is done, so the e2e tests that must remove the airlock
# images (tests/e2e/test_bundle.py) do not find them held by its containers.
@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, harness.Appliance]]:
    with control_plane_and_appliance(tmp_path_factory.mktemp("cp")) as started:
        yield started


@contextlib.contextmanager
def control_plane_and_appliance(workdir: Path, *, quiet: bool = False) -> Iterator[tuple[ControlPlane,
                                                                                         harness.Appliance]]:
    """Start both (images built or reused), enroll the appliance, register the example location; remove all."""
    images = harness.images()
    dc = harness.client()
    run = harness.unique_id()
    network = f"airlock-{run}-cp"
    user_network = f"airlock-{run}-user"  # the user's side: a different network; only the host links the two
    dc.networks.create(network, driver="bridge", labels={"airlock.test-run": run})
    user_gateway = dc.networks.create(user_network, driver="bridge", labels={"airlock.test-run": run}) \
        .attrs["IPAM"]["Config"][0]["Gateway"]
    gateway_port, fastpath_port = _free_port(), _free_port()
    appliance = harness.Appliance(dc, run, workdir, images["appliance"], network=user_network)
    cp_container = None
    try:
        # The gateway is published on the host (as a hosted control plane would be on the internet), bound
        # to the host's address on the user network only; the appliance reaches it through the host.
        cp_container = dc.containers.run(images["controlplane"], detach=True, name=f"airlock-{run}-controlplane",
                                          network=network, labels={"airlock.test-run": run},
                                          environment={"AIRLOCK_CP_TLS_HOSTNAMES": f"controlplane,{user_gateway}",
                                                       "AIRLOCK_CP_KEY_GRACE_SECONDS": str(GRACE_SECONDS),
                                                       "AIRLOCK_CP_FASTPATH_PORT": str(fastpath_port),
                                                       "AIRLOCK_CP_FASTPATH_STATS_SECONDS": "5"},
                                          # the relay's fast-path tunnel port too (docs/FASTPATH.md): agents dial it
                                          ports={"8443/tcp": (user_gateway, gateway_port),
                                                 "8450/tcp": (user_gateway, fastpath_port)},
                                          volumes={f"airlock-{run}-cp-state": {"bind": "/var/lib/airlock-cp"}})
        cp = ControlPlane(dc, cp_container, network)
        wait("control plane webserver", lambda: cp.graphql("{ version }"), 120)
        image_id = dc.images.get(images["example-location"]).id
        cp.cli("location", "add", "example", "--image", image_id, "--module", "example_location.definitions")
        token = cp.cli("agent-token", "create").strip().splitlines()[-1]
        ca = workdir / "ca.pem"
        bits, _ = cp_container.get_archive("/var/lib/airlock-cp/tls/ca.pem")
        _extract_single(b"".join(bits), ca)
        appliance.write_locations("version: 1\nlocations: []\n")
        appliance.extra_env.update({"AIRLOCK_SPOOL_MAX_BYTES": str(SPOOL_MAX_BYTES),
                                    "AIRLOCK_CONTROL_PLANE_URL": f"https://{user_gateway}:{gateway_port}",
                                    "AIRLOCK_ENROLL_TOKEN": token, "AIRLOCK_CA_FILE": "/etc/airlock/ca.pem"})
        appliance.extra_volumes[str(ca)] = {"bind": "/etc/airlock/ca.pem", "mode": "ro"}
        appliance.start()
        yield cp, appliance
    finally:
        if not quiet:
            print(appliance.logs()[-3000:])
        if cp_container is not None:
            if not quiet:
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


def launch(cp: ControlPlane, job: str, run_config: dict | None = None, *, location: str = "example") -> str:
    params = {"selector": {"repositoryLocationName": location, "repositoryName": "__repository__", "jobName": job},
              "runConfigData": run_config or {}}
    result = cp.graphql(LAUNCH, {"p": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def status(cp: ControlPlane, run_id: str) -> str:
    return cp.graphql(RUN, {"id": run_id})["runOrError"]["status"]


def wait_terminal(cp: ControlPlane, run_id: str, timeout: float = 240) -> str:
    return wait(f"run {run_id} to end", lambda: (s := status(cp, run_id)) in TERMINAL and s, timeout)


def run_containers(run_id: str) -> list:
    return harness.client().containers.list(all=True, filters={"label": f"airlock.run-id={run_id}"})


@pytest.fixture()
def loaded(stack):
    """The location loaded in the appliance and in the webserver, with the jobs these tests launch."""
    cp, appliance = stack
    appliance.wait_for("example", "LOADED", timeout=240)

    def jobs() -> set[str] | None:
        entries = cp.graphql(JOBS)["workspaceOrError"]["locationEntries"]
        entry = next(e for e in entries if e["name"] == "example")["locationOrLoadError"]
        names = {j["name"] for r in entry.get("repositories", []) for j in r["jobs"]}
        return names if {"numbers_job", "sleepy_job", "hungry_job", "chatty_job"} <= names else None

    wait("example loaded in the webserver", jobs, 240)
    return cp, appliance
