"""The feature catalogue's runs through the storage boundary, in process: each Dagster feature that reads or
writes the instance crosses the real codec, allowlist and scope, and ends as it should.

And the codec is complete by construction: every type an allowlisted storage method's hints name is
encodable (protocol/storage_types.py), and every enum among them round-trips member by member.
"""

from __future__ import annotations

import enum
from pathlib import Path

import pytest

dagster = pytest.importorskip("dagster")

from dagster import AssetKey, DagsterEventType, DagsterInstance  # noqa: E402
from dagster._core.storage.dagster_run import DagsterRunStatus  # noqa: E402

from controlplane.storage.executor import StorageExecutor  # noqa: E402
from controlplane.storage.scope import Scope  # noqa: E402
from protocol.storage_calls import CodecError  # noqa: E402
from protocol.storage_codec import decode, encode  # noqa: E402
from protocol.storage_types import boundary_types, storage_methods  # noqa: E402
from tests.unit.storage_loopback import Loopback, execute, run_for, user_instance  # noqa: E402

CATALOGUE = Path(__file__).resolve().parents[2] / "images" / "catalogue-location"
MODULE = "catalogue.definitions"


# -- the codec, walked from the allowlist ---------------------------------------------------------------------
def test_every_type_the_allowlisted_methods_name_has_a_codec() -> None:
    found = boundary_types()
    assert len(storage_methods()) >= 40  # the walk read the allowlist, not an empty table
    assert found.unknown == (), "types with no codec:\n" + "\n".join(f"{w}: {t}" for w, t in found.unknown)
    assert DagsterEventType in found.enums  # the one a partitioned upstream needs


@pytest.mark.parametrize("klass", sorted(boundary_types().enums, key=lambda k: k.__name__), ids=lambda k: k.__name__)
def test_every_boundary_enum_round_trips(klass: type[enum.Enum]) -> None:
    for member in klass:
        back = decode(encode({"v": member, "in": (member,)}))
        assert back["v"] is member and back["in"] == (member,)


def test_an_enum_off_the_allowlist_is_refused_both_ways() -> None:
    class Colour(enum.Enum):
        RED = 1

    with pytest.raises(CodecError, match="not an enum any allowlisted storage method"):
        encode(Colour.RED)
    for text, message in [('{"@":"enum","t":"Colour","v":"RED"}', "not on the storage codec's allowlist"),
                          ('{"@":"enum","t":"DagsterEventType","v":"__class__"}', "has no member")]:
        with pytest.raises(CodecError, match=message):
            decode(text)


# -- the catalogue's runs -------------------------------------------------------------------------------------
@pytest.fixture()
def control_plane(tmp_path: Path):
    (tmp_path / "cp").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "cp")) as instance:
        yield instance


