"""The hosted side: agent API gateway, request queue, gRPC relay, HybridRunLauncher (see DESIGN.md)."""
