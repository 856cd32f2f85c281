"""`python -m controlplane.serve_gateway`: the agent API gateway over TLS (uvicorn) and, in the same
process and event loop, the gRPC relay listeners.

They share one WorkQueue and one ChannelHub on purpose: the relay hands a call straight to an agent's open
work channel, and without one, an enqueue by the relay wakes the agent's long poll at once, and a posted
result wakes the waiting relay call at once. In separate processes each side only sees the
other through the database re-check (0.5 s), which measured ~500 ms per relayed call.

The control plane's signing key and TLS material are created on first start in the state directory, unless
`airlock-cp tls init` made the TLS material beforehand (on-prem: one CA and certificate for every replica).
uvicorn handles signals: the first stops accepting and drains in-flight requests (long polls end at
their wait), a second forces exit; the relay listeners stop after it. The event loop is the one uvicorn picks
(`loop="auto"`): uvloop, which the control plane image installs; its TLS and socket paths are compiled, where
asyncio's TLS is Python (docs/BENCHMARKS.md, relay section).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import uvicorn

from controlplane.db import create_engine
from controlplane.gateway.app import build_app
from controlplane.gateway.auth import quiet_refused_upgrades
from controlplane.registry import Registry
from controlplane.relay.fastpath import FastPathEdge
from controlplane.relay.manager import serve as serve_relays
from controlplane.settings import ControlPlaneSettings
from controlplane.tls import ensure_tls
from protocol.channel import MAX_FRAME_BYTES
from protocol.fastpath import find_binary
from protocol.signing import SigningKey

log = logging.getLogger("airlock.controlplane")


def control_plane_key(state_dir: str) -> SigningKey:
    return SigningKey.load_or_create(Path(state_dir) / "controlplane.key")[0]


async def start_edge(settings: ControlPlaneSettings) -> FastPathEdge | None:
    """The relay's compiled data path, if installed and not turned off; without it the relay is all Python."""
    binary = find_binary(settings.fastpath)
    if binary is None:
        log.info("relay fast path %s: every relayed call takes the Python relay",
                 "off (AIRLOCK_CP_FASTPATH=off)" if settings.fastpath == "off" else "not installed")
        return None
    edge = FastPathEdge(binary, settings.fastpath_listen, advertised_port=settings.fastpath_port,
                        stats_seconds=settings.fastpath_stats_seconds)
    await edge.start()
    return edge


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s")
    settings = ControlPlaneSettings.from_env()
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    key = control_plane_key(settings.state_dir)
    tls = ensure_tls(settings.tls_dir, list(settings.tls_hostnames))  # or what `airlock-cp tls init` made
    engine = create_engine(settings.database_url)
    app = build_app(engine, key, key_grace_seconds=settings.key_grace_seconds)
    registry = Registry(engine, app.state.queue)
    log.info("gateway on https://%s:%d, control plane key %s", settings.gateway_host, settings.gateway_port,
             key.key_id)
    config = uvicorn.Config(app, host=settings.gateway_host, port=settings.gateway_port, ssl_certfile=str(tls.cert),
                            ssl_keyfile=str(tls.key), timeout_graceful_shutdown=35, log_level="info",
                            access_log=False,  # every request is in the audit log; one line per long poll is noise
                            ws_max_size=MAX_FRAME_BYTES, ws_per_message_deflate=False, loop="auto")
    quiet_refused_upgrades()  # after uvicorn.Config, which configures uvicorn's loggers

    async def run() -> None:
        stop = asyncio.Event()
        edge = await start_edge(settings)
        app.state.hub.fastpath = edge
        relays = asyncio.create_task(serve_relays(registry, app.state.queue, app.state.store, settings.relay_host,
                                                    stop, hub=app.state.hub, edge=edge))
        try:
            await uvicorn.Server(config).serve()
        finally:
            stop.set()
            await relays
            if edge is not None:
                await edge.stop()

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(run())


if __name__ == "__main__":
    main()
