"""Compute logs (a step's raw stdout/stderr) captured in the run container and uploaded through the relay.

Capture is Dagster's own LocalComputeLogManager on the container's scratch tmpfs; when a capture ends, both
files go up in chunks of `CHUNK_BYTES` (each a spooled write that lands at its offset, so a replayed chunk
changes nothing), capped at `max_bytes` (the rest is cut and the cut is marked), so the control plane's UI
serves them from its own compute log manager. Chunks keep every request to the control plane small.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from dagster._core.storage.compute_log_manager import CapturedLogContext, ComputeIOType
from dagster._core.storage.local_compute_log_manager import IO_TYPE_EXTENSION, LocalComputeLogManager
from dagster._serdes import ConfigurableClassData

from userland.client import RelayClient, client_from_env

__all__ = ["RelayComputeLogManager"]

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
CHUNK_BYTES = 256 * 1024


class RelayComputeLogManager(LocalComputeLogManager):
    def __init__(self, base_dir: str = "/tmp/dagster_home/logs", url: str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, inst_data: ConfigurableClassData | None = None,
                 client: RelayClient | None = None) -> None:
        super().__init__(base_dir=base_dir, inst_data=inst_data)
        self.max_bytes = max_bytes
        self._url, self._client = url, client

    @classmethod
    def config_type(cls) -> dict:
        from dagster import Field, Int, StringSource

        return {"base_dir": Field(StringSource, is_required=False), "url": Field(StringSource, is_required=False),
                "max_bytes": Field(Int, is_required=False)}

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
        with super().capture_logs(log_key) as context:
            yield context
        for io_type in (ComputeIOType.STDOUT, ComputeIOType.STDERR):
            self.upload(log_key, io_type)

    def upload(self, log_key: Sequence[str], io_type: ComputeIOType) -> None:
        path = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[io_type])
        if not os.path.exists(path):
            return
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            data = f.read(self.max_bytes).decode("utf-8", errors="replace").encode()  # offsets in valid UTF-8
        for offset, chunk in _chunks(data, CHUNK_BYTES):
            last = offset + len(chunk) >= len(data)
            self.client.call("compute_logs.upload", (list(log_key), io_type.value, chunk.decode()),
                             {"offset": offset, "complete": last, "truncated": last and size > self.max_bytes})


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
