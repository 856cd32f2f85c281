"""What both ends of the relay's compiled data path share: where its binary is, and how its log reads.

`airlock-fastpath` (fastpath/, docs/FASTPATH.md) runs as a child of the gateway (controlplane/relay/fastpath.py)
and of the agent (appliance/agent/fastpath.py). Its stderr carries one line per decision, in the same
`...-DECISION ... decision=refuse reason=...` shape as the Python relay's.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

__all__ = ["BINARY", "find_binary", "log_child_line"]

BINARY = "airlock-fastpath"
HOST_BUILD = Path(__file__).resolve().parents[1] / "fastpath" / "target" / "release" / BINARY


def find_binary(setting: str) -> str | None:
    """The binary to run: `setting` is "off", "auto" (on PATH, else a host build `make fastpath` made, else
    None: the relay stays all Python) or a path, which must be executable."""
    if setting == "off":
        return None
    if setting != "auto":
        if not os.access(setting, os.X_OK):
            raise FileNotFoundError(f"fast path binary {setting!r} is not an executable file")
        return setting
    return shutil.which(BINARY) or (str(HOST_BUILD) if os.access(HOST_BUILD, os.X_OK) else None)


def log_child_line(log: logging.Logger, line: bytes) -> None:
    """One stderr line of the child: refusals at WARNING (as the Python relay logs its own), the rest at INFO."""
    text = line.decode(errors="replace").rstrip()
    if text:
        log.log(logging.WARNING if "decision=refuse" in text else logging.INFO, "%s", text)
