"""The escape catalogue: attacks from inside a user container that the appliance launched.

Each attack is shown blocked inside the airlock container AND working where it is allowed (its
"twin"): the same code in a deliberately loose control container, or the permitted variant of the
same action, so a test cannot pass merely because the probe is broken.

Topology (all the project's own containers and networks, named per run):
  location `alpha` (256m memory, 128 pids, egress allows fake-outside:8080 and its CIDR, plus two
  names that resolve to refused addresses) and location `beta` (no egress), each on its own internal
  network; "the internet" is a fake HTTP server on a separate network; "the intranet" another one;
  169.254.169.254 is a fake metadata server on a link-local network. The appliance joins all three so
  that a refusal is the proxy's policy, not a missing route.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from docker.models.containers import Container

from protocol.locations import ARTIFACTS_DIR
from tests import harness

ATTACKS = (Path(__file__).parent / "attacks.py").read_text()
HTTP_SERVER = ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"]


@dataclass
class World:
    appliance: harness.Appliance
    alpha: Container
    beta: Container
    control_image: str
    outside_ip: str
    intranet_ip: str
    beta_ip: str


def _network(dc: docker.DockerClient, run: str, name: str, subnet: str | None = None) -> str:
    ipam = None
    if subnet:
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])
    dc.networks.create(f"airlock-{run}-{name}", driver="bridge", ipam=ipam, labels={"airlock.test-run": run})
    return f"airlock-{run}-{name}"


def _server(dc: docker.DockerClient, image: str, run: str, name: str, network: str, ip: str | None = None) -> str:
    """A plain HTTP server on `network` (alias `name`), playing a host outside the location."""
    host_config = dc.api.create_host_config(network_mode=network, read_only=True, tmpfs={"/tmp": ""})
    endpoint = dc.api.create_endpoint_config(aliases=[name], ipv4_address=ip)
    created = dc.api.create_container(
        image, HTTP_SERVER, name=f"airlock-{run}-{name}", user="10001", working_dir="/tmp",
        labels={"airlock.test-run": run}, host_config=host_config,
        networking_config=dc.api.create_networking_config({network: endpoint}),
    )
    dc.api.start(created["Id"])
    return dc.api.inspect_container(created["Id"])["NetworkSettings"]["Networks"][network]["IPAddress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    images = harness.images()
    dc = harness.client()
    run = harness.unique_id()
    appliance = harness.Appliance(dc, run, tmp_path_factory.mktemp("escape"), images["appliance"])
    try:
        outside_net = _network(dc, run, "internet")
        intranet_net = _network(dc, run, "intranet")
        metadata_net = _network(dc, run, "metadata", subnet="169.254.169.0/24")
        outside_ip = _server(dc, images["example-location"], run, "fake-outside", outside_net)
        intranet_ip = _server(dc, images["example-location"], run, "intranet", intranet_net)
        _server(dc, images["example-location"], run, "metadata", metadata_net, ip="169.254.169.254")
        outside_cidr = dc.networks.get(outside_net).attrs["IPAM"]["Config"][0]["Subnet"]
        appliance.write_locations(harness.locations_yaml(
            harness.location_entry("alpha", images["example-location"], extra=f"""
resources: {{memory: 256m, pids: 128}}
egress:
  allow: ["fake-outside:8080", "intranet:8080", "metadata:8080"]
  allow_cidrs: ["{outside_cidr}"]
