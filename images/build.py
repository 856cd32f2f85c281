#!/usr/bin/env python3
"""Build airlock's images offline, tagged by the hash of everything that goes into them.

    python images/build.py                      # all images, from the debootstrapped base
    python images/build.py appliance            # one image (and what it is built on)
    python images/build.py --base-image debian:bookworm-slim   # where pulling is allowed

Why content tags: a second build with nothing changed must cost seconds, on an engine that may or may
not still hold earlier images. Each image's inputs (its staged build context: Dockerfile, hash-locked
wheels, sources, policy) and its base image's tag are hashed; if that tag exists, nothing is built.
The wheelhouse is downloaded once per lock file on the host and installed in the image with
`pip install --no-index --require-hashes`; likewise fastpath/'s crates are `cargo vendor`ed once per
Cargo.lock and built with `cargo build --offline`. Resolved tags are written to .cache/images.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
IGNORED = {"__pycache__", ".pytest_cache", ".ruff_cache", "target"}  # target: cargo's build output
# What `cargo vendor` prints: the crate's build in the image takes crates-io's crates from the context's vendor/.
CARGO_VENDOR_CONFIG = """[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"
"""


@dataclass(frozen=True)
class ImageSpec:
    name: str
    dockerfile: str | None = None  # None: a rootfs built by images/base/build-rootfs.sh from `packages`
    base: str | None = None  # another ImageSpec's name, passed as BASE_IMAGE
    lock: str | None = None  # requirements lock -> wheels/ + requirements.lock in the context
    copy: dict[str, str] = field(default_factory=dict)  # repo path -> path in the context
    packages: str = "images/base/packages.txt"  # rootfs only: the Debian packages debootstrap includes
    cargo_lock: str | None = None  # Cargo.lock -> vendor/ + .cargo/config.toml in the context
    needs: dict[str, str] = field(default_factory=dict)  # build arg -> ImageSpec name whose tag it gets
    userland_wheel: bool = False  # images/userland_wheel.py's wheel -> userland-wheel/ in the context


IMAGES: dict[str, ImageSpec] = {
    spec.name: spec
    for spec in (
        ImageSpec("base"),
        # Debian's postgresql-15 debootstrapped like the base: nothing can be pulled, and a Dockerfile's
        # apt-get has no source on the offline base. compose/onprem.yml runs it.
        ImageSpec("postgres-rootfs", packages="images/postgres/packages.txt"),
        ImageSpec(
            "postgres",
            dockerfile="images/postgres/Dockerfile",
            base="postgres-rootfs",
            copy={"images/postgres": "images/postgres"},
        ),
        # Debian's Rust 1.85 (cargo-web, rustc-web): the offline toolchain for fastpath/.
        ImageSpec("rust-rootfs", packages="images/fastpath/packages.txt"),
        ImageSpec(
            "fastpath",
            dockerfile="images/fastpath/Dockerfile",
            base="rust-rootfs",
            cargo_lock="fastpath/Cargo.lock",
            copy={"fastpath/Cargo.toml": "Cargo.toml", "fastpath/Cargo.lock": "Cargo.lock", "fastpath/src": "src"},
        ),
        ImageSpec(
            "usercode-base",
            dockerfile="images/usercode-base/Dockerfile",
            base="base",
            lock="requirements/usercode.lock",
            userland_wheel=True,  # installed as users install it (docs/USER_CODE.md), and kept for them to copy
            copy={
                "images/ensure-python.sh": "images/ensure-python.sh",
                "images/install-venv.sh": "images/install-venv.sh",
            },
        ),
        ImageSpec(
            "appliance",
            dockerfile="Dockerfile",
            base="base",
            lock="requirements/appliance.lock",
            needs={"FASTPATH_IMAGE": "fastpath"},
            copy={
                "appliance": "src/appliance",
                "protocol": "src/protocol",
                "policy": "policy",
                "images/appliance": "images/appliance",
                "images/ensure-python.sh": "images/ensure-python.sh",
                "images/install-venv.sh": "images/install-venv.sh",
            },
        ),
        ImageSpec(
            "controlplane",
            dockerfile="images/controlplane/Dockerfile",
            base="base",
            lock="requirements/controlplane.lock",
            needs={"FASTPATH_IMAGE": "fastpath"},
            copy={
                "controlplane": "src/controlplane",
                "protocol": "src/protocol",
                "images/controlplane": "images/controlplane",
                "images/ensure-python.sh": "images/ensure-python.sh",
                "images/install-venv.sh": "images/install-venv.sh",
            },
        ),
        ImageSpec(
            "example-location",
            dockerfile="images/example-location/Dockerfile",
            base="usercode-base",
            copy={"images/example-location/example_location": "example_location"},
        ),
    )
}


def log(message: str) -> None:
    print(message, flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_hash(root: Path, extra: str = "") -> str:
    """Hash of every file's relative path, mode bit and content under root, plus extra text."""
    digest = hashlib.sha256(extra.encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        executable = "x" if os.access(path, os.X_OK) else "-"
        digest.update(f"{rel}\0{executable}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()[:16]


def docker_image_exists(tag: str) -> bool:
    result = subprocess.run(["docker", "image", "inspect", tag], capture_output=True)
    return result.returncode == 0


def wheelhouse(lock: Path) -> Path:
    """Download (once) every wheel the lock pins, verified against its hashes."""
    target = CACHE / "wheels" / f"{lock.stem}-{sha256_file(lock)[:16]}"
    if (target / ".complete").exists():
        return target
    log(f"[wheels] downloading {lock.relative_to(ROOT)} -> {target.relative_to(ROOT)}")
    partial = target.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
         "--progress-bar", "off", "-r", str(lock), "-d", str(partial)],
        check=True,
    )
    (partial / ".complete").write_text("")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def cargo_vendor(lock: Path) -> Path:
    """Vendor (once) every crate the Cargo.lock pins, on the host: docker builds reach no crate registry."""
    target = CACHE / "cargo-vendor" / sha256_file(lock)[:16]
    if (target / ".complete").exists():
        return target
    cargo = shutil.which("cargo")
    if cargo is None:
        raise SystemExit(
            "[vendor] cargo is not on this host; it vendors fastpath/'s crates for the offline image build. "
            "Install it (apt-get install cargo-web, or rustup) and run again."
        )
    log(f"[vendor] cargo vendor {lock.relative_to(ROOT)} -> {target.relative_to(ROOT)}")
    partial = target.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(
        [cargo, "vendor", "--locked", "--quiet", "--manifest-path", str(lock.with_name("Cargo.toml")), str(partial)],
        check=True,
        stdout=subprocess.DEVNULL,  # stdout is the config; the context gets CARGO_VENDOR_CONFIG
    )
    (partial / ".complete").write_text("")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def _copy(src: Path, dst: Path, skip_caches: bool = True) -> None:
    """Hard-link (or copy) a file or tree into the staged context, skipping caches (unless told not to)."""
    if src.is_dir():
        for child in src.iterdir():
            if not skip_caches or (child.name not in IGNORED and not child.name.endswith(".pyc")):
                _copy(child, dst / child.name, skip_caches)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage(spec: ImageSpec) -> Path:
    ctx = CACHE / "ctx" / spec.name
    shutil.rmtree(ctx, ignore_errors=True)
    ctx.mkdir(parents=True)
    assert spec.dockerfile
    _copy(ROOT / spec.dockerfile, ctx / "Dockerfile")
    for src, dst in spec.copy.items():
        _copy(ROOT / src, ctx / dst)
    if spec.lock:
        lock = ROOT / spec.lock
        _copy(lock, ctx / "requirements.lock")
        for wheel in wheelhouse(lock).glob("*.whl"):
            _copy(wheel, ctx / "wheels" / wheel.name)
    if spec.userland_wheel:
        sys.path.insert(0, str(ROOT / "images"))
        from userland_wheel import build_wheel  # deterministic: the same sources give the same bytes

        build_wheel(ctx / "userland-wheel")
    if spec.cargo_lock:
        vendor = cargo_vendor(ROOT / spec.cargo_lock)
        for crate in vendor.iterdir():
            if crate.is_dir():
                _copy(crate, ctx / "vendor" / crate.name, skip_caches=False)  # .cargo-checksum.json lists every file
        (ctx / ".cargo").mkdir()
        (ctx / ".cargo" / "config.toml").write_text(CARGO_VENDOR_CONFIG)
    return ctx


def build_rootfs(spec: ImageSpec) -> str:
    """A debootstrapped rootfs image, tagged by the hash of the script and its package list."""
    script, packages = ROOT / "images/base/build-rootfs.sh", ROOT / spec.packages
    digest = hashlib.sha256()
    for path in (script, packages):
        digest.update(path.read_bytes())
    tag = f"airlock/{spec.name}:{digest.hexdigest()[:16]}"
    if docker_image_exists(tag):
        log(f"[{spec.name}] {tag} exists, reused")
    else:
        subprocess.run(["bash", str(script), tag, str(packages)], check=True)
    return tag


def build_image(spec: ImageSpec, buildargs: dict[str, str]) -> str:
    """Build from the staged context; the build args (BASE_IMAGE, ...: content tags) are part of the tag."""
    import docker  # the host's test requirements carry the docker SDK

    ctx = stage(spec)
    tag = f"airlock/{spec.name}:{tree_hash(ctx, json.dumps(buildargs, sort_keys=True))}"
    if docker_image_exists(tag):
        log(f"[{spec.name}] {tag} exists, reused")
        return tag
    log(f"[{spec.name}] building {tag} ({' '.join(f'{k}={v}' for k, v in sorted(buildargs.items()))})")
    client = docker.from_env(timeout=1800)
    for chunk in client.api.build(path=str(ctx), tag=tag, buildargs=buildargs, rm=True, forcerm=True,
                                  pull=False, decode=True):
        if "error" in chunk:
            raise SystemExit(f"[{spec.name}] build failed: {chunk['error'].strip()}")
        line = chunk.get("stream", "").strip()
        if line.startswith("Step "):
            log(f"[{spec.name}]   {line[:150]}")
    return tag


def build(names: list[str], base_image: str | None = None) -> dict[str, str]:
    """Build the named images and everything below them; return {name: tag}."""
    tags: dict[str, str] = {}

    def ensure(name: str) -> str:
        if name in tags:
            return tags[name]
        spec = IMAGES[name]
        if spec.dockerfile is None:
            tags[name] = base_image or build_rootfs(spec)
        else:
            buildargs = {arg: ensure(need) for arg, need in spec.needs.items()}
            if spec.base:
                buildargs["BASE_IMAGE"] = ensure(spec.base)
            tags[name] = build_image(spec, buildargs)
            subprocess.run(["docker", "tag", tags[name], f"airlock/{name}:latest"], check=True)
        return tags[name]

    for name in names:
        ensure(name)
    return tags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", default=list(IMAGES), help=f"any of {', '.join(IMAGES)}")
    parser.add_argument("--base-image", help="a pullable base (e.g. debian:bookworm-slim) instead of debootstrap")
    args = parser.parse_args()
    unknown = set(args.images) - set(IMAGES)
    if unknown:
        parser.error(f"unknown image(s): {', '.join(sorted(unknown))}")
    started = time.monotonic()
    tags = build(args.images, args.base_image)
    CACHE.mkdir(exist_ok=True)
    manifest = CACHE / "images.json"
    known = json.loads(manifest.read_text()) if manifest.exists() else {}
    known.update(tags)
    manifest.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")
    for name, tag in tags.items():
        log(f"{name:18} {tag}")
    log(f"images ready in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
