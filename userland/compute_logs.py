"""Compute logs (a step's raw stdout/stderr) captured in the run container and uploaded through the relay.

Capture is Dagster's own LocalComputeLogManager on the container's scratch tmpfs. While a step runs, what it
printed goes up every `stream_seconds` (whole lines), so the UI shows a running step's output; when the capture
ends, the rest goes and the log is marked complete. Every upload is a spooled write of at most `CHUNK_BYTES`
that lands at its offset (a replayed chunk changes nothing), capped at `max_bytes` (the rest is cut and the cut
is marked), so the control plane's UI serves the files from its own compute log manager.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Generator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from dagster._core.storage.compute_log_manager import CapturedLogContext, ComputeIOType
from dagster._core.storage.local_compute_log_manager import IO_TYPE_EXTENSION, LocalComputeLogManager
from dagster._serdes import ConfigurableClassData

from protocol.storage_calls import COMPUTE_LOG_MAX_BYTES
from userland.client import RelayClient, client_from_env

__all__ = ["RelayComputeLogManager"]

log = logging.getLogger("airlock.userland.compute_logs")
DEFAULT_MAX_BYTES = COMPUTE_LOG_MAX_BYTES
CHUNK_BYTES = 256 * 1024
IO_TYPES = (ComputeIOType.STDOUT, ComputeIOType.STDERR)


class RelayComputeLogManager(LocalComputeLogManager):
    def __init__(self, base_dir: str = "/tmp/dagster_home/logs", url: str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, stream_seconds: float = 2.0,
                 inst_data: ConfigurableClassData | None = None, client: RelayClient | None = None) -> None:
        super().__init__(base_dir=base_dir, inst_data=inst_data)
        self.max_bytes, self.stream_seconds = max_bytes, stream_seconds
        self._url, self._client = url, client

    @classmethod
    def config_type(cls) -> dict:
        from dagster import Field, Int, StringSource

        return {"base_dir": Field(StringSource, is_required=False), "url": Field(StringSource, is_required=False),
                "max_bytes": Field(Int, is_required=False), "stream_seconds": Field(float, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None,
                          config_value: Mapping[str, Any]) -> RelayComputeLogManager:
        return cls(inst_data=inst_data, **config_value)

    @property
    def client(self) -> RelayClient:
        if self._client is None:
            self._client = client_from_env(self._url)
        return self._client

    @contextmanager
    def capture_logs(self, log_key: Sequence[str]) -> Generator[CapturedLogContext, None, None]:
        uploads = {io_type: Upload(self, log_key, io_type) for io_type in IO_TYPES}
        stop = threading.Event()
        streamer = threading.Thread(target=self._stream, args=(uploads, stop), name="airlock-compute-logs",
                                    daemon=True)
        with super().capture_logs(log_key) as context:
            streamer.start()
            try:
                yield context
            finally:
                stop.set()
                streamer.join()
        for upload in uploads.values():
            upload.send(final=True)

    def _stream(self, uploads: dict[ComputeIOType, Upload], stop: threading.Event) -> None:
        while not stop.wait(self.stream_seconds):
            for upload in uploads.values():
                try:
                    upload.send(final=False)
                except Exception as exc:  # the final upload retries all of it; a live view is best effort
                    log.warning("compute log upload while the step runs failed: %s", exc)

    def upload(self, log_key: Sequence[str], io_type: ComputeIOType) -> None:
        """All of one captured file, marked complete (what the end of a capture sends)."""
        Upload(self, log_key, io_type).send(final=True)


class Upload:
    """One captured file's way up: `read` raw bytes of it consumed, `sent` bytes of (valid UTF-8) text sent.

    Offsets are in the text sent, so a chunk whose bytes were not valid UTF-8 (replaced) cannot shift the
    ones after it. Until the end only whole lines go; at the end, the rest, and the log is marked complete."""

    def __init__(self, manager: RelayComputeLogManager, log_key: Sequence[str], io_type: ComputeIOType) -> None:
        self.manager, self.log_key, self.io_type = manager, list(log_key), io_type
        self.path = manager.get_captured_local_path(log_key, IO_TYPE_EXTENSION[io_type])
        self.read = self.sent = 0

    def send(self, *, final: bool) -> None:
        if not os.path.exists(self.path):
            if final and self.sent:  # streamed before, gone now: still mark it complete
                self._call(b"", self.sent, complete=True, truncated=False)
            return
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            f.seek(self.read)
            raw = f.read(max(0, min(size, self.manager.max_bytes) - self.read))
        if not final:
            raw = raw[: raw.rfind(b"\n") + 1]  # whole lines only while the step still writes
            if not raw:
                return
        data = raw.decode("utf-8", errors="replace").encode()
        for offset, chunk in _chunks(data, CHUNK_BYTES):
            last = offset + len(chunk) >= len(data)
            self._call(chunk, self.sent + offset, complete=final and last,
                       truncated=final and last and size > self.manager.max_bytes)
        self.read += len(raw)
        self.sent += len(data)

    def _call(self, chunk: bytes, offset: int, *, complete: bool, truncated: bool) -> None:
        self.manager.client.call("compute_logs.upload", (self.log_key, self.io_type.value, chunk.decode()),
                                 {"offset": offset, "complete": complete, "truncated": truncated})


def _chunks(data: bytes, limit: int) -> list[tuple[int, bytes]]:
    """(offset, piece) pieces of at most `limit` bytes, cut only between UTF-8 characters; one empty piece
    for empty data, so the upload still marks the log complete."""
    pieces, offset = [], 0
    while True:
        end = min(offset + limit, len(data))
        while offset < end < len(data) and data[end] & 0xC0 == 0x80:  # not inside a character
            end -= 1
        pieces.append((offset, data[offset:end]))
        if end >= len(data):
            return pieces
        offset = end