class Catalogue:
    """Creates runs on the control plane and executes them on a userland worker sharing one storage dir."""

    def __init__(self, control_plane: DagsterInstance, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.control_plane, self.monkeypatch, self.tmp_path = control_plane, monkeypatch, tmp_path
        self.methods: list[str] = []

    def run(self, job: str, *, partition: str | None = None, assets: list[str] | None = None,
            run_config: dict | None = None) -> DagsterRunStatus:
        tags = {"dagster/partition": partition} if partition else None
        selection = frozenset(AssetKey(a) for a in assets) if assets else None
        _, run = run_for(self.control_plane, CATALOGUE, MODULE, job, location="catalogue", tags=tags,
                         asset_selection=selection, run_config=run_config)
        send = Loopback(StorageExecutor(self.control_plane), Scope(run.run_id, "catalogue"))
        worker = user_instance(self.monkeypatch, send, self.tmp_path)
        execute(run.run_id, worker)
        self.methods += send.methods
        return self.control_plane.get_run_by_id(run.run_id).status


@pytest.fixture()
def catalogue(control_plane: DagsterInstance, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Catalogue:
    return Catalogue(control_plane, monkeypatch, tmp_path)


def test_a_partitioned_asset_with_a_partitioned_upstream_succeeds_in_one_run_and_in_the_next(
        catalogue: Catalogue) -> None:
    """daily -> daily with code versions: Dagster's data-version cache reads the upstream's tags by partition."""
    assert catalogue.run("daily_job", partition="2026-11-03") == DagsterRunStatus.SUCCESS
    assert "events.get_latest_tags_by_partition" in catalogue.methods
    # The downstream alone in a later run: it reads what the first run stored, and its blocking check runs.
    status = catalogue.run("daily_job", partition="2026-11-03", assets=["daily_revenue"])
    assert status == DagsterRunStatus.SUCCESS
    cp = catalogue.control_plane
    assert cp.get_materialized_partitions(AssetKey("daily_revenue")) == {"2026-11-03"}
    checks = cp.event_log_storage.get_asset_check_execution_history(
        dagster.AssetCheckKey(AssetKey("daily_revenue"), "revenue_is_positive"), limit=5)
    # Plain Dagster 1.13 on one host records the same: per run a PLANNED row for the partition and the
    # evaluation's SUCCEEDED row (the check itself is not partitioned).
    assert sorted(c.status.value for c in checks) == ["PLANNED", "PLANNED", "SUCCEEDED", "SUCCEEDED"]


def test_op_features_end_as_they_should(catalogue: Catalogue) -> None:
    assert catalogue.run("dynamic_job", run_config={"execution": {"config": {"in_process": {}}}}) == \
        DagsterRunStatus.SUCCESS
    assert catalogue.run("retry_job") == DagsterRunStatus.SUCCESS
    assert catalogue.run("failing_job") == DagsterRunStatus.FAILURE


def test_an_observed_source_feeds_a_versioned_asset_and_its_check(catalogue: Catalogue) -> None:
    assert catalogue.run("feed_job") == DagsterRunStatus.SUCCESS
    cp = catalogue.control_plane
    assert cp.get_latest_materialization_event(AssetKey("feed_digest")) is not None


def test_a_run_status_sensor_on_a_location_token_sees_its_own_locations_runs_only(
        catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A code server's run-status sensor reads run status changes through the boundary; another location's runs
    are cut from the answer (their ids and jobs are not this location's to know). The sensor itself runs in
    tests/integration/test_catalogue.py."""
    from dagster._core.storage.dagster_run import RunsFilter

    from controlplane.storage.scope import LOCATION_WIDE

    assert catalogue.run("retry_job") == DagsterRunStatus.SUCCESS
    _, foreign = run_for(catalogue.control_plane, CATALOGUE, MODULE, "retry_job", location="elsewhere")
    send = Loopback(StorageExecutor(catalogue.control_plane), Scope(foreign.run_id, "elsewhere"))
    execute(foreign.run_id, user_instance(monkeypatch, send, tmp_path))
    cp = catalogue.control_plane
    everything = cp.fetch_run_status_changes(DagsterEventType.RUN_SUCCESS, limit=10).records
    assert len(everything) == 2  # the twin: both runs succeeded, and the control plane itself sees both

    code_server = user_instance(monkeypatch, Loopback(StorageExecutor(cp), Scope(LOCATION_WIDE, "catalogue")), tmp_path)
    seen = code_server.fetch_run_status_changes(DagsterEventType.RUN_SUCCESS, limit=10).records
    own = [r.run_id for r in cp.get_runs(RunsFilter(job_name="retry_job")) if r.run_id != foreign.run_id]
    assert [r.event_log_entry.run_id for r in seen] == own

    # The filter form the sensor sends once it has a cursor: a record the codec packs field by field (serdes
    # would refuse the DagsterEventType inside it).
    from dagster._core.event_api import RunStatusChangeRecordsFilter

    after = RunStatusChangeRecordsFilter(DagsterEventType.RUN_SUCCESS, after_storage_id=seen[0].storage_id)
    assert catalogue.run("retry_job") == DagsterRunStatus.SUCCESS
    newer = code_server.fetch_run_status_changes(after, limit=10, ascending=True).records
    assert len(newer) == 1 and newer[0].event_log_entry.run_id not in own


def test_a_single_run_backfill_reads_a_range_of_upstream_partitions(catalogue: Catalogue) -> None:
    for day in ("2026-11-05", "2026-11-06"):
        assert catalogue.run("daily_job", partition=day) == DagsterRunStatus.SUCCESS
    _, run = run_for(catalogue.control_plane, CATALOGUE, MODULE, "__ASSET_JOB", location="catalogue",
                     asset_selection=frozenset({AssetKey("daily_summary_single_run")}),
                     tags={"dagster/asset_partition_range_start": "2026-11-05",
                           "dagster/asset_partition_range_end": "2026-11-06"})
    send = Loopback(StorageExecutor(catalogue.control_plane), Scope(run.run_id, "catalogue"))
    execute(run.run_id, user_instance(catalogue.monkeypatch, send, catalogue.tmp_path))
    cp = catalogue.control_plane
    assert cp.get_run_by_id(run.run_id).status == DagsterRunStatus.SUCCESS
    assert cp.get_materialized_partitions(AssetKey("daily_summary_single_run")) == {"2026-11-05", "2026-11-06"}
