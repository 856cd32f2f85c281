#!/usr/bin/env python3
"""Build `airlock-userland`, the wheel a code-location image installs to run on airlock (docs/USER_CODE.md).

    python3 images/userland_wheel.py --out dist/     # prints the wheel's path

It holds `userland` (the relay-backed instance storage and compute-log manager run workers use) and the part
of `protocol` it speaks (the storage-call table and codec, the error tree). Written directly as a PEP 427
archive, byte for byte the same from the same sources (sorted entries, fixed timestamps and modes), so the
image that installs it keeps its content tag; no build backend is needed on an offline host.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "airlock_userland"
PACKAGES = ("userland", "protocol")
# The oldest Dagster userland runs with; the newest a location may run is the control plane's own minor, and
# the control plane checks that when the location loads (controlplane/relay/compat.py).
REQUIRES = ("dagster>=1.10", "httpx>=0.27")  # httpx: userland talks to the metadata relay with it
_EPOCH = (1980, 1, 1, 0, 0, 0)


def version() -> str:
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    if not match:
        raise SystemExit("pyproject.toml has no project version")
    return match.group(1)


def _files() -> list[tuple[str, bytes]]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out.append((path.relative_to(ROOT).as_posix(), path.read_bytes()))
    return out


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(out_dir: str | Path) -> Path:
    ver = version()
    dist_info = f"{NAME}-{ver}.dist-info"
    metadata = "\n".join([
        "Metadata-Version: 2.1", "Name: airlock-userland", f"Version: {ver}",
        "Summary: airlock's user-code side: Dagster instance storage and compute logs through the appliance",
        "License: Apache-2.0", "Requires-Python: >=3.10", *(f"Requires-Dist: {r}" for r in REQUIRES), "", "",
    ]).encode()
    wheel = b"Wheel-Version: 1.0\nGenerator: airlock images/userland_wheel.py\nRoot-Is-Purelib: true\n" \
            b"Tag: py3-none-any\n\n"
    entries = [*_files(), (f"{dist_info}/METADATA", metadata), (f"{dist_info}/WHEEL", wheel),
               (f"{dist_info}/top_level.txt", ("\n".join(PACKAGES) + "\n").encode())]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    entries.append((f"{dist_info}/RECORD", (record + f"{dist_info}/RECORD,,\n").encode()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{NAME}-{ver}-py3-none-any.whl"
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "dist"), help="directory to write the wheel to")
    print(build_wheel(parser.parse_args(argv).out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
