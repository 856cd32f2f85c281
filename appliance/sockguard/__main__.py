"""``python -m appliance.sockguard``: run the filtering Docker socket proxy in the foreground.

Runs as its own user (supervisor starts it); the agent gets only ``--listen``, never ``--upstream``.
A bad policy refuses to start rather than falling back to anything more permissive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from appliance.policy import PolicyError, load_policy
from appliance.policy.operator import LiveImages, operator_file
from appliance.sockguard import load_table, rules
from appliance.sockguard.app import Sockguard


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if mode & ~0o777 or mode & 0o007:
        raise argparse.ArgumentTypeError("mode must be within 0770: 'other' never gets the socket")
    return mode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.sockguard",
        description="Filtering proxy in front of the Docker socket: forwards only what airlock policy allows.",
    )
    parser.add_argument("--listen", required=True, help="unix socket path to serve the agent on")
    parser.add_argument("--upstream", default="/var/run/docker.sock", help="the real Docker socket")
    parser.add_argument("--policy", default="/etc/airlock/policy", help="policy directory (sockguard.yaml, ...)")
    parser.add_argument("--operator-images", default=str(operator_file()),
                        help="the operator's image allowlist, re-read on change (AIRLOCK_OPERATOR_DIR/images.yaml)")
    parser.add_argument("--socket-mode", type=_mode, default=0o660, help="octal mode of --listen (default 0660)")
    parser.add_argument("--socket-group", default=None, help="group to own --listen (e.g. the agent's group)")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    policy = load_policy(args.policy)
    guard = Sockguard(upstream=args.upstream, policy=policy, table=load_table(args.policy, rules.CHECKS),
                      images=LiveImages(policy.images, args.operator_images))
    server = await guard.listen(args.listen, mode=args.socket_mode, group=args.socket_group)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sockguard: {args.listen} -> {args.upstream} (policy {args.policy})", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.listen)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(_run(args))
    except PolicyError as exc:
        print(f"sockguard: policy refused: {exc}", file=sys.stderr)
        return 2
    except (OSError, KeyError) as exc:  # KeyError: unknown --socket-group
        print(f"sockguard: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
