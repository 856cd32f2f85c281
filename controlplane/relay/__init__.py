"""The control plane's gRPC relay: Dagster's gRPC API on one local port per code location, answered by the agent.

See `server.py` for the status codes and waits, `protocol/grpc_calls.py` for the method table, and
docs/GRPC_METHODS.md for which methods are relayed or refused and why.
"""

from controlplane.relay.server import CallQueue, LocationRelay, RelayLimits, RelayServer, WorkQueueCalls, plan_wait

__all__ = ["CallQueue", "LocationRelay", "RelayLimits", "RelayServer", "WorkQueueCalls", "plan_wait"]
