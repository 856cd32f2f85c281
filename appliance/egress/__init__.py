"""The egress proxy: the only way out of a location's ``internal: true`` Docker network.

User code gets HTTP_PROXY/HTTPS_PROXY pointing here. Every request is tied to a location by its
source address (routes.py), checked against that location's allowlist and the global deny ranges
(decide.py), resolved once and dialled at exactly the address that was checked (resolve.py), then
tunnelled or forwarded (server.py). Anything unclear is refused, never allowed.
"""

from __future__ import annotations

import json
import sys


def log_event(event: str, **fields: object) -> None:
    """Write one JSON object per line to stderr: the appliance's log collector parses these lines.

    Looked up at call time (not bound at import) so tests and supervisors can redirect stderr.
    """
    sys.stderr.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    sys.stderr.flush()
