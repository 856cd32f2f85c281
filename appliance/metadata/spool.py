"""The write-ahead spool: each run's writes on disk, in order, until the control plane has them.

One directory per run: `log` (one JSON record per line, appended and fsynced before the writer is answered),
`acked` (the byte offset the control plane has confirmed) and `meta.json` (the run's location). Bounded:
when the unforwarded bytes of all runs reach `max_bytes`, `append` raises SpoolFull, which the HTTP layer
turns into 503 so the run worker waits and retries — backpressure, never silent loss. A record half-written
by a crash is cut off at the next start (its writer was never answered, so it retries it).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import TemporaryError
from protocol.files import fsync_dir, write_atomic

__all__ = ["Spool", "SpoolFull", "SpooledBatch"]


class SpoolFull(TemporaryError, RuntimeError):
    """The spool holds max_bytes of unforwarded writes; try again when the control plane has caught up."""


@dataclass(frozen=True)
class SpooledBatch:
    run_id: str
    location: str
    records: list[dict[str, Any]]
    end: int  # byte offset just past the last record: what to ack


class _Run:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        meta = json.loads((path / "meta.json").read_text())
        self.location: str = meta["location"]
        self.ended: bool = meta.get("ended", False)
        log = path / "log"
        data = log.read_bytes() if log.exists() else b""
        keep = data.rfind(b"\n") + 1
        if keep != len(data):  # drop a trailing record without its newline: its writer was never answered
            with open(log, "rb+") as f:
                f.truncate(keep)
        self.size, self.count = keep, data.count(b"\n")
        acked = path / "acked"
        self.acked = int(acked.read_text() or 0) if acked.exists() else 0

    @property
    def pending(self) -> int:
        return self.size - self.acked


class Spool:
    def __init__(self, root: str | Path, *, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)  # notified on append and on ack
        for child in sorted(self.root.iterdir()):
            if (child / "meta.json").exists():
                self._runs[child.name] = _Run(child)

    # -- writers ---------------------------------------------------------------------------------------
    def append(self, run_id: str, location: str, record: dict[str, Any]) -> int:
        """Durably add one record; returns its index in the run's log. Raises SpoolFull past the bound."""
        return self.append_many(run_id, location, [record])

    def append_many(self, run_id: str, location: str, records: list[dict[str, Any]]) -> int:
        """Durably add records in order, all or none, with one fsync; returns the first one's index."""
        data = b"".join((json.dumps(r, separators=(",", ":")) + "\n").encode() for r in records)
        with self._lock:
            pending = self.pending_bytes()
            if pending and pending + len(data) > self.max_bytes:  # alone, even an outsized batch goes in
                raise SpoolFull(f"spool holds {pending} unforwarded bytes (limit {self.max_bytes})")
            run = self._runs.get(run_id) or self._create(run_id, location)
        with run.lock:
            with open(run.path / "log", "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            index = run.count
            run.count += len(records)
            run.size += len(data)
        with self.changed:
            self.changed.notify_all()
        return index

    def _create(self, run_id: str, location: str) -> _Run:
        path = self.root / run_id
        path.mkdir(mode=0o700, exist_ok=True)
        write_atomic(path / "meta.json", json.dumps({"location": location}), mode=0o600)
        fsync_dir(self.root)
        run = self._runs[run_id] = _Run(path)
        return run

    # -- the forwarder ---------------------------------------------------------------------------------
    def pending_runs(self) -> list[str]:
        with self._lock:
            return [run_id for run_id, run in self._runs.items() if run.pending > 0]

    def pending_bytes(self) -> int:
        return sum(run.pending for run in self._runs.values())

    def pending_of(self, run_id: str) -> int:
        run = self._runs.get(run_id)
        return run.pending if run is not None else 0

    def read_batch(self, run_id: str, *, max_records: int = 256, max_bytes: int = 4 * 1024 * 1024) -> SpooledBatch:
        run = self._runs[run_id]
        with run.lock:
            start, size = run.acked, run.size
        records, offset = [], start
        with open(run.path / "log", "rb") as f:
            f.seek(start)
            while offset < size and len(records) < max_records:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                if records and offset - start + len(line) > max_bytes:  # a batch over max_bytes only if alone
                    break
                records.append(json.loads(line))
                offset += len(line)
        return SpooledBatch(run_id, run.location, records, offset)

    def ack(self, run_id: str, end: int) -> None:
        run = self._runs[run_id]
        with run.lock:
            if end <= run.acked:
                return
            write_atomic(run.path / "acked", str(end), mode=0o600, durable=False)  # lost: resent, applied once
            run.acked = end
        with self.changed:
            self.changed.notify_all()
        self._collect(run_id)

    # -- readers ---------------------------------------------------------------------------------------
    def wait_forwarded(self, run_id: str, timeout: float) -> bool:
        """Block until every write of this run appended so far is acknowledged (read-your-writes)."""
        run = self._runs.get(run_id)
        if run is None:
            return True
        with run.lock:
            target = run.size
        with self.changed:
            return self.changed.wait_for(lambda: run.acked >= target, timeout=timeout)

    def end(self, run_id: str) -> None:
        """The run's container is gone: its files go once everything in them is forwarded."""
        run = self._runs.get(run_id)
        if run is None:
            return
        with run.lock:
            run.ended = True
            write_atomic(run.path / "meta.json", json.dumps({"location": run.location, "ended": True}), mode=0o600,
                         durable=False)
        self._collect(run_id)

    def _collect(self, run_id: str) -> None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or not run.ended or run.pending > 0:
                return
            del self._runs[run_id]
        shutil.rmtree(run.path, ignore_errors=True)
