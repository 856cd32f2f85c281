"""The storage RPC without Docker: codec, scope checks and ingestion, with a real run of the example job whose
run worker uses userland's relay-backed storage, looped back to a control-plane executor in this process."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

dagster = pytest.importorskip("dagster")

from dagster import AssetKey, DagsterEventType, DagsterInstance  # noqa: E402
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter  # noqa: E402
from dagster._core.storage.event_log.base import PoolConfig  # noqa: E402

from controlplane.storage.executor import StorageExecutor  # noqa: E402
from controlplane.storage.scope import Scope  # noqa: E402
from controlplane.storage.service import StorageService  # noqa: E402
from protocol.storage_calls import EXIT_METHOD, CodecError, StorageCallRefused  # noqa: E402
from protocol.storage_codec import decode, encode  # noqa: E402
from tests.unit.storage_loopback import Loopback, example_run, user_instance  # noqa: E402
from userland.client import RelayClient  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "images" / "example-location"


# -- the codec ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    None, 1, 2.5, "x", True, [1, "a"], (1, 2), {1, 2}, frozenset({"a"}), {"k": (1, 2)},
    {AssetKey(["a", "b"]): 3}, dt.datetime(2026, 11, 26, 6, 0, tzinfo=dt.UTC),
    RunsFilter(run_ids=["r1"], created_after=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)),
    PoolConfig(pool_granularity=None, default_pool_limit=3, op_granularity_run_buffer=None),
    DagsterRunStatus.SUCCESS, AssetKey(["raw_numbers"]),
])
def test_codec_round_trips(value: Any) -> None:
    back = decode(encode(value))
    assert back == value and type(back) is type(value)


def test_codec_refuses_what_it_does_not_know_and_never_imports_a_name_it_is_sent() -> None:
    class Foreign:
        pass

    with pytest.raises(CodecError, match="has no codec"):
        encode(Foreign())
    with pytest.raises(CodecError, match="bytes"):
        encode(b"\x80")
    for text, message in [
        ('{"@":"record","t":"os:system","v":{}}', "not on the storage codec's allowlist"),
        ('{"@":"pickle","v":"gASV"}', "unknown value tag"),
        ('{"py/object":"os.system"}', "not an encoded value"),
        ('{"@":"serdes","v":"{\\"__class__\\": \\"NoSuchClass\\"}"}', "cannot decode a serdes value"),
        ("not json", "not JSON"),
    ]:
        with pytest.raises(CodecError, match=message):
            decode(text)


# -- a real run through userland, looped back --------------------------------------------------------------
@pytest.fixture()
def control_plane(tmp_path: Path) -> Iterator[DagsterInstance]:
    (tmp_path / "cp").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "cp")) as instance:
        yield instance


@pytest.mark.parametrize("job_name", ["numbers_job", "assets_job"])
def test_a_run_worker_on_userland_storage_succeeds_with_every_event_on_the_control_plane(
        control_plane: DagsterInstance, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, job_name: str) -> None:
    from dagster._cli.api import _execute_run_command_body

    _recon, run = example_run(control_plane, job_name)
    send = Loopback(StorageExecutor(control_plane), Scope(run.run_id, "example"))
    worker = user_instance(monkeypatch, send, tmp_path)
    assert worker.get_ref().run_storage_data.class_name == "RelayRunStorage"

    code = _execute_run_command_body(run.run_id, worker, lambda _e: None, set_exit_code_on_failure=True)

    assert code == 0
    assert control_plane.get_run_by_id(run.run_id).status == DagsterRunStatus.SUCCESS
    events = [e.dagster_event_type for e in control_plane.all_logs(run.run_id) if e.is_dagster_event]
    assert events.count(DagsterEventType.STEP_SUCCESS) == (4 if job_name == "numbers_job" else 3)
    assert DagsterEventType.RUN_SUCCESS in events and "events.store_event" in send.methods
    if job_name == "assets_job":
        assert control_plane.get_latest_materialization_event(AssetKey("summary")) is not None
    # Compute logs land where the control plane's compute log manager serves them.
    manager = control_plane.compute_log_manager
    logs = list(Path(manager._base_dir, run.run_id).rglob("*.out"))
    assert logs and all(Path(str(p)[:-4] + ".complete").exists() for p in logs)
    if job_name == "numbers_job":  # its report op prints this line
        assert any("total=55 evens=5" in p.read_text() for p in logs)


# -- scope ------------------------------------------------------------------------------------------------
def test_a_run_token_cannot_reach_another_runs_data_but_can_its_own(control_plane: DagsterInstance) -> None:
    from dagster._core.events.log import EventLogEntry

    _, mine = example_run(control_plane, "numbers_job")
    _, other = example_run(control_plane, "numbers_job")
    executor, scope = StorageExecutor(control_plane), Scope(mine.run_id, "example")

    def call(method: str, *args: Any, **kwargs: Any) -> Any:
        return decode(executor.execute(scope, method, encode(list(args)), encode(kwargs)))

    def event(run_id: str) -> EventLogEntry:
        return EventLogEntry(error_info=None, level=20, user_message="hello", run_id=run_id, timestamp=1.0)

    refused = [
        (("events.store_event", event(other.run_id)), "is not this token's run"),
        (("events.store_event_batch", [event(mine.run_id), event(other.run_id)]), "is not this token's run"),
        (("events.get_records_for_run", other.run_id), "is not this token's run"),
        (("runs.get_run_records", RunsFilter(run_ids=[other.run_id])), "may list only its own run"),
        (("runs.get_run_records",), "may list only its own run"),
        (("runs.get_execution_plan_snapshot", "0" * 40), "is not the one of this token's run"),
        (("runs.add_run_tags", other.run_id, {"x": "y"}), "is not this token's run"),
        (("runs.wipe",), "not on the storage call allowlist"),
        (("runs.delete_run", mine.run_id), "not on the storage call allowlist"),
    ]
    for (method, *args), message in refused:
        with pytest.raises(StorageCallRefused, match=message):
            call(method, *args)
    # ... and the same calls within scope work.
    call("events.store_event", event(mine.run_id))
    assert [r.event_log_entry.user_message for r in call("events.get_records_for_run", mine.run_id).records][-1] \
        == "hello"
    batch = [event(mine.run_id)._replace(user_message=f"batched {n}") for n in range(3)]
    call("events.store_event_batch", batch)
    assert [r.event_log_entry.user_message for r in call("events.get_records_for_run", mine.run_id).records][-3:] \
        == ["batched 0", "batched 1", "batched 2"]
    records = call("runs.get_run_records", RunsFilter(run_ids=[mine.run_id]))
    assert [r.dagster_run.run_id for r in records] == [mine.run_id]
    assert isinstance(records[0].create_timestamp, dt.datetime)
    assert call("runs.get_execution_plan_snapshot", mine.execution_plan_snapshot_id) is not None
    assert len(control_plane.all_logs(other.run_id)) == 0  # nothing of the refused writes landed


def test_a_location_token_reads_its_own_runs_and_asset_state_and_writes_nothing(control_plane: DagsterInstance,
                                                                             service) -> None:
    from dagster._core.events.log import EventLogEntry
    from dagster._core.storage.dagster_run import DagsterRun

    _, mine = example_run(control_plane, "numbers_job")
    foreign = control_plane.add_run(DagsterRun(job_name="numbers_job", run_id="f" * 32))  # no origin: another's
    executor, scope = StorageExecutor(control_plane), Scope("*", "example")

    def call(method: str, *args: Any, **kwargs: Any) -> Any:
        return decode(executor.execute(scope, method, encode(list(args)), encode(kwargs)))

    records = call("runs.get_run_records", RunsFilter())
    assert [r.dagster_run.run_id for r in records] == [mine.run_id]  # the other location's run is cut out
    assert [r.run_id for r in call("runs.get_runs", RunsFilter())] == [mine.run_id]
    assert call("events.get_records_for_run", mine.run_id) is not None
    assert call("events.get_asset_records") == []
    with pytest.raises(StorageCallRefused, match="not a run of location"):
        call("events.get_records_for_run", foreign.run_id)
    with pytest.raises(StorageCallRefused, match="not allowed for a location token"):
        call("events.store_event", EventLogEntry(error_info=None, level=20, user_message="x", run_id=mine.run_id,
                                                 timestamp=1.0))
    with pytest.raises(StorageCallRefused, match="not allowed for a location token"):
        call("runs.get_execution_plan_snapshot", mine.execution_plan_snapshot_id)
    svc, audits = service
    out = svc.write(AGENT, "k", "*", "example", [{"method": "runs.add_run_tags", "client": "c", "seq": 1,
                                                   "args": encode([mine.run_id, {"a": "b"}]), "kwargs": encode({})}])
    assert out["accepted"] == 0 and "may only read" in out["refused"][0]["error"] and audits


def test_compute_log_keys_stay_under_the_run(control_plane: DagsterInstance) -> None:
    _, run = example_run(control_plane, "numbers_job")
    executor, scope = StorageExecutor(control_plane), Scope(run.run_id, "example")
    for key in ([run.run_id, "..", "x"], ["other-run", "compute_logs", "x"], [run.run_id, "a/b"]):
        with pytest.raises(StorageCallRefused):
            executor.execute(scope, "compute_logs.upload", encode([key, "stdout", "data"]), encode({}))
    big = "x" * 2000
    small = StorageExecutor(control_plane, compute_log_limit=1000)
    small.execute(scope, "compute_logs.upload", encode([[run.run_id, "compute_logs", "s"], "stdout", big]),
                  encode({}))
    path = control_plane.compute_log_manager.get_captured_local_path([run.run_id, "compute_logs", "s"], "out")
    text = Path(path).read_text()
    assert text.startswith("x" * 1000) and "truncated at 1000 bytes" in text and len(text) < 1100


def _worker_logs(control_plane: DagsterInstance, tmp_path: Path):
    """A run worker's compute log manager, looped back to the control plane, recording every upload."""
    from userland.compute_logs import RelayComputeLogManager

    _, run = example_run(control_plane, "numbers_job")
    send = Loopback(StorageExecutor(control_plane), Scope(run.run_id, "example"))
    uploads: list[dict[str, Any]] = []

    def recording(path: str, body: dict[str, Any]) -> dict[str, Any]:
        uploads.extend(body.get("writes") or [body])
        return send(path, body)

    manager = RelayComputeLogManager(base_dir=str(tmp_path / "worker-logs"), client=RelayClient(recording))
    return send, uploads, manager, [run.run_id, "compute_logs", "step"]


