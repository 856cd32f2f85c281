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

import pytest

from tests import harness
from tests.integration.catalogue import (
    ADD_PARTITION,
    BACKFILL_ASSETS,
    CHECK,
    EVENTS,
    MATERIALIZED_BY,
    RUNS_TAGGED,
    SENSOR,
    SENSOR_IDS,
    START_SENSOR,
    STOP_SENSOR,
    add_catalogue,
    backfill,
    backfill_days,
    backfill_figures,
    finished_backfill,
    launch,
    messages,
    sensor,
    succeeds,
)
from tests.integration.stack import ControlPlane, wait, wait_terminal


@pytest.fixture(scope="module")
def catalogue(stack) -> Iterator[tuple[ControlPlane, harness.Appliance]]:
    """Both locations built from one image the operator allowed, added on the control plane, loaded in the UI."""
    cp, appliance = stack
    add_catalogue(cp, appliance)
    yield cp, appliance


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
    assert any(f"from /opt/dagster/artifacts/storage/daily_orders/{day}" in m for m in messages(cp, later))
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


@pytest.mark.timeout(1500)  # 40 runs on 2 cores: about 5 minutes here, more while the machine is busy
def test_a_20_partition_backfill_over_two_locations_then_a_single_run_backfill(catalogue) -> None:
    cp, _ = catalogue
    days = backfill_days(20)
    started = time.monotonic()
    runs = finished_backfill(cp, backfill(cp, BACKFILL_ASSETS, days), 1200)
    wall = time.monotonic() - started
    statuses = collections.Counter(r["status"] for r in runs)
    assert statuses == {"SUCCESS": 2 * len(days)}, statuses  # one run per partition per location, none stranded
    print(f"backfill over 2 locations: {backfill_figures(runs, wall)}")

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
