"""Run verified work with bounded concurrency, one handler per kind (a registry, not an if/elif chain),
and hand every outcome — success or failure — to the result batcher."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from protocol.work import SignedWork, WorkKind

log = logging.getLogger("airlock.agent.dispatch")
Handler = Callable[[SignedWork], dict[str, Any]]


class HandlerError(Exception):
    """The work was understood but failed; the message goes back to the control plane."""


class Dispatcher:
    def __init__(self, handlers: Mapping[WorkKind, Handler], on_result: Callable[[dict[str, Any]], None], *,
                 max_workers: int = 8) -> None:
        self.handlers, self.on_result = dict(handlers), on_result
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="airlock-work")

    def submit(self, work: SignedWork) -> None:
        self.pool.submit(self._run, work)

    def _run(self, work: SignedWork) -> None:
        handler = self.handlers.get(work.kind)
        try:
            if handler is None:
                raise HandlerError(f"this agent does not handle {work.kind.value} yet")
            result = handler(work)
            self.on_result({"id": work.id, "ok": True, "payload": json.dumps(result, separators=(",", ":"))})
        except HandlerError as exc:
            self.on_result({"id": work.id, "ok": False, "error": str(exc)})
        except Exception as exc:  # a handler bug must still answer, or the caller waits for nothing
            log.exception("work %s (%s) failed", work.id, work.kind.value)
            self.on_result({"id": work.id, "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
