"""Agent-facing gateway of the control plane: agent registry, work queue, long-poll API."""
