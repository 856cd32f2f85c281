"""Test layers: tests/unit needs nothing; integration, escape and e2e need Docker and build the images."""

from __future__ import annotations

from pathlib import Path

import pytest

DOCKER_LAYERS = {"integration", "escape", "e2e"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if DOCKER_LAYERS.intersection(parts):
            item.add_marker(pytest.mark.docker)
