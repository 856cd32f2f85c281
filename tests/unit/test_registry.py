"""The code-location registry, workspace.yaml rendering, the webserver reload and `airlock-cp`, on SQLite."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml

from appliance.policy import PolicyError, load_policy
from appliance.policy.loader import _location
from controlplane.cli import main
from controlplane.gateway.queue import WorkQueue
from controlplane.gateway.store import AgentStore
from controlplane.registry import Registry, RegistryError
from controlplane.workspace import (
    LocationLoad,
    WorkspaceReloadError,
    reload,
    render_workspace,
    write_workspace,
)
from protocol.fields import Fields
from protocol.work import WorkKind

REPO = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "a" * 64
IMAGE = "registry.example.com/team/etl@" + DIGEST
IMAGE2 = "registry.example.com/team/etl@sha256:" + "b" * 64


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    eng = sa.create_engine(f"sqlite:///{tmp_path}/cp.db")
    yield eng
    eng.dispose()


@pytest.fixture
def queue(engine: sa.Engine) -> WorkQueue:
    q = WorkQueue(engine)
    q.create_schema()
    return q


def make_registry(engine: sa.Engine, queue: WorkQueue, ports: tuple[int, int] = (4100, 4109)) -> Registry:
    registry = Registry(engine, queue, port_range=ports)
    registry.create_schema()
    return registry


@pytest.fixture
def reg(engine: sa.Engine, queue: WorkQueue) -> Registry:
    return make_registry(engine, queue)


def loc(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": IMAGE, "module": f"{name}.defs", **extra}


def drain(queue: WorkQueue, q: str, deployment: str = "prod") -> list[dict[str, Any]]:
    """Claim every pending item on one queue and return their payloads, oldest first."""
    items = queue.claim(deployment, [q], "agent-test", limit=100)
    assert all(item.kind == WorkKind.RECONCILE_LOCATIONS for item in items)
    return [item.payload for item in items]


def names(payload: dict[str, Any]) -> list[str]:
    return [entry["name"] for entry in payload["locations"]]


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# -- add / update / remove / list ---------------------------------------------------------------------
def test_add_update_remove_list(reg: Registry) -> None:
    a = reg.add("prod", loc("alpha", env={"MODE": "etl"}, resources={"memory": "512m", "cpus": 1}))
    assert (a.version, a.spec.image, a.spec.module, a.spec.queue) == (1, IMAGE, "alpha.defs", "default")
    assert dict(a.spec.resources) == {"memory": 512 * 1024**2, "cpus": 1.0}
    reg.add("prod", loc("beta", queue="gpu"))
    reg.add("staging", loc("alpha"))
    assert [r.spec.name for r in reg.list("prod")] == ["alpha", "beta"]
    assert [(r.deployment, r.spec.name) for r in reg.list()] == [("prod", "alpha"), ("prod", "beta"),
                                                                 ("staging", "alpha")]

    b = reg.update("prod", "alpha", {"package": "alpha_pkg", "resources": {"pids": 128}, "image": IMAGE2})
    assert (b.version, b.spec.module, b.spec.package, b.spec.image) == (2, None, "alpha_pkg", IMAGE2)
    assert dict(b.spec.resources) == {"memory": 512 * 1024**2, "cpus": 1.0, "pids": 128}  # merged per key
    assert b.created_at == a.created_at and b.updated_at >= a.updated_at
    assert reg.update("prod", "alpha", {"image": IMAGE2}).version == 2  # no change, no new version
    assert dict(reg.update("prod", "alpha", {"resources": {"cpus": None}}).spec.resources) == {
        "memory": 512 * 1024**2, "pids": 128}
    assert reg.get("prod", "alpha") == reg.list("prod")[0]

    reg.remove("prod", "alpha")
    assert reg.get("prod", "alpha") is None
    assert [r.spec.name for r in reg.list("prod")] == ["beta"]
    assert reg.get("staging", "alpha") is not None


def test_unknown_location_rename_and_bad_update_are_refused(reg: Registry) -> None:
    reg.add("prod", loc("alpha"))
    for call in (lambda: reg.update("prod", "ghost", {"image": IMAGE2}), lambda: reg.remove("prod", "ghost")):
        with pytest.raises(RegistryError, match="no location 'ghost'") as err:
            call()
        assert err.value.field_path == "name"
    with pytest.raises(RegistryError, match="cannot be renamed"):
        reg.update("prod", "alpha", {"name": "omega"})
    with pytest.raises(PolicyError) as err:
        reg.update("prod", "alpha", {"image": "etl:latest"})
    assert err.value.field_path == "image"
    assert reg.get("prod", "alpha").version == 1  # type: ignore[union-attr]


def test_tag_image_is_refused_with_a_digest_hint(reg: Registry) -> None:
    with pytest.raises(PolicyError) as err:
        reg.add("prod", loc("alpha", image="registry.example.com/team/etl:1.4"))
    assert err.value.field_path == "image"
    assert "not pinned by digest" in str(err.value)
    assert "registry.example.com/team/etl@sha256:<digest>" in str(err.value)
    assert "RepoDigests" in str(err.value)
    for bad in ("etl@sha256:abc", "sha256:" + "A" * 64, "etl"):
        with pytest.raises(PolicyError, match="image"):
            reg.add("prod", loc("alpha", image=bad))
    assert reg.add("prod", loc("alpha", image=DIGEST)).spec.image == DIGEST  # a bare image id is pinned too
    assert reg.list() == tuple(reg.list("prod"))


@pytest.mark.parametrize(("entry", "field"), [
    (loc("alpha", package="alpha"), "module"),
    ({"name": "alpha", "image": IMAGE}, "module"),
    (loc("Alpha!"), "name"),
    (loc("alpha", env={"AIRLOCK_TOKEN": "x"}), "env.AIRLOCK_TOKEN"),
    (loc("alpha", env={"HTTP_PROXY": "x"}), "env.HTTP_PROXY"),
    (loc("alpha", resources={"memory": "lots"}), "resources.memory"),
    (loc("alpha", resources={"pids": 2}), "resources.pids"),
    (loc("alpha", resources={"swap": 1}), "resources.swap"),
    (loc("alpha", egress={"allow": ["example.com"]}), "egress.allow[0]"),
    (loc("alpha", egress={"allow_cidrs": ["10.0.0.0/33"]}), "egress.allow_cidrs[0]"),
    (loc("alpha", runtime="runsc"), "runtime"),
])
def test_bad_specs_name_the_field(reg: Registry, queue: WorkQueue, entry: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError) as err:
        reg.add("prod", entry)
    assert err.value.field_path == field
    assert reg.list() == () and queue.pending_count("prod", "default") == 0


def test_duplicate_name_is_refused(reg: Registry, queue: WorkQueue) -> None:
    reg.add("prod", loc("alpha"))
    with pytest.raises(RegistryError, match="already exists in deployment 'prod'") as err:
        reg.add("prod", loc("alpha", image=IMAGE2))
    assert err.value.field_path == "name"
    assert reg.get("prod", "alpha").spec.image == IMAGE  # type: ignore[union-attr]
    assert queue.pending_count("prod", "default") == 1
    assert reg.add("staging", loc("alpha")).deployment == "staging"  # names are per deployment


# -- relay ports ------------------------------------------------------------------------------------------
def test_relay_ports_come_from_the_range_and_stay_put(engine: sa.Engine, queue: WorkQueue) -> None:
    reg = make_registry(engine, queue, ports=(5000, 5002))
    ports = {n: reg.add("prod", loc(n)).relay_port for n in ("a", "b")}
    assert ports == {"a": 5000, "b": 5001}
    assert reg.add("staging", loc("a")).relay_port == 5002  # one host: unique across deployments
    assert reg.update("prod", "a", {"image": IMAGE2, "queue": "other"}).relay_port == 5000
    with pytest.raises(RegistryError, match="no free relay port in 5000-5002") as err:
        reg.add("prod", loc("c"))
    assert err.value.field_path == "relay_port"
    assert reg.get("prod", "c") is None

    reg.remove("prod", "a")
    assert reg.add("prod", loc("c")).relay_port == 5000  # freed by the removal, not before
    held = [r.relay_port for r in reg.list()]
    assert sorted(held) == [5000, 5001, 5002] and len(set(held)) == 3


def test_a_narrower_range_keeps_existing_ports(engine: sa.Engine, queue: WorkQueue) -> None:
    make_registry(engine, queue, ports=(5000, 5009)).add("prod", loc("a"))
    narrow = make_registry(engine, queue, ports=(6000, 6000))
    assert narrow.add("prod", loc("b")).relay_port == 6000
    assert narrow.get("prod", "a").relay_port == 5000  # type: ignore[union-attr]


def test_port_range_is_validated(engine: sa.Engine, queue: WorkQueue) -> None:
    with pytest.raises(ValueError, match="relay port range"):
        Registry(engine, queue, port_range=(5000, 4000))


# -- reconcile work items ---------------------------------------------------------------------------------
def test_each_change_sends_the_full_desired_set_to_its_queue(reg: Registry, queue: WorkQueue) -> None:
    reg.add("prod", loc("alpha"))
    reg.add("prod", loc("beta"))
    reg.add("prod", loc("gamma", queue="gpu"))
    assert queue.pending_count("prod", "default") == 2 and queue.pending_count("prod", "gpu") == 1
    default = drain(queue, "default")
    assert [names(p) for p in default] == [["alpha"], ["alpha", "beta"]]
    assert default[-1]["deployment"] == "prod" and default[-1]["queue"] == "default"
    assert default[-1]["locations"][0] == {
        "name": "alpha", "image": IMAGE, "module": "alpha.defs", "env": {}, "resources": {},
        "egress": {"allow": [], "allow_cidrs": []}}
    assert [names(p) for p in drain(queue, "gpu")] == [["gamma"]]

    reg.update("prod", "alpha", {"queue": "gpu"})  # moving queues: the old one drops it, the new one gets it
    assert [names(p) for p in drain(queue, "default")] == [["beta"]]
    assert [names(p) for p in drain(queue, "gpu")] == [["alpha", "gamma"]]

    reg.update("prod", "beta", {"image": IMAGE})  # no change: nothing sent
    assert queue.pending_count("prod", "default") == 0

    reg.remove("prod", "beta")
    [last] = drain(queue, "default")
    assert (last["queue"], last["locations"]) == ("default", [])  # the empty set: stop everything
    assert isinstance(last["as_of"], float)
    assert queue.pending_count("staging", "default") == 0

    ids = reg.publish("prod", "gpu", "gpu", "default")  # re-send on demand, once per queue
    assert len(ids) == 2 and queue.pending_count("prod", "gpu") == 1


def test_payload_entries_are_what_the_appliance_loader_accepts(reg: Registry, queue: WorkQueue) -> None:
    policy = load_policy(REPO / "policy")
    reg.add("prod", loc("alpha", env={"MODE": "etl"}, resources={"memory": "256m", "pids": 64},
                        egress={"allow": ["API.example.com:443", "*.s3.amazonaws.com:*"],
                                "allow_cidrs": ["10.1.2.3/16"]}))
    reg.add("prod", {"name": "beta", "image": IMAGE, "package": "beta_pkg"})
    payload = drain(queue, "default")[-1]
    loaded = [_location(Fields("payload", entry, f"locations[{i}]"), policy)
              for i, entry in enumerate(payload["locations"])]
    alpha, beta = loaded
    assert alpha.limits.memory == 256 * 1024**2 and alpha.limits.pids == 64
    assert alpha.limits.cpus == policy.hardening.limits.cpus  # absent: the appliance's default
    assert [str(h) for h in alpha.egress.hosts] == ["api.example.com:443", "*.s3.amazonaws.com:*"]
    assert [str(c) for c in alpha.egress.cidrs] == ["10.1.0.0/16"]
    assert beta.package == "beta_pkg" and beta.module is None


# -- apply ------------------------------------------------------------------------------------------------
def test_apply_converges(reg: Registry, queue: WorkQueue, tmp_path: Path) -> None:
    reg.add("prod", loc("old"))
    reg.add("prod", loc("keep"))
    reg.add("prod", loc("change", queue="gpu"))
    drain(queue, "default")
    drain(queue, "gpu")
    ports = {r.spec.name: r.relay_port for r in reg.list("prod")}
    path = write(tmp_path / "locations.yaml", {"version": 1, "locations": [
        loc("keep"), loc("change", image=IMAGE2, queue="gpu"), loc("new", egress={"allow": ["pypi.org:443"]})]})

    result = reg.apply(path, "prod")
    assert (result.added, result.updated, result.removed, result.unchanged) == (
        ("new",), ("change",), ("old",), ("keep",))
    now = {r.spec.name: r for r in reg.list("prod")}
    assert sorted(now) == ["change", "keep", "new"]
    assert now["keep"].version == 1 and now["change"].version == 2 and now["change"].spec.image == IMAGE2
    assert now["keep"].relay_port == ports["keep"] and now["change"].relay_port == ports["change"]
    assert now["new"].relay_port not in (ports["keep"], ports["change"])
    assert [names(p) for p in drain(queue, "default")] == [["keep", "new"]]
    assert [names(p) for p in drain(queue, "gpu")] == [["change"]]

    again = reg.apply(path, "prod")  # already converged: nothing changes, nothing is sent
    assert again.unchanged == ("keep", "change", "new") and not (again.added or again.updated or again.removed)
    assert queue.pending_count("prod", "default") == 0 and queue.pending_count("prod", "gpu") == 0

    empty = reg.apply(write(tmp_path / "empty.yaml", {"version": 1, "locations": []}), "prod")
    assert empty.removed == ("change", "keep", "new") and reg.list("prod") == ()
    assert [names(p) for p in drain(queue, "gpu")] == [[]]


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda e: e.update(colour="blue"), "locations[1].colour"),
    (lambda e: e.update(image="team/etl:latest"), "locations[1].image"),
    (lambda e: e.update(package="etl"), "locations[1].module"),
    (lambda e: e.update(egress={"allow_cidrs": ["10.0.0.0/8", "300.1.1.1/8"]}), "locations[1].egress.allow_cidrs[1]"),
])
def test_a_bad_file_changes_nothing(reg: Registry, queue: WorkQueue, tmp_path: Path, mutate: Any,
                                    field: str) -> None:
    reg.add("prod", loc("old"))
    drain(queue, "default")
    before = reg.list()
    bad = loc("broken")
    mutate(bad)
    path = write(tmp_path / "locations.yaml", {"version": 1, "locations": [loc("fine"), bad]})
    with pytest.raises(PolicyError) as err:
        reg.apply(path, "prod")
    assert err.value.file == str(path) and err.value.field_path == field
    assert reg.list() == before
    assert queue.pending_count("prod", "default") == 0


def test_apply_file_level_errors(reg: Registry, tmp_path: Path) -> None:
    cases = {"version": ({"locations": []}, "version"),
             "missing": ({"version": 1}, "locations"),
             "dupe": ({"version": 1, "locations": [loc("a"), loc("a")]}, "locations[1].name")}
    for name, (data, field) in cases.items():
        with pytest.raises(PolicyError) as err:
            reg.apply(write(tmp_path / f"{name}.yaml", data), "prod")
        assert err.value.field_path == field
    with pytest.raises(PolicyError, match="not valid YAML"):
        (tmp_path / "torn.yaml").write_text("version: 1\nlocations: [\n")
        reg.apply(tmp_path / "torn.yaml", "prod")


def test_apply_running_out_of_ports_changes_nothing(engine: sa.Engine, queue: WorkQueue, tmp_path: Path) -> None:
    reg = make_registry(engine, queue, ports=(5000, 5001))
    reg.add("prod", loc("a"))
    path = write(tmp_path / "l.yaml", {"version": 1, "locations": [loc("a", image=IMAGE2), loc("b"), loc("c")]})
    with pytest.raises(RegistryError, match="no free relay port"):
        reg.apply(path, "prod")
    assert [(r.spec.name, r.spec.image) for r in reg.list()] == [("a", IMAGE)]


# -- workspace.yaml and reload ----------------------------------------------------------------------------
def test_workspace_yaml_round_trips(reg: Registry, tmp_path: Path) -> None:
    reg.add("prod", loc("beta"))
    reg.add("prod", loc("alpha", queue="gpu"))
    reg.add("staging", loc("other"))
    text = render_workspace(reg.list("prod"), "relay.internal")
    assert yaml.safe_load(text) == {"load_from": [
        {"grpc_server": {"host": "relay.internal", "port": 4101, "location_name": "alpha"}},
        {"grpc_server": {"host": "relay.internal", "port": 4100, "location_name": "beta"}},
    ]}
    assert yaml.safe_load(render_workspace(())) == {"load_from": []}

    target = tmp_path / "dagster" / "workspace.yaml"
    assert write_workspace(target, text) is True
    assert write_workspace(target, text) is False  # unchanged: not rewritten
    assert target.read_text() == text and oct(target.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in target.parent.iterdir()] == ["workspace.yaml"]  # no temp file left behind


def graphql_transport(status: int, body: Any, seen: list[dict[str, Any]]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append({"url": str(request.url), **json.loads(request.content)})
        return httpx.Response(status, json=body)
    return httpx.MockTransport(handler)


def test_reload_sends_the_mutation_and_reads_location_errors() -> None:
    seen: list[dict[str, Any]] = []
    body = {"data": {"reloadWorkspace": {"__typename": "Workspace", "locationEntries": [
        {"name": "alpha", "loadStatus": "LOADED", "locationOrLoadError": {"__typename": "RepositoryLocation"}},
        {"name": "beta", "loadStatus": "LOADED",
         "locationOrLoadError": {"__typename": "PythonError", "message": "ModuleNotFoundError: beta"}},
    ]}}}
    loads = reload("http://dagster:3000/prefix/", transport=graphql_transport(200, body, seen))
    assert seen[0]["url"] == "http://dagster:3000/prefix/graphql"
    assert "reloadWorkspace" in seen[0]["query"] and "locationEntries" in seen[0]["query"]
    assert [(x.name, x.status, x.error) for x in loads] == [
        ("alpha", "LOADED", None), ("beta", "LOADED", "ModuleNotFoundError: beta")]
    assert [x.state for x in loads] == ["LOADED", "ERROR"]  # Dagster's LOADED includes a failed load


def test_cli_reload_reports_a_failed_load_as_error(cli: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    loads = (LocationLoad("alpha", "LOADED", None), LocationLoad("beta", "LOADED", "DagsterUserCodeUnreachableError"))
    monkeypatch.setattr("controlplane.cli.reload", lambda url: loads)
    assert main(["--webserver-url", "http://dagster:3000", "workspace", "render", "--deployment", "prod",
                 "--out", str(tmp_path / "w.yaml"), "--reload"]) == 0
    out = capsys.readouterr().out
    assert "webserver: alpha LOADED\n" in out
    assert "webserver: beta ERROR (airlock reloads it when its appliance reports a change): " \
           "DagsterUserCodeUnreachableError" in out and "beta LOADED" not in out


@pytest.mark.parametrize(("status", "body", "match"), [
    (200, {"data": {"reloadWorkspace": {"__typename": "UnauthorizedError", "message": "read-only"}}}, "read-only"),
    (200, {"data": {"reloadWorkspace": {"__typename": "PythonError", "message": "boom"}}}, "PythonError.*boom"),
    (400, {"errors": [{"message": "Cannot query field 'reloadWorkspace'"}]}, "HTTP 400.*Cannot query field"),
    (502, ["not", "graphql"], "HTTP 502"),
])
def test_reload_failures_are_one_error(status: int, body: Any, match: str) -> None:
    with pytest.raises(WorkspaceReloadError, match=match):
        reload("http://dagster:3000", transport=graphql_transport(status, body, []))


def test_reload_unreachable_and_not_json() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)
    with pytest.raises(WorkspaceReloadError, match="cannot reach http://dagster:3000/graphql"):
        reload("http://dagster:3000", transport=httpx.MockTransport(refuse))
    html = httpx.MockTransport(lambda request: httpx.Response(404, text="<html>nope</html>"))
    with pytest.raises(WorkspaceReloadError, match="HTTP 404"):
        reload("http://dagster:3000", transport=html)


# -- airlock-cp -------------------------------------------------------------------------------------------
@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path}/state/cp.db"
    monkeypatch.setenv("AIRLOCK_CP_DB", url)
    for name in ("AIRLOCK_CP_WORKSPACE", "AIRLOCK_CP_WEBSERVER_URL", "AIRLOCK_CP_RELAY_PORTS",
                 "AIRLOCK_CP_DEPLOYMENT"):
        monkeypatch.delenv(name, raising=False)
    return url


def test_cli_token_create_prints_a_token_the_store_accepts(cli: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent-token", "create", "--deployment", "prod", "--ttl", "1h"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("airlock-enroll-") and "\n" not in token and token not in out.err
    engine = sa.create_engine(cli)
    agent = AgentStore(engine).enroll(token, "key-1", "pub", ("default",))
    engine.dispose()
    assert agent.deployment == "prod"

    assert main(["agent", "list"]) == 0
    listed = capsys.readouterr().out
    assert agent.id in listed and "key-1 (current)" in listed and "default" in listed
    assert main(["agent", "revoke", agent.id]) == 0
    assert main(["agent", "revoke", "agent-nope"]) == 2
    assert "no agent 'agent-nope'" in capsys.readouterr().err
    assert main(["audit", "--limit", "5"]) == 0
    assert "agent revoke" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["agent-token", "create", "--ttl", "soon"])
    assert exit_.value.code == 2


def test_cli_locations_end_to_end(cli: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--relay-ports", "7000-7009", "location", "add", "alpha", "--image", IMAGE, "--module", "alpha.defs",
                 "--env", "MODE=etl", "--env", "URL=a=b", "--memory", "512m", "--cpus", "1", "--pids", "256",
                 "--egress", "pypi.org:443", "--egress-cidr", "10.0.0.0/8"]) == 0
    assert "relay port 7000" in capsys.readouterr().out
    assert main(["location", "add", "beta", "--image", IMAGE, "--package", "beta", "--queue", "gpu"]) == 0
    assert main(["location", "add", "gamma", "--image", "team/etl:latest", "--module", "m"]) == 2
    assert "image" in (err := capsys.readouterr().err) and "@sha256:<digest>" in err
    assert main(["location", "add", "alpha", "--image", IMAGE, "--module", "m"]) == 2
    assert "already exists" in capsys.readouterr().err

    assert main(["location", "update", "alpha", "--cpus", "2"]) == 0
    assert "updated alpha (version 2)" in capsys.readouterr().out
    assert main(["location", "list", "--json"]) == 0
    listed = {x["name"]: x for x in json.loads(capsys.readouterr().out)}
    assert listed["alpha"]["env"] == {"MODE": "etl", "URL": "a=b"} and listed["alpha"]["relay_port"] == 7000
    assert listed["alpha"]["resources"] == {"cpus": 2.0, "memory": 512 * 1024**2, "pids": 256}
    assert listed["alpha"]["egress"] == {"allow": ["pypi.org:443"], "allow_cidrs": ["10.0.0.0/8"]}
    assert listed["beta"]["queue"] == "gpu" and listed["beta"]["package"] == "beta"
    assert main(["location", "list"]) == 0
    assert "module:alpha.defs" in capsys.readouterr().out

    assert main(["location", "remove", "beta"]) == 0
    assert main(["location", "remove", "beta"]) == 2
    assert "no location 'beta'" in capsys.readouterr().err
    assert main(["workspace", "render"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["load_from"] == [
        {"grpc_server": {"host": "127.0.0.1", "port": 7000, "location_name": "alpha"}}]


def test_cli_apply_and_workspace_follow_changes(cli: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    workspace = tmp_path / "dagster" / "workspace.yaml"
    good = write(tmp_path / "locations.yaml", {"version": 1, "locations": [loc("alpha"), loc("beta")]})
    assert main(["--workspace", str(workspace), "apply", str(good), "--deployment", "prod"]) == 0
    out = capsys.readouterr().out
    assert "added: alpha, beta" in out and "removed: -" in out
    assert [x["grpc_server"]["location_name"] for x in yaml.safe_load(workspace.read_text())["load_from"]] == [
        "alpha", "beta"]

    bad = write(tmp_path / "bad.yaml", {"version": 1, "locations": [loc("alpha", egress={"allow_cidrs": ["x"]})]})
    assert main(["apply", str(bad), "--deployment", "prod"]) == 2
    assert "locations[0].egress.allow_cidrs[0]" in capsys.readouterr().err
    assert main(["location", "list", "--json", "--deployment", "prod"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2

    assert main(["workspace", "render", "--deployment", "prod", "--out", str(tmp_path / "w.yaml"), "--reload"]) == 2
    assert "--reload needs --webserver-url" in capsys.readouterr().err
    def unreachable(url: str) -> None:
        raise WorkspaceReloadError(f"cannot reach {url}/graphql: connection refused")
    monkeypatch.setattr("controlplane.cli.reload", unreachable)
    assert main(["--webserver-url", "http://dagster:3000", "workspace", "render", "--deployment", "prod",
                 "--out", str(tmp_path / "w.yaml"), "--reload"]) == 1
    assert "did not reload: cannot reach http://dagster:3000/graphql" in capsys.readouterr().err
    assert (tmp_path / "w.yaml").read_text() == workspace.read_text()  # the file was still written

    reloaded: list[str] = []
    monkeypatch.setattr("controlplane.cli.reload", lambda url: reloaded.append(url) or ())
    assert main(["--workspace", str(workspace), "--webserver-url", "http://dagster:3000", "location", "remove",
                 "beta", "--deployment", "prod"]) == 0
    assert reloaded == ["http://dagster:3000"]
    assert len(yaml.safe_load(workspace.read_text())["load_from"]) == 1
