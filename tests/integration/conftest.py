"""Fixtures shared by the integration tests."""

from tests.integration.stack import loaded, stack  # noqa: F401  (the session-wide control plane + appliance)