"""),
            harness.location_entry("beta", images["example-location"]),
        ))
        appliance.start()
        for net in (outside_net, intranet_net, metadata_net):
            dc.networks.get(net).connect(appliance.container)
        appliance.wait_for("alpha", "LOADED")
        beta_status = appliance.wait_for("beta", "LOADED")
        beta = dc.containers.get(beta_status["container_id"])
        beta_ip = next(n["IPAddress"] for n in beta.attrs["NetworkSettings"]["Networks"].values())
        yield World(appliance, appliance.code_server("alpha"), beta, images["example-location"],
                    outside_ip, intranet_ip, beta_ip)
    finally:
        appliance.remove()


def attack(container: Container, name: str, *args: str) -> dict:
    result = container.exec_run(["python3", "-c", ATTACKS, name, *args])
    lines = [line for line in result.output.decode(errors="replace").splitlines() if line.startswith("{")]
    assert lines, f"attack {name} printed nothing (exit {result.exit_code}): {result.output[-500:]!r}"
    return {**json.loads(lines[-1]), "exit_code": result.exit_code}


def control(world: World, name: str, *args: str, **loose: object) -> dict:
    """Run an attack in a loose control container the TEST starts directly (never through airlock)."""
    dc = world.appliance.docker
    options = {"user": "0", "cap_add": ["SYS_ADMIN", "SYS_PTRACE", "NET_RAW"],
               "security_opt": ["seccomp=unconfined"], "network_mode": "none", **loose}
    container = dc.containers.run(world.control_image, ["python3", "-c", ATTACKS, name, *args], detach=True,
                                  labels={"airlock.test-run": world.appliance.appliance_id}, **options)
    try:
        container.wait(timeout=120)
        lines = [ln for ln in container.logs().decode().splitlines() if ln.startswith("{")]
        return json.loads(lines[-1])
    finally:
        container.remove(force=True)


# -- syscalls and privileges ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mount", "unshare_user", "unshare_mount", "ptrace", "keyctl", "bpf", "io_uring"])
def test_syscall_refused_in_airlock_and_works_in_control(world: World, name: str) -> None:
    blocked = attack(world.alpha, name)
    assert blocked["ok"] is False and blocked["error"] == "EPERM", blocked
    allowed = control(world, name)
    assert allowed["ok"] is True, f"control container could not {name}: {allowed}"


def test_32bit_abi_refused_in_airlock_and_runs_in_control(world: World) -> None:
    """socketcall(2) through `int 0x80` hides the socket family from seccomp; airlock refuses the i386 ABI."""
    blocked = attack(world.alpha, "i386_socketcall")
    assert blocked["ok"] is False, blocked
    assert blocked.get("killed_by") == "SIGSYS" or blocked.get("error") in ("EPERM", "ENOSYS"), blocked
    allowed = control(world, "i386_socketcall")
    assert allowed["ok"] is True, f"control container could not make an i386 socketcall: {allowed}"
    docker_default = control(world, "i386_socketcall", security_opt=[])  # what Docker's own profile does
    print(f"i386 socketcall: airlock {blocked}, unconfined {allowed}, Docker's default profile {docker_default}")


def test_raw_socket_refused_without_net_raw(world: World) -> None:
    assert attack(world.alpha, "raw_socket")["ok"] is False
    assert control(world, "raw_socket")["ok"] is True


def test_root_filesystem_is_read_only_and_tmp_is_writable(world: World) -> None:
    blocked = attack(world.alpha, "write_file", "/opt/dagster/evil")
    assert blocked["ok"] is False and blocked["error"] in {"EROFS", "EACCES"}, blocked
    assert attack(world.alpha, "write_file", "/usr/evil")["error"] == "EROFS"
    assert attack(world.alpha, "write_file", "/tmp/fine")["ok"] is True


def test_setuid_escalation_refused(world: World) -> None:
    blocked = attack(world.alpha, "setuid")
    assert blocked["ok"] is False and blocked["nnp"] == "1", blocked
    assert control(world, "setuid")["ok"] is True  # root with capabilities may setuid(0)


# -- Docker socket, state, secrets ---------------------------------------------------------------

def test_no_docker_socket_reachable(world: World) -> None:
    found = attack(world.alpha, "docker_socket")
    assert found["ok"] is False, found
    # Twin: the same probe finds the socket where one is mounted (a container the test starts).
    mounted = control(world, "docker_socket", volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock"}})
    assert mounted["ok"] is True and "/var/run/docker.sock" in mounted["found"]


def test_appliance_state_volume_unreachable(world: World) -> None:
    assert attack(world.alpha, "read_path", "/var/lib/airlock")["ok"] is False
    code, out = world.appliance.exec("cat", "/var/lib/airlock/status.json", user="airlock-agent")
    assert code == 0 and "alpha" in out  # the agent itself reads it
    mounts = world.alpha.attrs.get("Mounts", [])
    # No bind mount, and no volume but the location's own artifact volume (Dagster's files between runs).
    assert not [m for m in mounts if m.get("Type") == "bind"], mounts
    volumes = [(m.get("Name"), m.get("Destination")) for m in mounts if m.get("Type") == "volume"]
    assert volumes == [(f"airlock-{world.appliance.appliance_id}-alpha-artifacts", ARTIFACTS_DIR)], volumes


def test_no_agent_secret_in_env_or_mounts(world: World) -> None:
    seen = attack(world.alpha, "environ")
    leaked = [n for n in seen["env"] if n.startswith(("AIRLOCK_", "DOCKER_"))]
    assert leaked == [], leaked
    assert not [m for m in seen["mounts"] if "docker.sock" in m or "airlock" in m], seen["mounts"]


# -- network -------------------------------------------------------------------------------------

def test_direct_connection_bypassing_proxy_fails(world: World) -> None:
    direct = attack(world.alpha, "connect", world.outside_ip, "8080")
    assert direct["ok"] is False, direct
    via_proxy = attack(world.alpha, "proxy", "airlock-egress", "3128", "fake-outside", "8080")
    assert via_proxy["ok"] is True, via_proxy


def test_host_unreachable_from_location_network(world: World) -> None:
    gateway = attack(world.alpha, "gateway")["gateway"]
    blocked = attack(world.alpha, "reach", gateway, "9")
    assert blocked["ok"] is False and blocked["error"] in {"EHOSTUNREACH", "ENETUNREACH", "timeout"}, blocked
    # Twin: on a plain `internal: true` network (what Docker gives by default) the host answers.
    dc, run = world.appliance.docker, world.appliance.appliance_id
    plain = dc.networks.create(f"airlock-{run}-plain", driver="bridge", internal=True,
                               labels={"airlock.test-run": run})
    plain_gateway = plain.attrs["IPAM"]["Config"][0]["Gateway"]
    assert control(world, "reach", plain_gateway, "9", network_mode=plain.name)["ok"] is True


def test_other_location_code_server_unreachable(world: World) -> None:
    assert attack(world.alpha, "connect", world.beta_ip, "4000")["ok"] is False
    code, out = world.appliance.exec("airlock", "ping", "beta")
    assert code == 0 and "answered" in out, out  # the appliance, on both networks, reaches it


def test_metadata_address_unreachable_directly_and_via_proxy(world: World) -> None:
    assert attack(world.alpha, "connect", "169.254.169.254", "8080")["ok"] is False
    refused = attack(world.alpha, "proxy", "airlock-egress", "3128", "metadata", "8080")
    assert refused["ok"] is False and "metadata" in refused["reason"], refused
    # Twin: the fake metadata server answers a container the test put on its network.
    run = world.appliance.appliance_id
    allowed = control(world, "connect", "169.254.169.254", "8080", network_mode=f"airlock-{run}-metadata")
    assert allowed["ok"] is True, allowed


def test_proxy_refuses_disallowed_host(world: World) -> None:
    refused = attack(world.alpha, "proxy", "airlock-egress", "3128", "fake-outside", "9999")
    assert refused["ok"] is False and "allowlist" in refused["reason"], refused
    other = attack(world.beta, "proxy", "airlock-egress", "3128", "fake-outside", "8080")
    assert other["ok"] is False and "allowlist" in other["reason"], other  # beta allows nothing
    assert attack(world.alpha, "proxy", "airlock-egress", "3128", "fake-outside", "8080")["ok"] is True


def test_proxy_refuses_private_address(world: World) -> None:
    by_name = attack(world.alpha, "proxy", "airlock-egress", "3128", "intranet", "8080")
    assert by_name["ok"] is False and "private" in by_name["reason"], by_name
    by_ip = attack(world.alpha, "proxy", "airlock-egress", "3128", world.intranet_ip, "8080")
    assert by_ip["ok"] is False, by_ip
    # Twin: an address inside the location's explicitly allowed CIDR passes.
    assert attack(world.alpha, "proxy", "airlock-egress", "3128", world.outside_ip, "8080")["ok"] is True


# -- resource exhaustion --------------------------------------------------------------------------

def test_fork_bomb_stops_at_pids_limit(world: World) -> None:
    bomb = attack(world.alpha, "fork_bomb")
    assert bomb["ok"] is False and bomb["refused"] == "EAGAIN", bomb
    assert 0 < bomb["forked"] < 128, bomb
    world.alpha.reload()
    assert world.alpha.status == "running"
    assert world.appliance.status()["locations"]["alpha"]["state"] == "LOADED"


def test_memory_bomb_is_killed_inside_the_container_only(world: World) -> None:
    small = attack(world.alpha, "memory", "32")
    assert small["ok"] is True
    result = world.alpha.exec_run(["python3", "-c", ATTACKS, "memory", "2048"])
    assert result.exit_code == 137, (result.exit_code, result.output[-300:])  # SIGKILL by the OOM killer
    world.alpha.reload()
    assert world.alpha.status == "running"
    assert world.appliance.exec("airlock", "ping", "alpha")[0] == 0
