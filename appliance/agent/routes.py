"""Write the egress proxy's routes file: which source subnet belongs to which location's allowlist."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.policy import Location
from protocol.files import write_atomic


def render_routes(subnets: dict[str, list[str]], locations: dict[str, Location]) -> str:
    routes = [
        {
            "location": name,
            "cidrs": sorted(subnets[name]),
            "allow": [str(hp) for hp in locations[name].egress.hosts],
            "allow_cidrs": [str(c) for c in locations[name].egress.cidrs],
        }
        for name in sorted(subnets)
        if name in locations
    ]
    return json.dumps({"version": 1, "routes": routes}, indent=2) + "\n"


def write_routes(path: str, text: str) -> bool:
    """Replace the file atomically if its content changed; returns whether it did."""
    target = Path(path)
    try:
        if target.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    # 0640 in the egress proxy's group, which owns the directory
    write_atomic(target, text, mode=0o640, group=target.parent.stat().st_gid)
    return True
