"""A control plane and an appliance as separate containers on separate networks, shared by the tests of
tests/integration that need both (one stack per session: starting it costs a minute).

The gateway is published on the host (as a hosted control plane would be on the internet), bound to the
host's address on the user network only; the appliance reaches it through the host, and nothing reaches
the appliance."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest
from docker.models.containers import Container

from tests import harness


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


@pytest.fixture(scope="session")
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
        wait("control plane webserver", lambda: cp.graphql("{ version }"), 120)
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
