"""The agent API contract, from both sides: the SDL the gateway serves is protocol/schema.graphql, and
every operation the agent sends validates against it."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from graphql import build_schema, parse, print_schema, validate
from starlette.testclient import TestClient

from appliance.agent import operations
from controlplane.gateway.app import build_app
from protocol.signing import SigningKey

SDL = (Path(__file__).resolve().parents[2] / "protocol" / "schema.graphql").read_text()


def test_gateway_serves_exactly_the_checked_in_sdl(tmp_path: Path) -> None:
    app = build_app(sa.create_engine(f"sqlite:///{tmp_path}/cp.db"), SigningKey.generate())
    served = TestClient(app).get("/schema.graphql")
    assert served.status_code == 200
    assert served.text == print_schema(build_schema(SDL))


@pytest.mark.parametrize("name", sorted(operations.ALL))
def test_every_agent_operation_validates_against_the_sdl(name: str) -> None:
    errors = validate(build_schema(SDL), parse(operations.ALL[name]))
    assert errors == [], [e.message for e in errors]


def test_an_operation_the_sdl_does_not_have_is_caught() -> None:
    errors = validate(build_schema(SDL), parse("mutation { launchEverything }"))
    assert errors, "validation must fail for a field the schema lacks"