def test_a_compute_log_goes_up_in_chunks_that_land_at_their_offsets(control_plane: DagsterInstance,
                                                                      tmp_path: Path) -> None:
    from dagster._core.storage.compute_log_manager import ComputeIOType

    from userland.compute_logs import CHUNK_BYTES

    send, uploads, manager, key = _worker_logs(control_plane, tmp_path)
    local = Path(manager.get_captured_local_path(key, "err"))
    local.parent.mkdir(parents=True)
    text = "".join(f"line {n}: héllo ✓\n" for n in range(40_000))  # ~800 kB, multi-byte characters
    local.write_text(text)
    manager.upload(key, ComputeIOType.STDERR)
    served = Path(control_plane.compute_log_manager.get_captured_local_path(key, "err"))
    assert served.read_text() == text and len(uploads) == -(-len(text.encode()) // CHUNK_BYTES) > 1
    assert all(len(decode(u["args"])[2].encode()) <= CHUNK_BYTES for u in uploads)
    assert Path(control_plane.compute_log_manager.complete_artifact_path(key)).exists()
    send("/v1/write", {"writes": [uploads[0]]})  # the first chunk replayed after the rest: nothing changes
    assert served.read_text() == text


def test_a_running_steps_output_goes_up_line_by_line_then_the_rest_at_the_end(control_plane: DagsterInstance,
                                                                              tmp_path: Path) -> None:
    from dagster._core.storage.compute_log_manager import ComputeIOType

    from userland.compute_logs import Upload

    _, uploads, manager, key = _worker_logs(control_plane, tmp_path)
    local = Path(manager.get_captured_local_path(key, "out"))
    local.parent.mkdir(parents=True)
    served = Path(control_plane.compute_log_manager.get_captured_local_path(key, "out"))
    upload = Upload(manager, key, ComputeIOType.STDOUT)
    with local.open("ab") as f:
        f.write("first line ✓\nsecond, not fin".encode())
        f.flush()
        upload.send(final=False)
        assert served.read_text() == "first line ✓\n"  # whole lines only while the step runs
        assert not Path(control_plane.compute_log_manager.complete_artifact_path(key)).exists()
        f.write(b"ished\nbad byte \xff here\n")
        f.flush()
        upload.send(final=False)
        f.write(b"last, no newline")
    upload.send(final=True)
    assert served.read_text() == "first line ✓\nsecond, not finished\nbad byte \ufffd here\nlast, no newline"
    assert Path(control_plane.compute_log_manager.complete_artifact_path(key)).exists()
    assert [decode(u["kwargs"])["complete"] for u in uploads] == [False, False, True]


# -- ingestion: once, in scope, audited; the agent's exit report -----------------------------------------------
@pytest.fixture()
def service(control_plane: DagsterInstance, tmp_path: Path):
    audits: list[dict] = []
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'airlock.db'}")
    svc = StorageService(engine, lambda: control_plane, serves=lambda agent, loc: loc == "example",
                         audit=lambda **kw: audits.append(kw))
    svc.create_schema()
    return svc, audits


