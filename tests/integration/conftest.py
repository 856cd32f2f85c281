"""Fixtures shared by the integration tests."""

from tests.integration.stack import stack  # noqa: F401  (the session-wide control plane + appliance)
