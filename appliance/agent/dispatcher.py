"""Run verified work with bounded concurrency, one handler per kind (a registry, not an if/elif chain),
and hand every outcome — success or failure — to the result batcher."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from protocol.errors import AirlockError
from protocol.work import SignedWork, WorkKind, failed_result, ok_result

log = logging.getLogger("airlock.agent.dispatch")
Handler = Callable[[SignedWork], dict[str, Any]]
# Starts work without blocking and hands its value to the callback later; False: it started nothing (use a Handler).
Starter = Callable[[SignedWork, Callable[[dict[str, Any]], None]], bool]


class HandlerError(AirlockError):
    """The work was understood but failed; the message goes back to the control plane."""


class Dispatcher:
    def __init__(self, handlers: Mapping[WorkKind, Handler], on_result: Callable[[dict[str, Any]], None], *,
                 max_workers: int = 8) -> None:
        self.handlers, self.on_result = dict(handlers), on_result
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="airlock-work")

    def submit(self, work: SignedWork, on_result: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Run `work` on the pool; its result goes to `on_result` if given (e.g. back down its channel)."""
        self.pool.submit(self._run, work, on_result or self.on_result)

    def _run(self, work: SignedWork, on_result: Callable[[dict[str, Any]], None]) -> None:
        handler = self.handlers.get(work.kind)
        try:
            if handler is None:
                raise HandlerError(f"this agent does not handle {work.kind.value} yet")
            on_result(ok_result(work.id, handler(work)))
        except HandlerError as exc:
            on_result(failed_result(work.id, str(exc)))
        except Exception as exc:  # a handler bug must still answer, or the caller waits for nothing
            log.exception("work %s (%s) failed", work.id, work.kind.value)
            on_result(failed_result(work.id, f"{type(exc).__name__}: {exc}"))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
