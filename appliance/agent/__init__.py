"""The agent: reconciles code servers (standalone mode: from locations.yaml) and reports their status."""