AGENT = SimpleNamespace(id="agent-1")


def test_writes_are_applied_once_even_when_a_batch_is_sent_again(service, control_plane) -> None:
    from dagster._core.events.log import EventLogEntry

    svc, _ = service
    _, run = example_run(control_plane, "numbers_job")
    writes = [{"method": "events.store_event", "client": "c1", "seq": i, "kwargs": encode({}),
               "args": encode([EventLogEntry(error_info=None, level=20, user_message=f"m{i}", run_id=run.run_id,
                                             timestamp=float(i))])} for i in range(1, 4)]
    _, other = example_run(control_plane, "numbers_job")
    forged = {"method": "events.store_event", "client": "c1", "seq": 9, "kwargs": encode({}),
              "args": encode([EventLogEntry(error_info=None, level=20, user_message="forged", run_id=other.run_id,
                                            timestamp=9.0)])}
    batch = [writes[0], forged, *writes[1:]]
    out = svc.write(AGENT, "k", run.run_id, "example", batch)
    assert (out["accepted"], out["duplicates"]) == (3, 0)
    assert [r["index"] for r in out["refused"]] == [1] and "is not this token's run" in out["refused"][0]["error"]
    assert svc.write(AGENT, "k", run.run_id, "example", writes) == {"accepted": 0, "duplicates": 3, "refused": []}
    messages = [e.user_message for e in control_plane.all_logs(run.run_id)]
    assert messages == ["m1", "m2", "m3"]
    assert control_plane.all_logs(other.run_id) == []


