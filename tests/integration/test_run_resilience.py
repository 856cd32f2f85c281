"""Runs survive the appliance's processes dying and the control plane going away, without losing or
duplicating an event (a full spool makes the run worker wait, never drops a write); a run's token reaches only
that run, and only while it runs."""

from __future__ import annotations

import collections
import json
import time

import pytest

from protocol.locations import ARTIFACTS_DIR
from tests.integration.stack import (
    SPOOL_MAX_BYTES,
    ControlPlane,
    launch,
    run_containers,
    status,
    wait,
    wait_terminal,
)

EVENTS = """query($id: ID!) { logsForRun(runId: $id, limit: 20000) { ... on EventConnection { events {
  __typename ... on MessageEvent { message stepKey timestamp } } } } }"""


def events(cp: ControlPlane, run_id: str) -> list[dict]:
    return cp.graphql(EVENTS, {"id": run_id})["logsForRun"]["events"]


def shape(found: list[dict]) -> collections.Counter:
    """What a run's event log must hold, whatever the timing: event kinds per step, and the op's own lines."""
    return collections.Counter((e["__typename"], e.get("stepKey"),
                                e["message"] if (e.get("message") or "").startswith("event ") else None)
                               for e in found)


def assert_same_log(baseline: list[dict], disrupted: list[dict], count: int) -> None:
    lines = [e["message"] for e in disrupted if (e.get("message") or "").startswith("event ")]
    assert sorted(lines, key=lambda m: int(m.split()[1])) == [f"event {i}" for i in range(1, count + 1)], \
        "an op event is missing or duplicated"
    keys = [(e["timestamp"], e["__typename"], e.get("message")) for e in disrupted]
    assert len(keys) == len(set(keys)), "an event was stored twice"
    engine = [[e["message"][:60] for e in log if e["__typename"] == "EngineEvent"] for log in (baseline, disrupted)]
    assert shape(disrupted) == shape(baseline), engine


@pytest.fixture()
def baseline(loaded):
    cp, _ = loaded
    config = {"ops": {"log_events": {"config": {"count": 200, "interval": 0.05}}}}
    run_id = launch(cp, "chatty_job", config)
    assert wait_terminal(cp, run_id) == "SUCCESS"
    settled(run_id)
    return config, events(cp, run_id)


def settled(run_id: str) -> None:
    """Everything of the run is forwarded, the agent's exit report included, once its container is gone."""
    wait("run container removed", lambda: not run_containers(run_id), 120)


def _supervisor(appliance, action: str, *programs: str) -> None:
    for program in programs:
        code, out = appliance.exec("supervisorctl", "-c", "/etc/airlock/supervisord.conf", *action.split(), program)
        assert code == 0, out


def test_killing_the_agent_and_the_relay_mid_run_loses_and_duplicates_nothing(loaded, baseline) -> None:
    cp, appliance = loaded
    config, expected = baseline
    run_id = launch(cp, "chatty_job", config)
    wait("the run logging", lambda: any(e.get("message") == "event 40" for e in events(cp, run_id)), 120)
    _supervisor(appliance, "signal KILL", "agent", "metadata")  # supervisord restarts both
    assert wait_terminal(cp, run_id) == "SUCCESS"
    settled(run_id)
    assert_same_log(expected, events(cp, run_id), 200)
    print(f"kill -9 agent + relay mid-run: SUCCESS, {len(events(cp, run_id))} events = baseline {len(expected)}")


def test_a_control_plane_outage_of_60_s_mid_run_loses_and_duplicates_nothing(loaded, baseline) -> None:
    cp, appliance = loaded
    config, expected = baseline
    run_id = launch(cp, "chatty_job", config)
    wait("the run logging", lambda: any(e.get("message") == "event 20" for e in events(cp, run_id)), 120)
    cp.container.stop(timeout=30)
    stopped, spooled = time.monotonic(), 0
    try:
        while time.monotonic() - stopped < 60:
            time.sleep(5)
            _, out = appliance.exec("sh", "-c", "du -sb /var/lib/airlock/spool | cut -f1",
                                    user="airlock-agent")
            spooled = max(spooled, int(out.strip() or 0))
    finally:
        cp.container.start()
    wait("webserver back", lambda: cp.graphql("{ version }"), 180)
    outcome = wait_terminal(cp, run_id, timeout=300)
    if outcome != "SUCCESS":
        logs = cp.container.logs().decode(errors="replace").splitlines()
        print("\n".join(line for line in logs if "Monitoring" in line or run_id in line or "storage" in line)[-5000:])
    assert outcome == "SUCCESS", [e.get("message") for e in events(cp, run_id)][-6:]
    settled(run_id)
    assert_same_log(expected, events(cp, run_id), 200)
    code, left = appliance.exec("sh", "-c", "ls /var/lib/airlock/spool | wc -l", user="airlock-agent")
    assert code == 0 and left.strip() == "0", left
    assert spooled > 0, "nothing was spooled while the control plane was down"
    waited = appliance.logs().count(f"spool full: run {run_id} waits")
    assert waited > 0, f"the {SPOOL_MAX_BYTES}-byte spool never filled: backpressure was not exercised"
    print(f"control plane down 60 s mid-run: SUCCESS; spool held up to {spooled} bytes (bound {SPOOL_MAX_BYTES}), "
          f"the worker was told to wait {waited} times; 0 lost, 0 twice")


