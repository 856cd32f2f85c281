"""A location's persistent artifact volume: its names and the one shape it may have.

Dagster's default IO manager writes files a later run reads (materialize upstream today, downstream tomorrow),
so each location gets a volume that outlives its run containers, mounted at protocol.locations.ARTIFACTS_DIR
in that location's code server and runs only. Docker 20.10's local volume driver ignores nosuid/nodev/noexec
on a plain or bind volume, so the mounted volume is an overlay (a real mount, whose flags the kernel applies)
over three plain "layer" volumes the engine made itself:

    airlock-<appliance>-<location>-artifacts          overlay, nosuid,nodev,noexec   mounted in containers
    airlock-<appliance>-<location>-artifacts-lower    plain, empty                   never mounted
    airlock-<appliance>-<location>-artifacts-upper    plain, holds the files         never mounted
    airlock-<appliance>-<location>-artifacts-work     plain, overlay's scratch       never mounted

The overlay's host paths are only ever the layer volumes' own Mountpoints as the engine reports them, so
neither the agent nor sockguard names a host path. The launcher (launcher/engine.py) builds these; sockguard
(sockguard/rules.py) accepts exactly these and nothing else, with the same functions from here.
"""

from __future__ import annotations

from collections.abc import Mapping

LAYERS = ("lower", "upper", "work")
MOUNT_FLAGS = ("nosuid", "nodev", "noexec")
# Where the create-only preparation container mounts the fresh volume: Docker copies the image's /tmp owner and
# mode (root, 1777) onto an empty volume, which makes it writable for the containers' non-root user.
PREP_TARGET = "/tmp"


def volume_name(appliance_id: str, location: str) -> str:
    return f"airlock-{appliance_id}-{location}-artifacts"


def layer_name(volume: str, layer: str) -> str:
    return f"{volume}-{layer}"


def overlay_options(mountpoints: Mapping[str, str]) -> dict[str, str]:
    """The overlay volume's DriverOpts from its layers' Mountpoints (keyed by LAYERS)."""
    for layer in LAYERS:
        path = mountpoints[layer]
        if not path.startswith("/") or any(c in path for c in ",:=\n") or ".." in path.split("/"):
            raise ValueError(f"layer {layer} has a mount point the overlay options cannot carry: {path!r}")
    dirs = ",".join(f"{layer}dir={mountpoints[layer]}" for layer in LAYERS)
    return {"type": "overlay", "device": "overlay", "o": f"{dirs},{','.join(MOUNT_FLAGS)}"}


def is_hardened_overlay(options: Mapping[str, str] | None) -> bool:
    """The engine's view of a volume: an overlay mounted nosuid, nodev and noexec."""
    options = options or {}
    flags = set(options.get("o", "").split(","))
    return options.get("type") == "overlay" and options.get("device") == "overlay" and set(MOUNT_FLAGS) <= flags
