"""Exponential backoff with jitter, the one rule every retry in airlock follows, on an injectable clock.

`Backoff` keeps per-key state (the reconciler's locations, a run's launch tries); `Delays` is the same rule for
one loop (the agent's long poll and heartbeat, the result and metadata uplinks, userland's relay client).
Loops retry only TemporaryError and the foreign errors that mean "no answer"; a PermanentError stops them
with its reason (protocol/errors.py).
"""

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


class Delays:
    """One loop's waits: `base * 2**n` capped at `cap`, each scaled by 0.5-1.5 (jitter), and never above `cap`.

    `next()` after a failure, `reset()` after a success."""

    def __init__(self, base: float, cap: float, jitter: Callable[[], float] = random.random) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got {base} and {cap}")
        self.base, self.cap, self.jitter = base, cap, jitter
        self._current = base

    def next(self) -> float:
        wait = min(self._current * (0.5 + self.jitter()), self.cap)
        self._current = min(self._current * 2, self.cap)
        return wait

    def reset(self) -> None:
        self._current = self.base
