#!/usr/bin/env python3
"""Image build cache: time a build from an engine without airlock images, then the same build again.

    python bench/build_cache.py            # removes airlock/* images first (a cold build), then rebuilds
    python bench/build_cache.py --warm     # keeps images: both builds are warm

Prints both wall times and their ratio. The wheelhouse on the host (.cache/wheels) is kept, as it is
on any machine that has built once; pass --no-wheels to drop it too.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def remove_airlock_images() -> int:
    out = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                         text=True, check=True).stdout.split()
    tags = [t for t in out if t.startswith("airlock/")]
    if tags:
        subprocess.run(["docker", "rmi", "-f", *tags], capture_output=True, check=False)
    subprocess.run(["docker", "image", "prune", "-f"], capture_output=True, check=False)
    return len(tags)


def timed_build() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "images/build.py")], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", action="store_true", help="do not remove airlock images first")
    parser.add_argument("--no-wheels", action="store_true", help="also drop the host wheelhouse")
    args = parser.parse_args()
    if not args.warm:
        print(f"removed {remove_airlock_images()} airlock image tags")
    if args.no_wheels:
        shutil.rmtree(ROOT / ".cache/wheels", ignore_errors=True)
    first = timed_build()
    second = timed_build()
    print(f"first build  ({'warm' if args.warm else 'cold engine'}): {first:8.1f} s")
    print(f"second build (nothing changed):       {second:8.1f} s")
    print(f"ratio second/first:                   {second / first:8.3f}")


if __name__ == "__main__":
    main()
