#!/usr/bin/env python3
"""The quickstart: the appliance in standalone mode with the example code location, on this host.

    python scripts/quickstart.py up      # (re)start, wait for LOADED, answer a Dagster gRPC Ping
    python scripts/quickstart.py down [--keep-data]

Running `up` again with nothing changed reuses the running appliance. The appliance is started the
way docs/ describe for a VM: the Docker socket (root-equivalent: only sockguard's user may open it),
a state volume, a read-only root, no-new-privileges and only the capabilities supervisord needs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors

ROOT = Path(__file__).resolve().parent.parent
# Tests run a quickstart of their own next to a user's by setting AIRLOCK_QUICKSTART_ID.
APPLIANCE_ID = os.environ.get("AIRLOCK_QUICKSTART_ID", "quickstart")
NAME = f"airlock-{APPLIANCE_ID}"
SOCKET = "/var/run/docker.sock"
APPLIANCE_CAPS = ["CHOWN", "FOWNER", "SETUID", "SETGID", "KILL"]


def appliance_run_kwargs(image: str, *, name: str, appliance_id: str, locations_file: Path,
                         labels: dict[str, str] | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`docker run` of the appliance as docs/ describe it (docker-py keyword arguments)."""
    return {
        "image": image,
        "name": name,
        "detach": True,
        "labels": {"airlock.role": "appliance", **(labels or {})},
        "environment": {"AIRLOCK_APPLIANCE_ID": appliance_id, **(env or {})},
        "volumes": {
            SOCKET: {"bind": SOCKET, "mode": "rw"},
            f"airlock-state-{appliance_id}": {"bind": "/var/lib/airlock", "mode": "rw"},
            str(locations_file): {"bind": "/etc/airlock/locations.yaml", "mode": "ro"},
        },
        "cap_drop": ["ALL"],
        "cap_add": APPLIANCE_CAPS,
        "security_opt": ["no-new-privileges:true"],
        "read_only": True,
        "tmpfs": {"/run": "rw,nosuid,nodev,mode=0755", "/tmp": "rw,nosuid,nodev"},
        "restart_policy": {"Name": "unless-stopped"},
        # sockguard and the egress proxy log every decision: keep the appliance's own log bounded.
        "log_config": {"Type": "json-file", "Config": {"max-size": "20m", "max-file": "5"}},
    }


def exec_cli(container: Any, *args: str) -> tuple[int, str]:
    result = container.exec_run(["airlock", *args])
    return result.exit_code, result.output.decode(errors="replace")


def up() -> int:
    started = time.monotonic()
    tags = json.loads((ROOT / ".cache/images.json").read_text())
    workdir = ROOT / ".airlock" / APPLIANCE_ID
    workdir.mkdir(parents=True, exist_ok=True)
    locations = workdir / "locations.yaml"
    locations.write_text(
        "version: 1\nlocations:\n"
        f"  - name: example\n    image: {tags['example-location']}\n    module: example_location.definitions\n"
    )
    locations.chmod(0o644)
    client = docker.from_env()
    kwargs = appliance_run_kwargs(tags["appliance"], name=NAME, appliance_id=APPLIANCE_ID, locations_file=locations)
    fingerprint = hashlib.sha256(json.dumps(kwargs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    kwargs["labels"]["airlock.quickstart-config"] = fingerprint
    try:
        existing = client.containers.get(NAME)
    except docker.errors.NotFound:
        existing = None
    if existing is not None and existing.status == "running" and \
            existing.labels.get("airlock.quickstart-config") == fingerprint:
        print(f"[quickstart] appliance {NAME} already running with this configuration; reusing it")
        container = existing
    else:
        if existing is not None:
            print(f"[quickstart] replacing appliance {NAME} (configuration changed or not running)")
            existing.remove(force=True)
        container = client.containers.run(**kwargs)
        print(f"[quickstart] started appliance {NAME} ({tags['appliance']})")
    print("[quickstart] waiting for the example code location ...")
    code, out = exec_cli(container, "status", "--wait", "LOADED", "--timeout", "300")
    print(out.rstrip())
    if code != 0:
        print(container.logs(tail=60).decode(errors="replace"), file=sys.stderr)
        print("[quickstart] the example location did not reach LOADED", file=sys.stderr)
        return 1
    code, out = exec_cli(container, "ping", "example", "--count", "3")
    print(out.rstrip())
    print(f"[quickstart] ready in {time.monotonic() - started:.1f} s. Next: docker exec {NAME} airlock doctor; "
          f"stop with: make down")
    return code


def down(keep_data: bool) -> int:
    client = docker.from_env()
    with contextlib.suppress(docker.errors.NotFound):
        client.containers.get(NAME).remove(force=True)
    for c in client.containers.list(all=True, filters={"label": f"airlock.appliance-id={APPLIANCE_ID}"}):
        c.remove(force=True)
    for n in client.networks.list(filters={"label": f"airlock.appliance-id={APPLIANCE_ID}"}):
        n.remove()
    if not keep_data:
        with contextlib.suppress(docker.errors.NotFound):
            client.volumes.get(f"airlock-state-{APPLIANCE_ID}").remove()
    print("[quickstart] removed the appliance, its code servers and networks"
          + ("" if keep_data else " and its state volume"))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up")
    p = sub.add_parser("down")
    p.add_argument("--keep-data", action="store_true")
    args = parser.parse_args()
    raise SystemExit(up() if args.command == "up" else down(args.keep_data))


if __name__ == "__main__":
    main()
