"""Request-size limits both ends of the agent API agree on: the gateway enforces them, the agent stays under them."""

from __future__ import annotations

__all__ = ["AGENT_MAX_BODY", "DEFAULT_MAX_BODY"]

DEFAULT_MAX_BODY = 1024 * 1024  # anyone's request
AGENT_MAX_BODY = 8 * 1024 * 1024  # a request naming an enrolled, unrevoked agent's key: spooled run metadata, results
