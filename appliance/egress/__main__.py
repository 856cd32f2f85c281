"""``python -m appliance.egress --policy DIR --routes FILE [--listen 0.0.0.0] [--port N]``.

Run by the appliance's supervisor. A bad policy is fatal (exit 2): without the deny ranges there is
nothing to enforce, so no proxy is better than a guessing one. A bad routes file is not fatal: the
proxy starts, refuses everything and picks the file up as soon as the agent rewrites it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from appliance.egress import log_event
from appliance.egress.routes import RoutesFile
from appliance.egress.server import EgressProxy
from appliance.policy import PolicyError, load_policy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.egress", description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="policy directory (egress.yaml and friends)")
    parser.add_argument("--routes", required=True, help="routes file written by the agent (JSON)")
    parser.add_argument("--listen", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help="port (default: policy egress.yaml port)")
    args = parser.parse_args(argv)
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        log_event("egress.start_failed", error=str(exc))
        return 2
    routes = RoutesFile(args.routes)
    routes.current()  # load and log the routes once at start, not on the first request
    proxy = EgressProxy(policy.egress, routes)
    try:
        asyncio.run(_serve(proxy, args.listen, args.port or policy.egress.port))
    except OSError as exc:
        log_event("egress.start_failed", error=f"cannot listen on {args.listen}: {exc.strerror or exc}")
        return 1
    return 0


async def _serve(proxy: EgressProxy, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and return."""
    server = await proxy.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log_event("egress.listening", listen=host, port=port)
    async with server:
        await stop.wait()
    log_event("egress.stopped")


if __name__ == "__main__":
    raise SystemExit(main())
