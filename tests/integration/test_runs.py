"""Runs end to end on real Docker: launched from the unmodified Dagster webserver, executed in a hardened run
container in the appliance, every event and compute log back on the control plane through the metadata relay.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.integration.stack import ControlPlane, launch, run_containers, status, wait, wait_terminal

EVENTS = """query($id: ID!) { logsForRun(runId: $id, limit: 5000) { __typename ... on EventConnection { events {
  __typename ... on MessageEvent { message } ... on LogsCapturedEvent { fileKey stepKeys }
  ... on ExecutionStepSuccessEvent { stepKey } ... on RunFailureEvent { message } } } } }"""
LOGS = """query($key: [String!]!) { capturedLogs(logKey: $key) { stdout stderr } }"""
TERMINATE = """mutation($id: String!) { terminateRun(runId: $id) { __typename
  ... on TerminateRunSuccess { run { runId } } ... on TerminateRunFailure { message }
  ... on PythonError { message } } }"""
ASSET = """query($path: [String!]!) { assetOrError(assetKey: {path: $path}) { __typename
  ... on Asset { assetMaterializations(limit: 1) { runId } } } }"""


def events(cp: ControlPlane, run_id: str) -> list[dict[str, Any]]:
    return cp.graphql(EVENTS, {"id": run_id})["logsForRun"]["events"]


def test_a_multiprocess_job_launched_from_the_webserver_succeeds_with_events_and_compute_logs(loaded) -> None:
    cp, _ = loaded
    started = time.monotonic()
    run_id = launch(cp, "numbers_job")  # the default executor: every step in its own process
    assert wait_terminal(cp, run_id) == "SUCCESS", events(cp, run_id)[-5:]
    took = time.monotonic() - started
    found = events(cp, run_id)
    steps = {e["stepKey"] for e in found if e["__typename"] == "ExecutionStepSuccessEvent"}
    assert steps == {"emit_numbers", "total", "evens", "report"}
    assert any("emitting 10 numbers" in (e.get("message") or "") for e in found)
    assert any("multiprocess" in (e.get("message") or "").lower() for e in found), "not the multiprocess executor"
    captured = [e for e in found if e["__typename"] == "LogsCapturedEvent"]
    report_key = next(e["fileKey"] for e in captured if "report" in (e["stepKeys"] or []))
    logs = wait("compute logs", lambda: cp.graphql(LOGS, {"key": [run_id, "compute_logs", report_key]})
                ["capturedLogs"]["stdout"], 60)
    assert "total=55 evens=5" in logs
    # The container is removed once everything of the run is forwarded; its token is revoked.
    wait("run container removed", lambda: not run_containers(run_id), 60)
    print(f"numbers_job: SUCCESS in {took:.1f} s, {len(found)} events")


def test_an_asset_job_materializes_into_the_catalog(loaded) -> None:
    cp, _ = loaded
    run_id = launch(cp, "assets_job")
    assert wait_terminal(cp, run_id) == "SUCCESS"
    for path in (["raw_numbers"], ["squares"], ["summary"]):
        materialized = cp.graphql(ASSET, {"path": path})["assetOrError"]["assetMaterializations"]
        assert materialized and materialized[0]["runId"] == run_id, (path, materialized)


def test_terminate_from_the_ui_cancels_within_the_grace_period(loaded) -> None:
    cp, _ = loaded
    run_id = launch(cp, "sleepy_job", {"ops": {"wait_a_while": {"config": {"seconds": 600}}}})
    wait("sleepy run started", lambda: status(cp, run_id) == "STARTED", 120)
    wait("op sleeping", lambda: any("sleeping 600 s" in (e.get("message") or "") for e in events(cp, run_id)), 60)
    # The running step's output is already viewable: compute logs stream while the step runs.
    key = next(e["fileKey"] for e in events(cp, run_id) if e["__typename"] == "LogsCapturedEvent")
    live = wait("the running step's output in the UI", lambda: cp.graphql(LOGS, {"key": [run_id, "compute_logs", key]})
                ["capturedLogs"]["stderr"], 30)
    assert "sleeping 600 s" in live and status(cp, run_id) == "STARTED"
    asked = time.monotonic()
    result = cp.graphql(TERMINATE, {"id": run_id})["terminateRun"]
    assert result["__typename"] == "TerminateRunSuccess", result
    assert wait_terminal(cp, run_id, timeout=20 + 5 + 10) == "CANCELED"
    took = time.monotonic() - asked
    assert took <= 20 + 5, f"CANCELED after {took:.1f} s"
    wait("run container removed", lambda: not run_containers(run_id), 60)
    print(f"terminate -> CANCELED in {took:.1f} s")


def test_a_memory_bomb_fails_the_run_saying_it_was_oom_killed(loaded) -> None:
    cp, appliance = loaded
    run_id = launch(cp, "hungry_job")
    assert wait_terminal(cp, run_id, timeout=300) == "FAILURE"
    failures = [e["message"] for e in events(cp, run_id) if e["__typename"] == "RunFailureEvent"]
    assert failures and "OOM-killed" in failures[-1] and "exited with code 137" in failures[-1], failures
    # Only the run container died: the appliance and the code server are untouched.
    assert appliance.wait_for("example", "LOADED", timeout=60)
    print(json.dumps(failures[-1][:300]))


SCHEDULE = {"repositoryLocationName": "example", "repositoryName": "__repository__", "scheduleName": "every_minute"}
START_SCHEDULE = """mutation($s: ScheduleSelector!) { startSchedule(scheduleSelector: $s) { __typename
  ... on ScheduleStateResult { scheduleState { id status } } ... on PythonError { message } } }"""
STOP_SCHEDULE = """mutation($id: String!) { stopRunningSchedule(id: $id) { __typename } }"""
SCHEDULE_TICKS = """query($s: ScheduleSelector!) { scheduleOrError(scheduleSelector: $s) { __typename
  ... on Schedule { scheduleState { ticks(limit: 5) { status runIds error { message } } } } } }"""


WATCH = {"repositoryLocationName": "example", "repositoryName": "__repository__", "sensorName": "asset_watch_sensor"}
START_SENSOR = """mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename
  ... on Sensor { sensorState { id } } ... on PythonError { message } } }"""
STOP_SENSOR = """mutation($id: String!) { stopSensor(id: $id) { __typename } }"""
SENSOR_TICKS = """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { __typename
  ... on Sensor { sensorState { ticks(limit: 5) { status skipReason error { message } } } } } }"""


def test_a_schedule_tick_launches_a_run_and_a_sensor_reads_the_instance_through_the_relay(loaded) -> None:
    """Both evaluate in the code server with the userland instance (the relay swapped the control plane's ref),
    which reads through the appliance with the location's read-only token."""
    cp, _ = loaded
    started = cp.graphql(START_SCHEDULE, {"s": SCHEDULE})["startSchedule"]
    assert started["__typename"] == "ScheduleStateResult", started
    watching = cp.graphql(START_SENSOR, {"s": WATCH})["startSensor"]
    assert watching["__typename"] == "Sensor", watching
    try:
        def watched() -> str | None:
            ticks = cp.graphql(SENSOR_TICKS, {"s": WATCH})["sensorOrError"]["sensorState"]["ticks"]
            failed = [t for t in ticks if t["status"] == "FAILURE"]
            assert not failed, f"a sensor tick failed: {failed[0]['error']}"
            return next((t["skipReason"] for t in ticks if t["status"] == "SKIPPED"), None)

        def ticked_run() -> str | None:
            ticks = cp.graphql(SCHEDULE_TICKS, {"s": SCHEDULE})["scheduleOrError"]["scheduleState"]["ticks"]
            failed = [t for t in ticks if t["status"] == "FAILURE"]
            assert not failed, f"a tick failed: {failed[0]['error']}"  # so a timeout says why
            return next((t["runIds"][0] for t in ticks if t["runIds"]), None)

        # The daemon re-reads the workspace about once a minute, then waits for the next minute: up to ~2 min.
        reason = wait("a sensor tick that read the instance", watched, 180)
        print(reason)
        runs = int(reason.split("watching: ")[1].split()[0])
        assert runs > 0 and "raw_numbers last materialized by run" in reason, reason  # earlier tests' runs
        run_id = wait("a schedule tick with a run", ticked_run, 180)
    finally:
        cp.graphql(STOP_SCHEDULE, {"id": started["scheduleState"]["id"]})
        cp.graphql(STOP_SENSOR, {"id": watching["sensorState"]["id"]})
    assert wait_terminal(cp, run_id) == "SUCCESS"