def test_writes_for_a_location_the_agent_does_not_serve_or_an_unknown_run_are_refused_and_audited(
        service, control_plane) -> None:
    svc, audits = service
    _, run = example_run(control_plane, "numbers_job")
    write = [{"method": "events.store_event", "client": "c", "seq": 1, "args": "[]", "kwargs": encode({})}]
    out = svc.write(AGENT, "k", run.run_id, "elsewhere", write)
    assert out["accepted"] == 0 and "does not serve location 'elsewhere'" in out["refused"][0]["error"]
    out = svc.write(AGENT, "k", "no-such-run", "example", write)
    assert "no run no-such-run" in out["refused"][0]["error"]
    assert [a["accepted"] for a in audits] == [False, False]
    with pytest.raises(StorageCallRefused):
        svc.call(AGENT, "k", "no-such-run", "example", {"method": "runs.has_run", "args": "[]", "kwargs": "{}"})


def test_an_exit_report_fails_a_run_that_had_not_ended_with_the_oom_reason(service, control_plane) -> None:
    svc, _ = service
    _, run = example_run(control_plane, "numbers_job")
    report = {"exit_code": 137, "oom_killed": True, "log_tail": "Killed", "reason": None}
    out = svc.write(AGENT, "k", run.run_id, "example", [{"method": EXIT_METHOD, "args": "[]", "client": "airlock-agent",
                                                         "seq": 1, "kwargs": json.dumps(report)}])
    assert out["accepted"] == 1
    failed = control_plane.get_run_by_id(run.run_id)
    assert failed.status == DagsterRunStatus.FAILURE
    failure = next(e for e in control_plane.all_logs(run.run_id)
                   if e.dagster_event_type == DagsterEventType.RUN_FAILURE)
    assert "exited with code 137" in failure.message and "OOM-killed" in failure.message


