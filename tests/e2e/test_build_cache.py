"""A second image build with nothing changed reuses every image (the timing figures live in
bench/build_cache.py; here only the reuse itself is checked)."""

from __future__ import annotations

import subprocess
import sys

from tests import harness


def test_second_build_reuses_every_image() -> None:
    tags = harness.images()
    again = subprocess.run([sys.executable, str(harness.ROOT / "images/build.py")], capture_output=True, text=True,
                           check=True, timeout=600)
    for name, tag in tags.items():
        assert f"[{name}] {tag} exists, reused" in again.stdout, again.stdout
    assert "Step " not in again.stdout and "debootstrap" not in again.stdout
