"""`python -m controlplane.relay`: the relay listeners alone, for debugging.

Run this way, each relayed call waits for the queue's 0.5 s database re-check, because the gateway is in
another process; the control plane image runs the same `serve` inside the gateway process instead.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from controlplane.db import create_engine
from controlplane.gateway.queue import WorkQueue
from controlplane.gateway.store import AgentStore
from controlplane.registry import Registry
from controlplane.relay.manager import serve
from controlplane.settings import ControlPlaneSettings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay %(levelname)s %(name)s: %(message)s")
    settings = ControlPlaneSettings.from_env()
    engine = create_engine(settings.database_url)
    queue = WorkQueue(engine)
    queue.create_schema()
    registry = Registry(engine, queue)
    registry.create_schema()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(registry, queue, AgentStore(engine), settings.relay_host, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