def test_a_launch_that_failed_ends_the_run_at_once_with_the_appliances_reason(service, control_plane) -> None:
    svc, _ = service
    _, run = example_run(control_plane, "numbers_job")
    reason = "the appliance could not start the run's container: cannot create x: engine answered 502"
    report = {"exit_code": None, "oom_killed": False, "log_tail": "", "reason": reason}
    svc.write(AGENT, "k", run.run_id, "example", [{"method": EXIT_METHOD, "args": "[]", "client": "airlock-agent",
                                                   "seq": 1, "kwargs": json.dumps(report)}])
    assert control_plane.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
    failure = next(e for e in control_plane.all_logs(run.run_id)
                   if e.dagster_event_type == DagsterEventType.RUN_FAILURE)
    assert failure.message == reason + "."


def test_the_relay_hands_user_code_the_userland_ref_never_the_control_planes(tmp_path: Path) -> None:
    from dagster._core.instance.ref import InstanceRef
    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin, RemoteRepositoryOrigin
    from dagster._grpc.types import ExternalScheduleExecutionArgs, SensorExecutionArgs
    from dagster._serdes import deserialize_value, serialize_value

    from controlplane.relay.scrub import CARRIES_INSTANCE_REF, scrub_instance_ref
    from protocol.dagster_grpc import decode_echo, encode_echo

    (tmp_path / "control-plane-secret-path").mkdir()
    ref = InstanceRef.from_dir(str(tmp_path / "control-plane-secret-path"))
    origin = RemoteRepositoryOrigin(GrpcServerCodeLocationOrigin(host="h", port=1, location_name="example"), "r")
    for method, args in [
        ("SyncExternalSensorExecution", SensorExecutionArgs(repository_origin=origin, instance_ref=ref,
                                                            sensor_name="s", cursor="7")),
        ("SyncExternalScheduleExecution", ExternalScheduleExecutionArgs(
            repository_origin=origin, instance_ref=ref, schedule_name="sch", scheduled_execution_timestamp=None,
            log_key=None)),
    ]:
        method = f"/api.DagsterApi/{method}"
        assert method in CARRIES_INSTANCE_REF
        out = decode_echo(scrub_instance_ref(method, encode_echo(serialize_value(args))))
        assert "control-plane-secret-path" not in out
        scrubbed = deserialize_value(out)
        assert scrubbed.instance_ref.run_storage_data.class_name == "RelayRunStorage"
        assert scrubbed.repository_origin == origin
