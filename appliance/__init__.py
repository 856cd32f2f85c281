"""The user-side appliance: agent, launcher, sockguard, egress proxy and the `airlock` CLI.

Depends on docker, grpcio, httpx, supervisor, cryptography and pyyaml — never on dagster.
"""
