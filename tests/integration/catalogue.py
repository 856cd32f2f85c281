"""The feature catalogue's two locations on a running stack, and the GraphQL the UI uses to drive them: shared by
tests/integration/test_catalogue.py and bench/backfill.py."""

from __future__ import annotations

from typing import Any

from tests import harness
from tests.integration.stack import ControlPlane, wait, wait_terminal

LOCATIONS = {"catalogue": "catalogue.definitions", "regional": "catalogue.regional"}
IMAGE = "airlock/catalogue-location"
LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message stack }
  ... on RunConfigValidationInvalid { errors { message } } ... on InvalidSubsetError { message } } }"""
BACKFILL = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { __typename
  ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message stack } } }"""
BACKFILL_STATE = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  ... on PartitionBackfill { status } }
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) { ... on Runs { results {
    runId status creationTime startTime endTime tags { key value } } } } }"""
RUNS_TAGGED = """query($key: String!, $value: String!) { runsOrError(filter: {tags: [{key: $key, value: $value}]}) {
  ... on Runs { results { runId status } } } }"""
EVENTS = """query($id: ID!) { logsForRun(runId: $id, limit: 5000) { ... on EventConnection { events { __typename
  ... on MessageEvent { message } ... on MaterializationEvent { assetKey { path } metadataEntries { label
  ... on IntMetadataEntry { intValue } } } ... on ExecutionStepFailureEvent { error { message cause { message } } }
  ... on EngineEvent { error { message cause { message } } } } } } }"""
CHECK = """query($path: [String!]!, $check: String!) { assetCheckExecutions(assetKey: {path: $path}, checkName: $check,
  limit: 5) { runId status } }"""
MATERIALIZED_BY = """query($path: [String!]!) { assetOrError(assetKey: {path: $path}) { ... on Asset {
  assetMaterializations(limit: 5) { runId partition } } } }"""
SENSOR = """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor { sensorState {
  ticks(limit: 20) { status skipReason error { message } } } } } }"""
START_SENSOR = """mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename
  ... on PythonError { message } } }"""
SENSOR_IDS = """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor { jobOriginId
  sensorState { selectorId } } } }"""
STOP_SENSOR = """mutation($origin: String!, $selector: String!) { stopSensor(jobOriginId: $origin,
  jobSelectorId: $selector) { __typename ... on PythonError { message } } }"""
ADD_PARTITION = """mutation($r: RepositorySelector!, $key: String!) { addDynamicPartition(repositorySelector: $r,
  partitionsDefName: "customers", partitionKey: $key) { __typename ... on PythonError { message } } }"""
JOBS = """{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename
  ... on PythonError { message } ... on RepositoryLocation { repositories { jobs { name } } } } } } } }"""


def add_catalogue(cp: ControlPlane, appliance: harness.Appliance) -> None:
    """Build the catalogue image, allow it on the appliance, add both locations, wait until the UI has them."""
    images, dc = harness.images(), harness.client()
    image, _ = dc.images.build(path=str(harness.ROOT / "images/catalogue-location"), tag=f"{IMAGE}:test", rm=True,
                               buildargs={"BASE_IMAGE": images["usercode-base"]})
    code, out = appliance.exec("airlock", "images", "allow", IMAGE)
    assert code == 0, out
    for name, module in LOCATIONS.items():
        cp.cli("location", "add", name, "--image", image.id, "--module", module)

    def loaded() -> bool:
        entries = {e["name"]: e["locationOrLoadError"] for e in cp.graphql(JOBS)["workspaceOrError"]["locationEntries"]}
        return all((entries.get(n) or {}).get("__typename") == "RepositoryLocation" for n in LOCATIONS)

    wait("catalogue and regional loaded in the webserver", loaded, 300)


def launch(cp: ControlPlane, assets: list[str] | None = None, *, job: str = "__ASSET_JOB", location: str = "catalogue",
           partition: str | None = None, tags: dict[str, str] | None = None, config: dict | None = None) -> str:
    selector: dict[str, Any] = {"repositoryLocationName": location, "repositoryName": "__repository__", "jobName": job}
    if assets:
        selector["assetSelection"] = [{"path": [a]} for a in assets]
    tags = dict(tags or {}) | ({"dagster/partition": partition} if partition else {})
    params = {"selector": selector, "runConfigData": config or {},
              "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]}}
    result = cp.graphql(LAUNCH, {"p": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def messages(cp: ControlPlane, run_id: str) -> list[str]:
    found = cp.graphql(EVENTS, {"id": run_id})["logsForRun"]["events"]
    def error(e: dict) -> str:
        err = e.get("error") or {}
        return " ".join(filter(None, (err.get("message"), (err.get("cause") or {}).get("message"))))

    return [f"{e.get('message') or ''} {error(e)}" for e in found]


def succeeds(cp: ControlPlane, run_id: str, timeout: float = 240) -> None:
    assert wait_terminal(cp, run_id, timeout) == "SUCCESS", messages(cp, run_id)[-12:]


def sensor(name: str, location: str = "catalogue") -> dict[str, str]:
    return {"repositoryName": "__repository__", "repositoryLocationName": location, "sensorName": name}


def backfill(cp: ControlPlane, assets: list[str], partitions: list[str]) -> str:
    params = {"assetSelection": [{"path": [a]} for a in assets], "partitionNames": partitions}
    result = cp.graphql(BACKFILL, {"p": params})["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return result["backfillId"]


class BackfillFailed(Exception):
    """Not an AssertionError: `wait` retries those, and a failed backfill will not get better."""


def finished_backfill(cp: ControlPlane, backfill_id: str, timeout: float) -> list[dict]:
    def done() -> list[dict] | None:
        state = cp.graphql(BACKFILL_STATE, {"id": backfill_id})
        status = state["partitionBackfillOrError"]["status"]
        if status in ("FAILED", "CANCELED", "COMPLETED_FAILED"):
            failed = [r for r in state["runsOrError"]["results"] if r["status"] != "SUCCESS"]
            raise BackfillFailed(f"backfill {backfill_id} ended {status}; runs not SUCCESS: "
                                 + "; ".join(f"{r['runId']} {r['status']}: {' | '.join(messages(cp, r['runId'])[-2:])}"
                                             for r in failed))
        return state["runsOrError"]["results"] if status in ("COMPLETED", "COMPLETED_SUCCESS") else None

    return wait(f"backfill {backfill_id}", done, timeout)




BACKFILL_ASSETS = ["daily_orders", "daily_revenue", "regional_orders", "regional_totals"]  # both locations


def backfill_days(count: int) -> list[str]:
    return [f"2026-11-{d:02d}" for d in range(4, 4 + count)]


def backfill_figures(runs: list[dict], wall: float) -> str:
    """Wall time, runs/min and how long runs waited from creation to start (queue + launch)."""
    waits = sorted(r["startTime"] - r["creationTime"] for r in runs)
    took = sorted(r["endTime"] - r["startTime"] for r in runs)
    return (f"{len(runs)} runs in {wall:.0f} s = {len(runs) / wall * 60:.1f} runs/min; created -> started median "
            f"{waits[len(waits) // 2]:.0f} s, max {waits[-1]:.0f} s; started -> ended median "
            f"{took[len(took) // 2]:.0f} s")
