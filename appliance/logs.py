"""Log set-up shared by the appliance's programs: one line per record, on stderr (supervisord collects it)."""

from __future__ import annotations

import logging
import sys


def configure(program: str, level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s {program} %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per long poll is noise
