"""Serve the metadata relay: run workers on TCP (every location network), the agent on a Unix socket.

Runs under supervisord as the agent's user (it signs with the appliance key, which only that user reads), in
its own process so an agent crash or restart never interrupts a run's writes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from appliance.agent.identity import KeyFile, load_enrollment
from appliance.agent.transport import GatewayClient, https_client
from appliance.logs import configure
from appliance.metadata.app import RelayState, control_app, worker_app
from appliance.metadata.forwarder import Forwarder
from appliance.metadata.spool import Spool, SpooledBatch
from appliance.metadata.tokens import RunScope, RunTokens
from appliance.settings import Settings

log = logging.getLogger("airlock.metadata")
DEFAULT_PORT = 7070


@dataclass
class GatewayStorage:
    """The relay's upstream: the agent API's storage mutations, signed by the gateway client."""

    client: GatewayClient

    def call(self, scope: RunScope, record: dict[str, Any]) -> dict[str, Any]:
        return self.client.storage_call(scope.run_id, scope.location, record)

    def write(self, batch: SpooledBatch) -> dict[str, Any]:
        return self.client.storage_write(batch.run_id, batch.location, batch.records)


def _wait_for_enrollment(state_dir: str) -> None:
    """The agent enrolls; the relay starts forwarding once it has."""
    while load_enrollment(state_dir) is None:
        log.info("waiting for the agent to enroll")
        time.sleep(2.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m appliance.metadata")
    parser.add_argument("--port", type=int, default=int(os.environ.get("AIRLOCK_METADATA_PORT", DEFAULT_PORT)))
    parser.add_argument("--control-socket", default="/run/airlock/metadata/control.sock")
    parser.add_argument("--max-spool-bytes", type=int,
                        default=int(os.environ.get("AIRLOCK_SPOOL_MAX_BYTES", 256 * 1024 * 1024)))
    args = parser.parse_args()
    configure("metadata")
    settings = Settings.from_env()
    if not settings.control_plane_url:
        log.info("standalone mode (no AIRLOCK_CONTROL_PLANE_URL): no runs here, the metadata relay idles")
        threading.Event().wait()
    _wait_for_enrollment(settings.state_dir)

    http = https_client(settings.control_plane_url, settings.ca_file, timeout=120.0)
    upstream = GatewayStorage(GatewayClient(http, KeyFile(settings.state_dir)))
    spool = Spool(os.path.join(settings.state_dir, "spool"), max_bytes=args.max_spool_bytes)
    state = RelayState(spool=spool, tokens=RunTokens.load_or_create(settings.state_dir), upstream=upstream)

    stop = threading.Event()
    forwarder = Forwarder(spool, upstream.write)
    threading.Thread(target=forwarder.run, args=(stop,), name="airlock-forward", daemon=True).start()
    log.info("metadata relay on :%d (runs) and %s (agent); %d bytes spooled from before", args.port,
             args.control_socket, spool.pending_bytes())

    if os.path.exists(args.control_socket):
        os.unlink(args.control_socket)
    servers = [
        uvicorn.Server(uvicorn.Config(worker_app(state), host="0.0.0.0", port=args.port, log_level="warning",
                                      access_log=False, lifespan="off")),
        uvicorn.Server(uvicorn.Config(control_app(state), uds=args.control_socket, log_level="warning",
                                      access_log=False, lifespan="off")),
    ]

    async def serve() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    try:
        asyncio.run(serve())
    finally:
        stop.set()


if __name__ == "__main__":
    main()
