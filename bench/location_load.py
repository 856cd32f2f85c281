#!/usr/bin/env python3
"""P7: a code location from `airlock-cp location add` to LOADED, against a bare `dagster api grpc` container
becoming healthy, the same image, alternating, in the same run.

    python bench/location_load.py --rounds 3

airlock: `location add` in the control plane container -> the appliance's agent gets the RECONCILE item,
creates the network, starts the hardened code server, pings it and loads its repositories -> the state LOADED
reaches the control plane in a heartbeat; timed until `airlock-cp location list` says LOADED (what an operator
or `airlock-cp deploy` sees). Baseline: `docker run -d <image> dagster api grpc ...` (no hardening, default
network) until `dagster api grpc-health-check` inside it succeeds. The heartbeat interval (10 s) bounds the
airlock figure from below by up to that much; the appliance's own status file is timed too, to show it.
Target: <= 1.2x. Prints figures; asserts nothing.
"""

# ruff: noqa: E402  (the repository root goes on sys.path before the project's imports)
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import harness
from tests.integration.stack import control_plane_and_appliance

MODULE = "example_location.definitions"


def _until(check, timeout: float = 240.0, step: float = 0.1) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(step)
    raise SystemExit(f"not reached within {timeout:.0f} s")


def bare(dc, image: str, name: str) -> float:
    started = time.monotonic()
    container = dc.containers.run(image, ["dagster", "api", "grpc", "--host", "0.0.0.0", "--port", "4000",
                                          "--lazy-load-user-code", "--module-name", MODULE], detach=True, name=name)
    try:
        _until(lambda: container.exec_run(["dagster", "api", "grpc-health-check", "--port", "4000"]).exit_code == 0)
        return time.monotonic() - started
    finally:
        container.remove(force=True)


def airlock(cp, appliance, image_id: str, name: str) -> tuple[float, float]:
    started = time.monotonic()
    cp.cli("location", "add", name, "--image", image_id, "--module", MODULE)
    _until(lambda: appliance.status().get("locations", {}).get(name, {}).get("state") == "LOADED")
    on_appliance = time.monotonic() - started
    listed = lambda: cp.cli("location", "list").splitlines()  # noqa: E731
    _until(lambda: any(line.split()[:2] == [name, "LOADED"] for line in listed()), step=0.2)
    on_cp = time.monotonic() - started
    cp.cli("location", "remove", name)
    _until(lambda: name not in appliance.status().get("locations", {}))
    return on_cp, on_appliance


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    images, dc = harness.images(), harness.client()
    image = images["example-location"]
    image_id = dc.images.get(image).id
    with tempfile.TemporaryDirectory() as tmp, control_plane_and_appliance(Path(tmp), quiet=True) as (cp, appliance):
        appliance.wait_for("example", "LOADED", timeout=240)
        base, seen_cp, seen_appliance = [], [], []
        for i in range(args.rounds):
            base.append(bare(dc, image, f"airlock-bench-bare-{harness.unique_id()}"))
            on_cp, on_appliance = airlock(cp, appliance, image_id, f"p7-{i}")
            seen_cp.append(on_cp)
            seen_appliance.append(on_appliance)
    b, a, s = statistics.median(base), statistics.median(seen_cp), statistics.median(seen_appliance)
    print(f"P7 location add -> LOADED, median of {args.rounds}")
    print(f"  bare `dagster api grpc` healthy:      {b:6.2f} s   ({', '.join(f'{x:.2f}' for x in base)})")
    print(f"  airlock, LOADED on the appliance:     {s:6.2f} s   ({', '.join(f'{x:.2f}' for x in seen_appliance)})")
    print(f"  airlock, LOADED in location list:     {a:6.2f} s   ({', '.join(f'{x:.2f}' for x in seen_cp)})")
    print(f"  ratio (appliance / bare): {s / b:.2f}x   ratio (control plane / bare): {a / b:.2f}x   target <= 1.2x: "
          f"{'met' if a / b <= 1.2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
