"""The appliance's metadata relay without Docker: run tokens, the durable spool, in-order forwarding, and the
HTTP faces run workers and the agent talk to."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from appliance.agent.transport import GatewayError
from appliance.metadata.app import MAX_RECORD_BYTES, RelayState, control_app, worker_app
from appliance.metadata.forwarder import Forwarder
from appliance.metadata.spool import Spool, SpooledBatch, SpoolFull
from appliance.metadata.tokens import RunScope, RunTokens, TokenRefused
from protocol.storage_calls import EXIT_METHOD

RUN, OTHER = "0b6c1c9e-1111-4c1e-9d7a-000000000001", "0b6c1c9e-2222-4c1e-9d7a-000000000002"


def _record(seq: int, method: str = "events.store_event") -> dict[str, Any]:
    return {"method": method, "args": f'["event {seq}"]', "kwargs": "{}", "client": "c1", "seq": seq}


# -- tokens ------------------------------------------------------------------------------------------------
def test_a_token_names_one_run_and_location_and_forgeries_are_refused(tmp_path: Path) -> None:
    tokens = RunTokens.load_or_create(str(tmp_path))
    assert (tmp_path / "run-token.key").stat().st_mode & 0o777 == 0o600
    token = tokens.mint(RunScope(RUN, "example"))
    assert tokens.verify(token) == RunScope(RUN, "example")
    assert RunTokens.load_or_create(str(tmp_path)).verify(token) == RunScope(RUN, "example")  # same key after restart
    body, mac = token.rsplit(".", 1)
    forged = [body.replace(RUN, OTHER) + "." + mac, body.replace("example", "other") + "." + mac, body + ".AAAA",
              "v2." + token[3:], "", "v1.a.b"]
    for bad in forged:
        with pytest.raises(TokenRefused):
            tokens.verify(bad)
    (tmp_path / "elsewhere").mkdir()
    other_key = RunTokens.load_or_create(str(tmp_path / "elsewhere"))
    with pytest.raises(TokenRefused, match="does not verify"):
        other_key.verify(token)
    with pytest.raises(ValueError):
        tokens.mint(RunScope("a.b", "example"))


def test_a_revoked_token_is_refused_for_good(tmp_path: Path) -> None:
    tokens = RunTokens.load_or_create(str(tmp_path))
    token = tokens.mint(RunScope(RUN, "example"))
    tokens.revoke(RUN)
    with pytest.raises(TokenRefused, match="has ended"):
        tokens.verify(token)
    with pytest.raises(TokenRefused, match="has ended"):
        RunTokens.load_or_create(str(tmp_path)).verify(token)


# -- spool -------------------------------------------------------------------------------------------------
def test_spool_keeps_order_survives_restart_and_drops_only_a_torn_tail(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for i in range(1, 6):
        spool.append(RUN, "example", _record(i))
    first = spool.read_batch(RUN, max_records=2)
    assert [r["seq"] for r in first.records] == [1, 2]
    spool.ack(RUN, first.end)
    with open(tmp_path / RUN / "log", "ab") as f:
        f.write(b'{"method": "events.store_event", "seq": 6')  # a crash mid-append: never acknowledged
    again = Spool(tmp_path)
    batch = again.read_batch(RUN)
    assert [r["seq"] for r in batch.records] == [3, 4, 5] and batch.location == "example"
    again.ack(RUN, batch.end)
    assert again.pending_runs() == [] and again.pending_of(RUN) == 0


def test_spool_full_is_backpressure_and_frees_up_as_writes_are_forwarded(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=400)
    appended = 0
    with pytest.raises(SpoolFull, match="limit 400"):
        while True:
            spool.append(RUN, "example", _record(appended + 1))
            appended += 1
    assert appended >= 2
    batch = spool.read_batch(RUN)
    assert len(batch.records) == appended  # nothing lost: every acknowledged write is there
    spool.ack(RUN, batch.end)
    spool.append(RUN, "example", _record(appended + 1))


def test_a_batch_bigger_than_the_bound_still_goes_into_an_empty_spool(tmp_path: Path) -> None:
    """Else a single large write (a compute log chunk) could never be spooled: it waits only behind others."""
    spool = Spool(tmp_path, max_bytes=100)
    big = [_record(n) for n in range(1, 11)]  # ~700 bytes
    spool.append_many(RUN, "example", big)
    with pytest.raises(SpoolFull):
        spool.append(RUN, "example", _record(11))
    spool.ack(RUN, spool.read_batch(RUN).end)
    spool.append_many(RUN, "example", big)


def test_a_batch_stays_under_max_bytes_and_a_record_over_it_goes_alone(tmp_path: Path) -> None:
    """A batch may only pass max_bytes when it is one record, so a forwarded request stays under the gateway's
    limit: small records then a large one are two batches, not one over the limit."""
    spool = Spool(tmp_path)
    small = [_record(n) for n in range(1, 4)]
    large = {**_record(4), "args": json.dumps(["x" * 5000])}
    spool.append_many(RUN, "example", [*small, large, _record(5)])
    first = spool.read_batch(RUN, max_bytes=1000)
    assert [r["seq"] for r in first.records] == [1, 2, 3]
    spool.ack(RUN, first.end)
    second = spool.read_batch(RUN, max_bytes=1000)
    assert [r["seq"] for r in second.records] == [4]  # over max_bytes alone: sent by itself
    spool.ack(RUN, second.end)
    assert [r["seq"] for r in spool.read_batch(RUN, max_bytes=1000).records] == [5]


def test_an_ended_runs_files_go_once_everything_is_forwarded(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(RUN, "example", _record(1))
    spool.end(RUN)
    assert (tmp_path / RUN).exists()  # still holds an unforwarded write
    spool.ack(RUN, spool.read_batch(RUN).end)
    assert not (tmp_path / RUN).exists()


def test_reads_wait_for_the_runs_earlier_writes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(RUN, "example", _record(1))
    assert spool.wait_forwarded(RUN, timeout=0.05) is False
    assert spool.wait_forwarded(OTHER, timeout=0.05) is True  # another run's backlog does not hold this one
    threading.Timer(0.1, lambda: spool.ack(RUN, spool.read_batch(RUN).end)).start()
    assert spool.wait_forwarded(RUN, timeout=5) is True


# -- forwarder ---------------------------------------------------------------------------------------------
def _forward_until(forwarder: Forwarder, done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Run the forwarder in its own thread until done() holds (or the timeout passes), then stop it."""
    stop = threading.Event()
    thread = threading.Thread(target=forwarder.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.001)
    stop.set()
    thread.join(5)


