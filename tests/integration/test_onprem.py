"""The on-prem stack (compose/onprem.yml, brought up by scripts/onprem.py as an operator would):

- a run of the example job succeeds with Postgres holding the run and its events, and no SQLite file in use;
- two gateways on one Postgres queue, claimed from concurrently by two agents through both: every request is
  handed out exactly once;
- a gateway certificate not signed by the CA the client trusts is refused before anything reaches a gateway
  (the audit log does not move, the enrollment token stays unused) - from a GatewayClient that trusts another CA
  made by `airlock-cp tls init`, and from a real appliance that trusts the real CA facing an impostor gateway.

One stack per module (about a minute to come up); everything is named by a unique id and removed afterwards,
volumes included.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker.errors
import httpx
import pytest

from appliance.agent.transport import GatewayClient, https_client
from protocol.signing import SigningKey
from scripts.onprem import OnPrem, UpResult
from tests import harness

ITEMS = 1000  # requests enqueued for the claim race
BATCH = 4  # per claim: small, so the four claimers race for the same rows many times


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@pytest.fixture(scope="module")
def onprem() -> Iterator[tuple[OnPrem, UpResult]]:
    images = harness.images()
    ui, gw1, gw2 = _free_ports(3)
    stack = OnPrem(onprem_id=harness.unique_id(), ui_port=ui, gateway_ports=(gw1, gw2), docker=harness.client())
    dc = stack.docker
    try:
        result = stack.up(images)
        print(f"\n[onprem] milestones (s since up): {result.phases}; run {result.status} in {result.run_seconds:.1f} s")
        yield stack, result
    finally:
        for service in ("controlplane", "gateway2", "appliance"):
            with contextlib.suppress(docker.errors.DockerException):
                print(f"--- {service}\n" + stack.container(service).logs().decode(errors="replace")[-2500:])
        stack.down()
        left = [c.name for c in dc.containers.list(all=True) if c.name.startswith(stack.name)]
        left += [c.name for c in dc.containers.list(all=True, filters={"label": f"airlock.appliance-id="
                                                                                 f"{stack.onprem_id}"})]
        left += [n.name for n in dc.networks.list(filters={"name": stack.name})]
        left += [v.name for v in dc.volumes.list() if v.name.endswith(f"-{stack.onprem_id}")]
        assert not left, f"left behind: {left}"


def _audit_count(stack: OnPrem, where: str = "true") -> int:
    return int(stack.psql(f"SELECT count(*) FROM airlock_audit_log WHERE {where}", "airlock")[0][0])


# What an impostor-facing appliance would leave if any request got through: an enrollment (accepted or not) or a
# refusal. The real appliance's own traffic (claims, results) keeps adding accepted entries meanwhile.
THROUGH = "operation = 'enrollAgent' OR NOT accepted"


def _token(stack: OnPrem) -> str:
    return stack.cp_cli("agent-token", "create").strip().splitlines()[-1]


def test_run_succeeds_with_postgres_holding_the_run_and_its_events(onprem: tuple[OnPrem, UpResult]) -> None:
    stack, result = onprem
    assert result.status == "SUCCESS"
    run_id = result.run_id
    assert stack.psql(f"SELECT status FROM runs WHERE run_id = '{run_id}'") == [["SUCCESS"]]
    events = dict(stack.psql(f"SELECT dagster_event_type, count(*) FROM event_logs WHERE run_id = '{run_id}' "
                             "AND dagster_event_type IS NOT NULL GROUP BY 1"))
    print(f"[onprem] run {run_id}: events in Postgres {events}")
    # RUN_START and RUN_SUCCESS, under the names Dagster stores them by
    assert events.get("PIPELINE_START") == "1" and events.get("PIPELINE_SUCCESS") == "1", events
    assert int(events.get("ASSET_MATERIALIZATION", 0)) == 3, events  # raw_numbers, squares, summary
    assert int(events.get("STEP_SUCCESS", 0)) == 3, events
    # The storage RPC's once-only ledger and the queue are in the airlock database of the same server.
    assert int(stack.psql(f"SELECT count(*) FROM airlock_storage_applied WHERE run_id = '{run_id}'", "airlock")[0][0])
    assert stack.psql("SELECT count(*) FROM airlock_work_items WHERE kind = 'LAUNCH_RUN' AND status = 'done'",
                      "airlock") == [["1"]]
    # Nothing of the control plane is in SQLite: no database file in its state volume, Postgres in dagster.yaml.
    cp = stack.container("controlplane")
    found = cp.exec_run(["find", "/var/lib/airlock-cp", "-name", "*.db", "-o", "-name", "*.sqlite*"])
    assert found.exit_code == 0 and found.output.decode().strip() == "", found.output
    instance = cp.exec_run(["cat", "/var/lib/airlock-cp/dagster/dagster.yaml"]).output.decode()
    assert "\nstorage:\n  postgres:\n" in instance, instance


def test_two_gateways_hand_out_every_request_exactly_once(onprem: tuple[OnPrem, UpResult]) -> None:
    stack, _ = onprem
    ca, queue = str(stack.workdir / "ca.pem"), f"claims-{stack.onprem_id}"
    clients: list[tuple[str, int, GatewayClient]] = []  # (agent id, gateway, client): 2 agents x 2 gateways
    for _ in range(2):
        key = SigningKey.generate()
        first = GatewayClient(https_client(stack.gateway_url(0), ca), key)
        agent_id = first.enroll(_token(stack), [queue]).agent_id
        first.claim_work([queue], wait_seconds=0)  # the RECONCILE_LOCATIONS every enrollment queues
        second = GatewayClient(https_client(stack.gateway_url(1), ca), key)
        second.pinned = first.pinned
        clients += [(agent_id, 0, first), (agent_id, 1, second)]

    enqueue = f"""
