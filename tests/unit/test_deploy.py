"""`airlock-cp deploy dagster_cloud.yaml`: Dagster+'s file read strictly, then a wait on what agents report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from controlplane.cli import main
from controlplane.deploy import deploy, read_deploy_file
from controlplane.gateway.queue import WorkQueue
from controlplane.gateway.store import AgentStore
from controlplane.registry import Registry
from protocol.errors import PolicyError

IMAGE = "sha256:" + "a" * 64
IMAGE2 = "sha256:" + "b" * 64
FILE = f"""
locations:
  - location_name: etl
    image: {IMAGE}
    code_source:
      package_name: acme_etl
    container_context:
      env_vars: ["MODE=prod", "URL=https://x?a=b"]
    airlock:
      resources: {{memory: 512m}}
      egress: {{allow: ["pypi.org:443"]}}
  - location_name: reports
    image: registry.example.com/acme/reports@{IMAGE2}
    agent_queue: gpu
    code_source:
      module_name: reports.definitions
"""


def test_a_dagster_cloud_yaml_maps_onto_locations(tmp_path: Path) -> None:
    (tmp_path / "dagster_cloud.yaml").write_text(FILE)
    etl, reports = read_deploy_file(tmp_path / "dagster_cloud.yaml")
    assert etl == {"name": "etl", "image": IMAGE, "package": "acme_etl", "env": {"MODE": "prod",
                   "URL": "https://x?a=b"}, "queue": "default", "resources": {"memory": "512m"},
                   "egress": {"allow": ["pypi.org:443"]}}
    assert reports["module"] == "reports.definitions" and reports["queue"] == "gpu"


@pytest.mark.parametrize(("patch", "field", "message"), [
    ({"code_source": {"python_file": "defs.py"}}, "code_source.python_file", "install the project in the image"),
    ({"working_directory": "/app"}, "working_directory", "install the project"),
    ({"build": {"directory": "."}}, "build", "images are built before deploying"),
    ({"container_context": {"env_vars": ["SECRET"]}}, "container_context.env_vars[0]",
     "never hands the agent's environment"),
    ({"container_context": {"docker": {"networks": ["host"]}}}, "container_context.docker", "hardening decides"),
    ({"image_tag": "x"}, "image_tag", "unknown field"),
    ({"code_source": {}}, "code_source", "exactly one of module_name or package_name"),
])
def test_keys_airlock_cannot_honour_are_refused_by_name(tmp_path: Path, patch: dict, field: str, message: str) -> None:
    import yaml

    location = {"location_name": "etl", "image": IMAGE, "code_source": {"module_name": "etl"}}
    for key, value in patch.items():
        location[key] = value
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"locations": [location]}))
    with pytest.raises(PolicyError) as err:
        read_deploy_file(tmp_path / "d.yaml")
    assert err.value.field_path == f"locations[0].{field}" and message in str(err.value)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Registry, AgentStore, str]]:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/cp.db")
    store, queue = AgentStore(engine), WorkQueue(engine)
    registry = Registry(engine, queue, port_range=(4100, 4109))
    for part in (store, queue, registry):
        part.create_schema()
    agent = store.enroll(store.create_token("prod"), "key-1", "pub", ("default", "gpu"))
    yield registry, store, agent.id
    engine.dispose()


def _beat(store: AgentStore, agent_id: str, **states: tuple[str, str | None, str | None]) -> None:
    store.record_heartbeat(agent_id, {"locations": [{"name": n, "state": s, "error": e, "container": c}
                                                    for n, (s, e, c) in states.items()], "runningContainers": 0})


def test_deploy_waits_for_each_location_on_a_new_code_server_and_reports_errors(world, tmp_path: Path) -> None:
    registry, store, agent_id = world
    (tmp_path / "dagster_cloud.yaml").write_text(FILE)
    _beat(store, agent_id, etl=("LOADED", None, "old-container"))  # an old version still serves etl
    beats = iter([
        {"etl": ("LOADED", None, "old-container"), "reports": ("LOADING", None, None)},  # not fresh yet
        {"etl": ("LOADED", None, "new-container"), "reports": ("ERROR", "ImportError: no module reports", None)},
    ])

    def sleep(_seconds: float) -> None:
        _beat(store, agent_id, **next(beats))

    changed: list[bool] = []
    result = deploy(registry, store, tmp_path / "dagster_cloud.yaml", "prod", wait_seconds=60,
                    on_change=lambda: changed.append(True), sleep=sleep, settle_seconds=0)
    assert changed == [True]
    assert [(o.name, o.change, o.state) for o in result.outcomes] == [("etl", "added", "LOADED"),
                                                                      ("reports", "added", "ERROR")]
    assert "ImportError" in (result.outcomes[1].error or "") and not result.ok
    again = deploy(registry, store, tmp_path / "dagster_cloud.yaml", "prod", wait_seconds=0, sleep=sleep,
                   settle_seconds=3600)
    assert [o.change for o in again.outcomes] == ["unchanged", "unchanged"]
    # reports' ERROR came before this deploy: not its verdict yet, so it is still waited on (here: timed out)
    assert [o.state for o in again.outcomes] == ["LOADED", "LOADING"]
    moved = deploy(registry, store, tmp_path / "dagster_cloud.yaml", "prod", wait_seconds=0, sleep=sleep,
                   images={"etl": IMAGE2})
    assert moved.outcomes[0].change == "updated" and registry.get("prod", "etl").spec.image == IMAGE2
    with pytest.raises(PolicyError, match="--image names nope"):
        deploy(registry, store, tmp_path / "dagster_cloud.yaml", "prod", images={"nope": IMAGE2})


def test_a_bad_file_changes_nothing_and_the_cli_exits_non_zero(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    registry, _, _ = world
    bad = FILE.replace("package_name: acme_etl", "python_file: etl.py")
    (tmp_path / "dagster_cloud.yaml").write_text(bad)
    monkeypatch.setenv("AIRLOCK_CP_DB", f"sqlite:///{tmp_path}/cp.db")
    for name in ("AIRLOCK_CP_WORKSPACE", "AIRLOCK_CP_WEBSERVER_URL", "AIRLOCK_CP_DEPLOYMENT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["deploy", str(tmp_path / "dagster_cloud.yaml"), "--deployment", "prod"]) == 2
    assert "python_file: cannot be honoured here" in capsys.readouterr().err
    assert registry.list("prod") == ()

    (tmp_path / "dagster_cloud.yaml").write_text(FILE)
    assert main(["deploy", str(tmp_path / "dagster_cloud.yaml"), "--deployment", "prod", "--wait", "1s"]) == 1
    out = capsys.readouterr()
    assert "etl: added, NO AGENT" in out.out or "etl: added, LOADING" in out.out
    assert "deploy failed: etl, reports not LOADED" in out.err
    assert main(["location", "list", "--json", "--deployment", "prod"]) == 0
    assert {x["name"]: x["state"] for x in json.loads(capsys.readouterr().out)} == {"etl": "NO AGENT",
                                                                                   "reports": "NO AGENT"}
