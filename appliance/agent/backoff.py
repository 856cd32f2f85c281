"""Per-key exponential backoff with jitter, on an injectable clock so tests control time."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Entry:
    failures: int
    not_before: float


class Backoff:
    """Retry a failing key after base * 2**n seconds (capped, jittered); success resets it."""

    def __init__(self, base: float = 2.0, cap: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 jitter: Callable[[], float] = random.random) -> None:
        self.base, self.cap, self.clock, self.jitter = base, cap, clock, jitter
        self._entries: dict[str, _Entry] = {}

    def ready(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is None or self.clock() >= entry.not_before

    def failed(self, key: str) -> float:
        """Record a failure; returns the delay before the next try."""
        failures = self._entries[key].failures + 1 if key in self._entries else 1
        delay = min(self.cap, self.base * 2 ** (failures - 1)) * (0.8 + 0.4 * self.jitter())
        self._entries[key] = _Entry(failures, self.clock() + delay)
        return delay

    def succeeded(self, key: str) -> None:
        self._entries.pop(key, None)

    def failures(self, key: str) -> int:
        entry = self._entries.get(key)
        return entry.failures if entry else 0