import json
from controlplane.db import create_engine
from controlplane.gateway.queue import WorkQueue
from controlplane.settings import ControlPlaneSettings
queue = WorkQueue(create_engine(ControlPlaneSettings.from_env().database_url))
print(json.dumps([queue.enqueue("default", {queue!r}, "GRPC_CALL", {{"n": n}}) for n in range({ITEMS})]))
"""
    started = time.monotonic()
    out = stack.container("controlplane").exec_run(["python", "-c", enqueue])
    assert out.exit_code == 0, out.output
    ids = set(json.loads(out.output.decode().strip().splitlines()[-1]))
    enqueue_seconds = time.monotonic() - started

    claimed: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    calls: collections.Counter[int] = collections.Counter()
    lock, barrier, errors = threading.Lock(), threading.Barrier(len(clients)), []

    def claim(agent_id: str, gateway: int, client: GatewayClient) -> None:
        try:
            barrier.wait()
            empty = 0
            while empty < 3:  # a claim can come back empty while the others hold the last rows
                work = client.claim_work([queue], wait_seconds=0, limit=BATCH)
                with lock:
                    calls[gateway] += 1
                    for item in work:
                        claimed[item.id].append((agent_id, gateway))
                empty = 0 if work else empty + 1
        except Exception as exc:  # reported by the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=c) for c in clients]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    seconds = time.monotonic() - started
    assert not errors, errors

    twice = {item: by for item, by in claimed.items() if len(by) > 1}
    per_gateway = collections.Counter(by[0][1] for by in claimed.values())
    print(f"[onprem] claim race: {ITEMS} requests enqueued in {enqueue_seconds:.1f} s; claimed by 2 agents through "
          f"2 gateways (4 claimers, {BATCH} per claim) in {seconds:.2f} s ({ITEMS / seconds:.0f}/s); "
          f"claims per gateway {dict(calls)}, items per gateway {dict(per_gateway)}; handed out twice: {len(twice)}")
    assert not twice, f"handed out more than once: {list(twice.items())[:5]}"
    assert set(claimed) == ids, f"{len(ids - set(claimed))} never handed out"
    assert per_gateway[0] > 0 and per_gateway[1] > 0, per_gateway
    # And the database agrees: each item claimed once, by the agent that received it.
    rows = stack.psql(f"SELECT id, status, agent_id FROM airlock_work_items WHERE queue = '{queue}' "
                      "AND kind = 'GRPC_CALL'", "airlock")
    assert len(rows) == ITEMS
    assert all(status == "claimed" and claimed[item][0][0] == agent for item, status, agent in rows)


def test_a_client_that_trusts_another_ca_refuses_the_gateway(onprem: tuple[OnPrem, UpResult], tmp_path: Path) -> None:
    stack, _ = onprem
    made = subprocess.run([sys.executable, "-m", "controlplane.cli", "tls", "init", "--hostnames",
                           "localhost,127.0.0.1", "--out", str(tmp_path / "other")], capture_output=True, text=True,
                          cwd=harness.ROOT)
    assert made.returncode == 0, made.stderr
    token, before = _token(stack), _audit_count(stack, THROUGH)
    for which in (0, 1):
        client = GatewayClient(https_client(stack.gateway_url(which), str(tmp_path / "other/ca.pem")),
                               SigningKey.generate())
        with pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED.*unable to get local issuer"):
            client.enroll(token, ["default"])
    assert _audit_count(stack, THROUGH) == before  # no request reached either gateway
    # The token was not spent: the same one enrolls through the right CA.
    GatewayClient(https_client(stack.gateway_url(1), str(stack.workdir / "ca.pem")),
                  SigningKey.generate()).enroll(token, ["default"])


def test_the_appliance_refuses_an_impostor_gateway(onprem: tuple[OnPrem, UpResult], tmp_path: Path) -> None:
    """A gateway of the real control plane's image, on its database, serving a certificate from another
    `airlock-cp tls init` under a name the appliance asked for: the appliance (trusting the real CA) stops at
    the TLS handshake, says why, and nothing is written."""
    stack, _ = onprem
    dc, image = stack.docker, stack.container("controlplane").image.id
    impostor_id = harness.unique_id()
    volume, name = f"airlock-{impostor_id}-impostor", f"airlock-{impostor_id}-impostor"
    appliance = harness.Appliance(dc, impostor_id, tmp_path, harness.images()["appliance"],
                                  network=f"{stack.name}-link")
    try:
        dc.containers.run(image, ["tls", "init", "--hostnames", "impostor"], entrypoint="airlock-cp", remove=True,
                          volumes={volume: {"bind": "/var/lib/airlock-cp"}})
        impostor = dc.containers.create(
            image, name=name, labels={"airlock.test-run": impostor_id}, network=f"{stack.name}-backend",
            environment={"AIRLOCK_CP_ROLE": "gateway", "AIRLOCK_CP_POSTGRES_HOST": "postgres",
                         "AIRLOCK_CP_POSTGRES_PASSWORD_FILE": "/run/secrets/postgres-password"},
            volumes={volume: {"bind": "/var/lib/airlock-cp"},
                     str(stack.workdir / "postgres-password"): {"bind": "/run/secrets/postgres-password",
                                                                "mode": "ro"}})
        dc.networks.get(f"{stack.name}-link").connect(impostor, aliases=["impostor"])
        impostor.start()
        deadline = time.monotonic() + 90
        while b"Uvicorn running" not in impostor.logs() and time.monotonic() < deadline:
            time.sleep(1)
        assert b"Uvicorn running" in impostor.logs(), impostor.logs()[-2000:]

        token, before = _token(stack), _audit_count(stack, THROUGH)
        appliance.write_locations("version: 1\nlocations: []\n")
        appliance.extra_env.update({"AIRLOCK_CONTROL_PLANE_URL": "https://impostor:8443",
                                    "AIRLOCK_ENROLL_TOKEN": token, "AIRLOCK_CA_FILE": "/etc/airlock/ca.pem"})
        appliance.extra_volumes[str(stack.workdir / "ca.pem")] = {"bind": "/etc/airlock/ca.pem", "mode": "ro"}
        appliance.start()
        deadline = time.monotonic() + 90
        while "CERTIFICATE_VERIFY_FAILED" not in appliance.logs() and time.monotonic() < deadline:
            time.sleep(1)
        logs = appliance.logs()
        assert "certificate verify failed: unable to get local issuer certificate" in logs, logs[-3000:]
        assert _audit_count(stack, THROUGH) == before
        GatewayClient(https_client(stack.gateway_url(0), str(stack.workdir / "ca.pem")),
                      SigningKey.generate()).enroll(token, ["default"])  # the token is still unused
    finally:
        appliance.remove()
        harness.cleanup(dc, impostor_id)
        with contextlib.suppress(docker.errors.NotFound):
            dc.volumes.get(volume).remove(force=True)
