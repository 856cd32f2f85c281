"""The feature catalogue (images/catalogue-location) as two code locations of one user image, driven through the
Dagster UI's GraphQL on the control plane, every run in a hardened container on the appliance.

Each Dagster feature ends as it should: partitioned assets with partitioned upstreams (daily->daily, hourly->daily,
static, multi, dynamic), a downstream asset materialized in a later run than its upstream (the artifact volume),
asset checks, observable source assets, op jobs (dynamic outputs, op config, multiprocess, op retries, run
retries), run-status and asset sensors, declarative automation by the daemon, a single-run backfill, and a
20-partition backfill over both locations with no run stranded. Then `location remove --purge` deletes one
location's artifact volume and a plain remove keeps the other's.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

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


@pytest.fixture(scope="module")
def catalogue(stack) -> Iterator[tuple[ControlPlane, harness.Appliance]]:
    """Both locations built from one image the operator allowed, added on the control plane, loaded in the UI."""
    cp, appliance = stack
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
    yield cp, appliance


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


@contextlib.contextmanager
def sensors_running(cp: ControlPlane, *names: str) -> Iterator[None]:
    """Started for one test and stopped after it, so their ticks do not load the machine for the next ones."""
    for name in names:
        started = cp.graphql(START_SENSOR, {"s": sensor(name)})["startSensor"]
        assert started["__typename"] == "Sensor", started
    try:
        yield
    finally:
        for name in names:
            ids = cp.graphql(SENSOR_IDS, {"s": sensor(name)})["sensorOrError"]
            cp.graphql(STOP_SENSOR, {"origin": ids["jobOriginId"], "selector": ids["sensorState"]["selectorId"]})


def test_a_downstream_asset_materialized_in_a_later_run_reads_its_upstream_and_its_blocking_check_runs(
        catalogue) -> None:
    cp, _ = catalogue
    day = "2026-11-01"
    succeeds(cp, launch(cp, ["daily_orders"], job="daily_job", partition=day))
    later = launch(cp, ["daily_revenue"], job="daily_job", partition=day)  # a new container, a day later
    succeeds(cp, later)
    assert any(f"from /var/lib/airlock/artifacts/storage/daily_orders/{day}" in m for m in messages(cp, later))
    checks = cp.graphql(CHECK, {"path": ["daily_revenue"], "check": "revenue_is_positive"})["assetCheckExecutions"]
    assert any(c["runId"] == later and c["status"] == "SUCCEEDED" for c in checks), checks


def test_partitioned_assets_with_partitioned_upstreams_of_every_kind(catalogue) -> None:
    cp, _ = catalogue
    runs = [launch(cp, job="daily_job", partition="2026-11-02")]  # daily -> daily, in one run
    hours = ["2026-11-02-00:00", "2026-11-02-01:00"]
    runs += [launch(cp, job="hourly_job", partition=h) for h in hours]
    runs.append(launch(cp, ["region_targets"], partition="eu"))  # static
    runs.append(launch(cp, ["regional_sales"], partition="2026-11-01|eu", tags={  # multi-partitions
        "dagster/partition/date": "2026-11-01", "dagster/partition/region": "eu"}))
    repo = {"repositoryName": "__repository__", "repositoryLocationName": "catalogue"}
    added = cp.graphql(ADD_PARTITION, {"r": repo, "key": "acme"})["addDynamicPartition"]
    assert added["__typename"] == "AddDynamicPartitionSuccess", added
    runs.append(launch(cp, ["customer_profile"], partition="acme"))  # dynamic
    for run_id in runs:
        succeeds(cp, run_id)
    rollup = launch(cp, ["daily_clicks"], partition="2026-11-02")  # hourly -> daily: reads the day's hours
    succeeds(cp, rollup)
    materialized = cp.graphql(EVENTS, {"id": rollup})["logsForRun"]["events"]
    counts = [m["intValue"] for e in materialized if e["__typename"] == "MaterializationEvent"
              for m in e["metadataEntries"] if m["label"] == "hours_materialized"]
    assert counts == [2], counts


def test_sensors_read_the_instance_through_the_appliance(catalogue) -> None:
    cp, _ = catalogue

    def saw(name: str, text: str) -> list[dict]:
        ticks = cp.graphql(SENSOR, {"s": sensor(name)})["sensorOrError"]["sensorState"]["ticks"]
        assert not [t for t in ticks if t["status"] == "FAILURE"], ticks
        return [t for t in ticks if text in (t["skipReason"] or "")]

    with sensors_running(cp, "revenue_watch", "success_counter"):
        time.sleep(8)  # the first ticks set the cursors; what happens after them must be seen
        run_id = launch(cp, job="daily_job", partition="2026-11-03")
        succeeds(cp, run_id)
        wait("the asset sensor saw the materialization", lambda: saw("revenue_watch", run_id), 90)
        wait("the run-status sensor saw the success", lambda: saw("success_counter", "saw daily_job succeed"), 90)


def test_op_jobs_dynamic_outputs_config_retries_and_the_intended_failure(catalogue) -> None:
    cp, _ = catalogue
    dynamic = launch(cp, job="dynamic_job", config={"ops": {"scale": {"config": {"factor": 3}}}})
    retry = launch(cp, job="retry_job")
    failing = launch(cp, job="failing_job")
    succeeds(cp, dynamic)
    assert any("gathered [0, 3, 6, 9]" in m for m in messages(cp, dynamic))
    assert any("multiprocess" in m.lower() for m in messages(cp, dynamic))
    succeeds(cp, retry)
    assert wait_terminal(cp, failing) == "FAILURE"
    assert any("fails on purpose" in m for m in messages(cp, failing)), "\n".join(messages(cp, failing))
    # dagster/max_retries=1: the daemon re-executes it once, on the appliance like any run, and it fails again.
    # (The daemon re-reads the workspace every 60 s, as in Dagster OSS: this test runs after the sensors', whose
    # ticks show the daemon already sees the location.)
    children = {"key": "dagster/parent_run_id", "value": failing}
    try:
        retried = wait("the run retry", lambda: cp.graphql(RUNS_TAGGED, children)["runsOrError"]["results"], 120)
    except AssertionError as exc:
        raise AssertionError("\n".join([str(exc), *messages(cp, failing)[-3:]])) from None
    assert len(retried) == 1 and wait_terminal(cp, retried[0]["runId"]) == "FAILURE"


def test_an_observable_source_and_declarative_automation_by_the_daemon(catalogue) -> None:
    cp, _ = catalogue
    succeeds(cp, launch(cp, ["vendor_feed"]))  # an observation run

    def by_automation() -> list[str]:  # eager_report: requested by the daemon, not by us
        found = cp.graphql(MATERIALIZED_BY, {"path": ["eager_report"]})["assetOrError"]["assetMaterializations"]
        return [m["runId"] for m in found if m["runId"] != ours]

    with sensors_running(cp, "automation"):
        ours = launch(cp, ["feed_digest"])
        succeeds(cp, ours)
        checks = cp.graphql(CHECK, {"path": ["feed_digest"], "check": "digest_not_empty"})["assetCheckExecutions"]
        assert any(c["runId"] == ours and c["status"] == "SUCCEEDED" for c in checks), checks
        wait("eager_report materialized by declarative automation", by_automation, 180)


def backfill(cp: ControlPlane, assets: list[str], partitions: list[str]) -> str:
    params = {"assetSelection": [{"path": [a]} for a in assets], "partitionNames": partitions}
    result = cp.graphql(BACKFILL, {"p": params})["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return result["backfillId"]


def finished_backfill(cp: ControlPlane, backfill_id: str, timeout: float) -> list[dict]:
    def done() -> list[dict] | None:
        state = cp.graphql(BACKFILL_STATE, {"id": backfill_id})
        status = state["partitionBackfillOrError"]["status"]
        assert status not in ("FAILED", "CANCELED", "COMPLETED_FAILED"), state
        return state["runsOrError"]["results"] if status in ("COMPLETED", "COMPLETED_SUCCESS") else None

    return wait(f"backfill {backfill_id}", done, timeout)


@pytest.mark.timeout(1500)  # 40 runs on 2 cores: about 5 minutes here, more while the machine is busy
def test_a_20_partition_backfill_over_two_locations_then_a_single_run_backfill(catalogue) -> None:
    cp, _ = catalogue
    days = [f"2026-11-{d:02d}" for d in range(4, 24)]
    started = time.monotonic()
    runs = finished_backfill(cp, backfill(cp, ["daily_orders", "daily_revenue", "regional_orders",
                                                "regional_totals"], days), 900)
    wall = time.monotonic() - started
    statuses = collections.Counter(r["status"] for r in runs)
    assert statuses == {"SUCCESS": 2 * len(days)}, statuses  # one run per partition per location, none stranded
    waits = sorted(r["startTime"] - r["creationTime"] for r in runs)
    print(f"backfill: {len(runs)} runs over 2 locations in {wall:.0f} s = {len(runs) / wall * 60:.1f} runs/min; "
          f"created -> started median {waits[len(waits) // 2]:.0f} s, max {waits[-1]:.0f} s")

    single = finished_backfill(cp, backfill(cp, ["daily_summary_single_run"], days[:5]), 300)
    assert [r["status"] for r in single] == ["SUCCESS"], single  # BackfillPolicy.single_run: one run, five days
    tags = {t["key"]: t["value"] for t in single[0]["tags"]}
    assert (tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")) == (
        days[0], days[4]), tags
    assert any("5 days in one run" in m for m in messages(cp, single[0]["runId"]))  # read from the volume


def test_location_remove_keeps_the_artifact_volume_unless_purged(catalogue) -> None:
    cp, appliance = catalogue
    dc, run = harness.client(), appliance.appliance_id

    def volumes(location: str) -> list[str]:
        return [v.name for v in dc.volumes.list(filters={"name": f"airlock-{run}-{location}-artifacts"})]

    assert len(volumes("regional")) == 4 and len(volumes("catalogue")) == 4
    cp.cli("location", "remove", "regional", "--purge")
    cp.cli("location", "remove", "catalogue")
    wait("regional's artifact volume purged", lambda: not volumes("regional"), 120)
    assert len(volumes("catalogue")) == 4  # no --purge: the files stay for when the location comes back
