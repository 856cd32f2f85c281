"""userland's relay client without Docker: write-behind batching keeps the run's order, sends on time, on
reads, on dispose and at a run status change; backpressure and failures are never silent."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dagster")

from dagster import DagsterEventType
from dagster._core.events import DagsterEvent
from dagster._core.events.log import EventLogEntry

from protocol.storage_calls import StorageCallRefused
from protocol.storage_codec import decode, encode
from userland.client import RelayBusy, RelayClient, RelayUnavailable

RUN = "0b6c1c9e-1111-4c1e-9d7a-000000000001"


class Relay:
    """Records each request: (path, [(method, seq), ...]); answers calls with their method name."""

    def __init__(self, busy: int = 0) -> None:
        self.requests: list[tuple[str, list[tuple[str, int]]]] = []
        self.busy, self.lock = busy, threading.Lock()

    def __call__(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            if self.busy:
                self.busy -= 1
                raise RelayBusy("spool full")
            records = body.get("writes") or [body]
            self.requests.append((path, [(r["method"], r["seq"]) for r in records]))
        return {"ok": True} if path == "/v1/write" else {"result": encode(body["method"])}

    def methods(self) -> list[str]:
        return [m for _, records in self.requests for m, _ in records]


def _log_line(n: int) -> EventLogEntry:
    return EventLogEntry(error_info=None, level=20, user_message=f"line {n}", run_id=RUN, timestamp=float(n))


def test_lazy_writes_wait_then_go_together_in_order_and_a_call_sends_them_first() -> None:
    relay = Relay()
    client = RelayClient(relay, linger=0.3)
    for n in range(3):
        client.write("events.store_event", (_log_line(n),), {}, lazy=True)
    assert relay.requests == []  # waiting, at most `linger`
    assert client.call("runs.get_run_records", (), {}) == "runs.get_run_records"
    assert relay.requests == [("/v1/write", [("events.store_event", 1), ("events.store_event", 2),
                                             ("events.store_event", 3)]), ("/v1/call", [("runs.get_run_records", 4)])]
    client.write("events.store_event", (_log_line(9),), {}, lazy=True)
    deadline = time.monotonic() + 5
    while len(relay.requests) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert relay.requests[2] == ("/v1/write", [("events.store_event", 5)])  # sent by the flusher, on time


def test_a_full_buffer_goes_at_once_and_an_eager_write_takes_the_waiting_ones_with_it() -> None:
    relay = Relay()
    client = RelayClient(relay, linger=60, max_batch=4)
    for n in range(4):
        client.write("events.store_event", (_log_line(n),), {}, lazy=True)
    assert [len(records) for _, records in relay.requests] == [4]
    client.write("events.store_event", (_log_line(5),), {}, lazy=True)
    client.write("runs.add_run_tags", (RUN, {"a": "b"}), {})
    assert relay.requests[1] == ("/v1/write", [("events.store_event", 5), ("runs.add_run_tags", 6)])
    with pytest.raises(StorageCallRefused, match="needs an answer"):
        client.write("runs.get_run_records", (), {}, lazy=True)
    with pytest.raises(StorageCallRefused, match="allowlist"):
        client.write("runs.wipe", (), {}, lazy=True)


def test_backpressure_retries_the_whole_batch_and_drops_nothing() -> None:
    relay = Relay(busy=3)
    client = RelayClient(relay, linger=60)
    for n in range(10):
        client.write("events.store_event", (_log_line(n),), {}, lazy=True)
    client.flush()
    assert relay.requests == [("/v1/write", [("events.store_event", n) for n in range(1, 11)])]


def test_an_event_too_large_to_forward_is_refused_to_its_caller_and_the_writes_beside_it_still_go(
        tmp_path: Path) -> None:
    """Against the real metadata relay: the oversized write fails where it is made (the step sees why); the
    lazy writes buffered with it are not refused alongside it, and one just under the limit is taken."""
    from starlette.testclient import TestClient

    from appliance.metadata.app import MAX_RECORD_BYTES, RelayState, worker_app
    from appliance.metadata.spool import Spool
    from appliance.metadata.tokens import RunScope, RunTokens

    state = RelayState(spool=Spool(tmp_path / "spool"), tokens=RunTokens.load_or_create(str(tmp_path)),
                       upstream=None)  # type: ignore[arg-type]  # writes only
    worker = TestClient(worker_app(state))
    auth = {"Authorization": f"Bearer {state.tokens.mint(RunScope(RUN, 'example'))}"}

    def send(path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = worker.post(path, json=body, headers=auth)
        if response.status_code >= 400:
            raise StorageCallRefused(f"metadata relay refused ({response.status_code}): {response.json()['error']}")
        return response.json()

    client = RelayClient(send, linger=60)
    client.write("events.store_event", (_log_line(1),), {}, lazy=True)
    client.write("events.store_event", (_log_line(2),), {}, lazy=True)
    huge = EventLogEntry(error_info=None, level=20, user_message="x" * MAX_RECORD_BYTES, run_id=RUN, timestamp=3.0)
    with pytest.raises(StorageCallRefused, match=rf"events.store_event of \d+ bytes is over the {MAX_RECORD_BYTES}"):
        client.write("events.store_event", (huge,), {}, lazy=True)
    near = EventLogEntry(error_info=None, level=20, user_message="y" * (MAX_RECORD_BYTES - 2000), run_id=RUN,
                         timestamp=4.0)
    client.write("events.store_event", (near,), {}, lazy=True)
    client.flush()
    spooled = state.spool.read_batch(RUN, max_records=10, max_bytes=1 << 30).records
    messages = [decode(r["args"])[0].user_message for r in spooled]
    assert [len(m) for m in messages] == [len("line 1"), len("line 2"), MAX_RECORD_BYTES - 2000]
    with pytest.raises(StorageCallRefused, match="over the"):  # the relay holds the same line on its own
        send("/v1/write", {"method": "events.store_event", "args": encode([huge]), "kwargs": "{}", "client": "c",
                           "seq": 99})


def test_a_lazy_write_that_could_not_be_sent_fails_the_next_call() -> None:
    def down(path: str, body: dict[str, Any]) -> dict[str, Any]:
        raise ConnectionRefusedError("relay down")

    client = RelayClient(down, linger=0.01, retry_seconds=0.1)
    client.write("events.store_event", (_log_line(1),), {}, lazy=True)
    time.sleep(0.5)
    with pytest.raises(RelayUnavailable, match="earlier writes of this run could not be sent"):
        client.call("runs.get_run_records", (), {})


def test_event_storage_sends_log_lines_lazily_a_run_status_change_at_once_and_everything_on_dispose() -> None:
    from userland.storage import RelayEventLogStorage

    relay = Relay()
    storage = RelayEventLogStorage(client=RelayClient(relay, linger=60))
    storage.store_event(_log_line(1))
    assert relay.requests == []
    success = EventLogEntry(error_info=None, level=10, user_message="", run_id=RUN, timestamp=2.0,
                            dagster_event=DagsterEvent(DagsterEventType.RUN_SUCCESS.value, "numbers_job"))
    storage.store_event(success)
    assert relay.requests == [("/v1/write", [("events.store_event", 1), ("events.store_event", 2)])]
    storage.store_event(_log_line(3))
    storage.dispose()
    assert relay.requests[-1] == ("/v1/write", [("events.store_event", 3)])


def test_a_forked_child_writes_as_a_new_client(tmp_path: Path) -> None:
    bodies: list[dict[str, Any]] = []
    client = RelayClient(lambda path, body: (bodies.append(body), {"ok": True})[1], linger=60)
    client.write("events.store_event", (_log_line(1),), {}, lazy=True)
    out = tmp_path / "child"
    pid = os.fork()
    if pid == 0:  # the child: none of the parent's waiting writes, its own id, sequence from 1
        out.write_text(f"{client.client_id} {len(client._waiting)} {next(client._seq)}")
        os._exit(0)
    os.waitpid(pid, 0)
    child_id, waiting, seq = out.read_text().split()
    assert child_id != client.client_id and (waiting, seq) == ("0", "1")
    client.flush()
    assert [w["client"] for w in bodies[0]["writes"]] == [client.client_id]
    assert decode(bodies[0]["writes"][0]["args"])[0].user_message == "line 1"