def _in_run(container, script: str) -> dict:
    result = container.exec_run(["python", "-c", script], demux=True)
    out = (result.output[0] or b"").decode()
    assert result.exit_code == 0, (out, (result.output[1] or b"").decode())
    return json.loads(out.strip().splitlines()[-1])


PROBE = """
import json, os, httpx
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.dagster_run import RunsFilter
from protocol.storage_codec import encode
url, token = os.environ["AIRLOCK_METADATA_URL"], os.environ["AIRLOCK_RUN_TOKEN"]
mine, other = os.environ["MINE"], os.environ["OTHER"]
def post(path, method, args, tok=token):
    r = httpx.post(url + path, headers={"Authorization": "Bearer " + tok}, timeout=60,
                   json={"method": method, "args": encode(args), "kwargs": encode({}), "client": "probe", "seq": 1})
    return [r.status_code, r.text[:300]]
event = EventLogEntry(error_info=None, level=20, user_message="forged by the probe", run_id=other, timestamp=1.0)
print(json.dumps({
    "write_other": post("/v1/write", "events.store_event", [event]),
    "read_other": post("/v1/call", "runs.get_run_records", [RunsFilter(run_ids=[other])]),
    "read_all": post("/v1/call", "runs.get_run_records", []),
    "read_mine": post("/v1/call", "runs.get_run_records", [RunsFilter(run_ids=[mine])]),
    "forged_token": post("/v1/call", "runs.get_run_records", [RunsFilter(run_ids=[mine])], tok=token[:-4] + "AAAA"),
}))
"""


def test_a_run_token_reaches_only_its_run_and_dies_with_it(loaded, stack) -> None:
    cp, appliance = loaded
    other = launch(cp, "numbers_job")
    assert wait_terminal(cp, other) == "SUCCESS"
    run_id = launch(cp, "sleepy_job", {"ops": {"wait_a_while": {"config": {"seconds": 600}}}})
    wait("sleepy run started", lambda: status(cp, run_id) == "STARTED", 120)
    container = run_containers(run_id)[0]
    script = f"import os; os.environ.update(MINE={run_id!r}, OTHER={other!r})\n" + PROBE
    answers = _in_run(container, script)
    assert answers["read_mine"][0] == 200 and "RunRecord" in answers["read_mine"][1]  # the allowed twin works
    assert answers["read_other"][0] == 403 and "only its own run" in answers["read_other"][1], answers["read_other"]
    assert answers["read_all"][0] == 403, answers["read_all"]
    assert answers["forged_token"][0] == 401, answers["forged_token"]
    assert answers["write_other"][0] == 200  # spooled; the control plane refuses it when it arrives
    wait("forged write refused in the audit log",
         lambda: "is not this token's run" in cp.cli("audit", "--limit", "200"), 60)
    assert not any("forged by the probe" in (e.get("message") or "") for e in events(cp, other))
    assert "control plane refused events.store_event" in appliance.logs()

    # The container holds nothing of the appliance's: no key, no enrollment token, no socket, no volume.
    container.reload()
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    assert not [k for k in env if k.startswith(("AIRLOCK_ENROLL", "AIRLOCK_CONTROL_PLANE", "DOCKER"))], env
    artifacts = (f"airlock-{appliance.appliance_id}-example-artifacts", ARTIFACTS_DIR)  # the location's own files
    assert all(m["Type"] == "tmpfs" or (m.get("Name"), m.get("Destination")) == artifacts
               for m in container.attrs["Mounts"]), container.attrs["Mounts"]
    code, key = appliance.exec("sh", "-c", "sed -n 2p /var/lib/airlock/agent.key", user="airlock-agent")
    assert code == 0 and len(key.strip()) > 20
    code, token_key = appliance.exec("sh", "-c", "base64 -w0 /var/lib/airlock/run-token.key", user="airlock-agent")
    for secret in (key.strip(), token_key.strip()):
        found = container.exec_run(["sh", "-c", f"grep -rlF -D skip --exclude-dir=proc --exclude-dir=sys "
                                   f"--exclude-dir=dev -- '{secret}' / 2>/dev/null; true"])
        assert found.output.decode().strip() == "", found.output
    argv = " ".join(container.attrs["Args"])
    assert key.strip() not in argv and "agent.key" not in argv

    # Once the run has ended, its token opens nothing.
    token = env["AIRLOCK_RUN_TOKEN"]
    assert cp.graphql("""mutation($id: String!) { terminateRun(runId: $id) { __typename } }""",
                      {"id": run_id})["terminateRun"]["__typename"] == "TerminateRunSuccess"
    assert wait_terminal(cp, run_id, timeout=40) == "CANCELED"
    probe = ("import httpx; r = httpx.post('http://127.0.0.1:7070/v1/call', headers={'Authorization': 'Bearer "
             f"{token}'}}, json={{}}); print(r.status_code, r.text)")
    out = wait("the ended run's token refused", lambda: (o := appliance.exec("python", "-c", probe)[1])
               .startswith("401") and o, 60)
    assert "has ended" in out, out