def test_forwarder_sends_in_order_retries_failures_and_passes_over_refusals(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for i in range(1, 8):
        spool.append(RUN, "example", _record(i))
    sent: list[list[int]] = []
    failures = iter([True, False, False, False])

    def send(batch: SpooledBatch) -> dict[str, Any]:
        if next(failures, False):
            raise ConnectionError("control plane down")
        sent.append([r["seq"] for r in batch.records])
        return {"accepted": len(batch.records), "duplicates": 0,
                "refused": [{"index": 0, "error": "outside scope"}] if batch.records[0]["seq"] == 1 else []}

    _forward_until(Forwarder(spool, send, max_records=3), lambda: not spool.pending_of(RUN))
    assert sent == [[1, 2, 3], [4, 5, 6], [7]]  # the failed first attempt was sent again, nothing skipped
    assert spool.pending_of(RUN) == 0


def test_a_batch_the_control_plane_refuses_holds_up_only_its_own_run(tmp_path: Path) -> None:
    """A refusal answered for one run's batch (say 413) is retried for that run alone; other runs still go. With
    no answer at all (control plane away) the round stops at the first run instead of waiting on each."""
    spool = Spool(tmp_path)
    spool.append(RUN, "example", _record(1))
    spool.append(OTHER, "example", _record(1))
    tried: list[str] = []

    def send(batch: SpooledBatch) -> dict[str, Any]:
        tried.append(batch.run_id)
        if batch.run_id == RUN:
            raise GatewayError("body larger than 8388608 bytes", status=413)
        return {"accepted": len(batch.records), "duplicates": 0, "refused": []}

    _forward_until(Forwarder(spool, send), lambda: not spool.pending_of(OTHER))
    assert spool.pending_of(OTHER) == 0 and spool.pending_of(RUN) > 0
    assert OTHER in tried and tried.count(RUN) >= 1

    away = Spool(tmp_path / "away")
    away.append(RUN, "example", _record(1))
    away.append(OTHER, "example", _record(1))
    attempts: list[str] = []

    def unreachable(batch: SpooledBatch) -> dict[str, Any]:
        attempts.append(batch.run_id)
        raise ConnectionError("control plane down")

    _forward_until(Forwarder(away, unreachable), lambda: bool(attempts))  # stopped before the first retry (>= 0.1 s)
    assert attempts == [away.pending_runs()[0]]


# -- HTTP faces --------------------------------------------------------------------------------------------
class Upstream:
    def __init__(self) -> None:
        self.calls: list[tuple[RunScope, dict]] = []

    def call(self, scope: RunScope, record: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((scope, record))
        if record["method"] == "runs.get_run_records" and '"refuse"' in record["args"]:
            return {"result": None, "error": "outside this run's scope"}
        return {"result": '"answer"', "error": None}


@pytest.fixture()
def relay(tmp_path: Path):
    state = RelayState(spool=Spool(tmp_path / "spool"), tokens=RunTokens.load_or_create(str(tmp_path)),
                       upstream=Upstream(), read_wait_seconds=0.2)
    return state, TestClient(worker_app(state)), TestClient(control_app(state))


def _body(seq: int, method: str = "events.store_event", args: str = "[]") -> dict[str, Any]:
    return {"method": method, "args": args, "kwargs": "{}", "client": "c1", "seq": seq}


def test_worker_api_refuses_without_a_valid_token_and_spools_with_one(relay) -> None:
    state, worker, _ = relay
    token = state.tokens.mint(RunScope(RUN, "example"))
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": token}):
        response = worker.post("/v1/write", json=_body(1), headers=headers)
        assert response.status_code == 401, response.text
    assert state.spool.pending_runs() == []
    ok = worker.post("/v1/write", json=_body(1), headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and state.spool.read_batch(RUN).records[0]["seq"] == 1


@pytest.mark.parametrize("path,body,message", [
    ("/v1/write", _body(1, method="runs.wipe"), "not on the storage call allowlist"),
    ("/v1/write", _body(1, method=EXIT_METHOD), "not on the storage call allowlist"),  # only the agent sends it
    ("/v1/write", _body(1, method="runs.get_run_records"), "not a write"),
    ("/v1/call", _body(1, method="events.store_event"), "not a call"),
    ("/v1/write", {**_body(1), "seq": "1"}, "seq must be a int"),
    ("/v1/write", [1, 2], "must be a JSON object"),
])
def test_worker_api_refuses_malformed_or_disallowed_calls_and_spools_nothing(relay, path, body, message) -> None:
    state, worker, _ = relay
    token = state.tokens.mint(RunScope(RUN, "example"))
    response = worker.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 400 and message in response.json()["error"]
    assert state.spool.pending_runs() == [] and state.upstream.calls == []


def test_a_batch_of_writes_is_spooled_whole_with_one_fsync_or_refused_whole(relay, monkeypatch) -> None:
    import appliance.metadata.spool as spool_module

    state, worker, _ = relay
    headers = {"Authorization": f"Bearer {state.tokens.mint(RunScope(RUN, 'example'))}"}
    bad = worker.post("/v1/write", json={"writes": [_body(1), _body(2, method="runs.wipe"), _body(3)]},
                      headers=headers)
    assert bad.status_code == 400 and "writes[1]" in bad.json()["error"] and "allowlist" in bad.json()["error"]
    for empty in ({"writes": []}, {"writes": "x"}):
        assert worker.post("/v1/write", json=empty, headers=headers).status_code == 400
    assert state.spool.pending_runs() == []
    fsyncs: list[int] = []
    real_fsync = spool_module.os.fsync
    monkeypatch.setattr(spool_module.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    state.spool.append(RUN, "example", _body(0))  # the run's directory exists: only the log's fsync counts
    fsyncs.clear()
    ok = worker.post("/v1/write", json={"writes": [_body(i) for i in range(1, 501)]}, headers=headers)
    assert ok.status_code == 200 and len(fsyncs) == 1
    assert [r["seq"] for r in state.spool.read_batch(RUN, max_records=1000).records] == list(range(0, 501))


def test_a_call_is_answered_only_after_the_runs_writes_are_forwarded(relay) -> None:
    state, worker, _ = relay
    headers = {"Authorization": f"Bearer {state.tokens.mint(RunScope(RUN, 'example'))}"}
    worker.post("/v1/write", json=_body(1), headers=headers)
    busy = worker.post("/v1/call", json=_body(2, method="runs.get_run_records"), headers=headers)
    assert busy.status_code == 503 and state.upstream.calls == []  # the client retries
    state.spool.ack(RUN, state.spool.read_batch(RUN).end)
    answered = worker.post("/v1/call", json=_body(3, method="runs.get_run_records"), headers=headers)
    assert answered.json() == {"result": '"answer"'}
    assert state.upstream.calls[0][0] == RunScope(RUN, "example")
    refused = worker.post("/v1/call", json=_body(4, method="runs.get_run_records", args='["refuse"]'),
                          headers=headers)
    assert refused.status_code == 403 and "scope" in refused.json()["error"]


def test_an_oversized_body_is_refused(relay) -> None:
    state, worker, _ = relay
    headers = {"Authorization": f"Bearer {state.tokens.mint(RunScope(RUN, 'example'))}",
               "Content-Length": str(65 * 1024 * 1024)}
    response = worker.post("/v1/write", content=b"{}", headers=headers)
    assert response.status_code == 400 and "limit" in response.json()["error"]


def test_a_record_too_large_to_forward_is_refused_at_once_and_nothing_is_spooled(relay) -> None:
    """A record over what one request to the control plane may carry would be refused there on every retry and
    hold up the writes behind it; the relay refuses it (413, naming the limit) before it is spooled."""
    state, worker, _ = relay
    headers = {"Authorization": f"Bearer {state.tokens.mint(RunScope(RUN, 'example'))}"}
    fits = _body(1, args=json.dumps(["x" * (MAX_RECORD_BYTES - 200)]))
    too_large = _body(2, args=json.dumps(["x" * MAX_RECORD_BYTES]))
    alone = worker.post("/v1/write", json=too_large, headers=headers)
    assert alone.status_code == 413, alone.text
    message = alone.json()["error"]
    assert f"over the {MAX_RECORD_BYTES} bytes" in message and message.startswith("events.store_event of ")
    batch = worker.post("/v1/write", json={"writes": [_body(3), too_large]}, headers=headers)
    assert batch.status_code == 413 and batch.json()["error"].startswith("writes[1]: ")
    assert state.spool.pending_runs() == []  # refused whole: nothing spooled
    assert worker.post("/v1/write", json=fits, headers=headers).status_code == 200  # just under: taken
    assert [r["seq"] for r in state.spool.read_batch(RUN).records] == [1]


def test_spool_full_answers_503(relay, tmp_path: Path) -> None:
    state, worker, _ = relay
    state.spool.max_bytes = 10
    headers = {"Authorization": f"Bearer {state.tokens.mint(RunScope(RUN, 'example'))}"}
    assert worker.post("/v1/write", json=_body(1), headers=headers).status_code == 200  # an empty spool takes it
    response = worker.post("/v1/write", json=_body(2), headers=headers)
    assert response.status_code == 503 and "limit 10" in response.json()["error"]
    assert [r["seq"] for r in state.spool.read_batch(RUN).records] == [1]


def test_the_agents_exit_report_is_spooled_behind_the_runs_writes_and_revokes_the_token(relay) -> None:
    state, worker, control = relay
    token = state.tokens.mint(RunScope(RUN, "example"))
    headers = {"Authorization": f"Bearer {token}"}
    worker.post("/v1/write", json=_body(1), headers=headers)
    report = {"location": "example", "exit_code": 137, "oom_killed": True, "log_tail": "Killed"}
    assert control.post(f"/control/runs/{RUN}/exited", json=report).status_code == 200
    assert worker.post("/v1/write", json=_body(2), headers=headers).status_code == 401  # revoked at once
    records = state.spool.read_batch(RUN).records
    assert [r["method"] for r in records] == ["events.store_event", EXIT_METHOD]
    assert json.loads(records[1]["kwargs"])["oom_killed"] is True
    assert control.get(f"/control/runs/{RUN}").json()["pending"] > 0
    state.spool.ack(RUN, state.spool.read_batch(RUN).end)
    assert control.get(f"/control/runs/{RUN}").json()["pending"] == 0
    # A second report (an agent that restarted before removing the container) adds nothing.
    assert control.post(f"/control/runs/{RUN}/exited", json=report).status_code == 200
    assert state.spool.pending_of(RUN) == 0


def test_a_location_token_reads_but_never_writes(relay) -> None:
    state, worker, _ = relay
    token = state.tokens.mint_location("example")
    assert state.tokens.verify(token) == RunScope("*", "example") and state.tokens.verify(token).location_wide
    assert token == state.tokens.mint_location("example")  # deterministic: the code server keeps it
    headers = {"Authorization": f"Bearer {token}"}
    refused = worker.post("/v1/write", json=_body(1), headers=headers)
    assert refused.status_code == 403 and "may only read" in refused.json()["error"]
    assert state.spool.pending_runs() == []
    answered = worker.post("/v1/call", json=_body(2, method="runs.get_run_records"), headers=headers)
    assert answered.status_code == 200 and state.upstream.calls[-1][0] == RunScope("*", "example")
    forged = token.rsplit(".", 1)[0].replace("example", "other") + "." + token.rsplit(".", 1)[1]
    assert worker.post("/v1/call", json=_body(3, method="runs.get_run_records"),
                       headers={"Authorization": f"Bearer {forged}"}).status_code == 401
