"""The control plane and the appliance as separate containers: unmodified Dagster webserver and daemon
see user code that runs only in the appliance's hardened code server, through the gRPC relay and the
signed long-poll agent API. The appliance publishes nothing; every connection goes out from it."""

from __future__ import annotations

import json
import re

from tests.integration.stack import ControlPlane, wait

WORKSPACE = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message stack }
    ... on RepositoryLocation { repositories { name jobs { name } assetNodes { assetKey { path } }
      schedules { name } sensors { name } } } } } } } }"""
SENSOR = {"repositoryLocationName": "example", "repositoryName": "__repository__", "sensorName": "new_numbers_sensor"}


def test_webserver_shows_the_location_loaded_with_its_definitions(stack) -> None:
    cp, appliance = stack
    appliance.wait_for("example", "LOADED", timeout=240)

    def loaded() -> dict | None:
        entry = cp.graphql(WORKSPACE)["workspaceOrError"]["locationEntries"][0]
        ok = entry["loadStatus"] == "LOADED" and entry["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        return entry if ok else None

    entry = wait("example LOADED in the Dagster UI", loaded, 180)
    repo = entry["locationOrLoadError"]["repositories"][0]
    assert {"numbers_job", "assets_job"} <= {j["name"] for j in repo["jobs"]}
    assert {tuple(a["assetKey"]["path"]) for a in repo["assetNodes"]} == {("raw_numbers",), ("squares",), ("summary",)}
    assert sorted(s["name"] for s in repo["schedules"]) == ["every_five_minutes", "every_minute"]
    assert sorted(s["name"] for s in repo["sensors"]) == ["asset_watch_sensor", "new_numbers_sensor"]


ALEMBIC_ROWS = """import glob, sqlite3
for path in sorted(glob.glob("/var/lib/airlock-cp/dagster/**/*.db", recursive=True)):
    rows = sqlite3.connect(path).execute("select version_num from alembic_version").fetchall()
    print(path, ",".join(r[0] for r in rows))"""


def test_the_locations_plain_calls_take_the_fast_path_tunnel_the_agent_dialled(stack) -> None:
    """In the shipped images the relay's compiled data path is on: the agent's child dials the edge (outward, like
    every connection of the appliance), and the webserver's plain calls (ListRepositories, ExternalRepository,
    Ping...) go down that tunnel while GetServerId and the scrubbed ones keep the Python road (docs/FASTPATH.md)."""
    cp, appliance = stack
    appliance.wait_for("example", "LOADED", timeout=240)
    wait("example LOADED in the Dagster UI", lambda: cp.graphql(WORKSPACE)["workspaceOrError"]["locationEntries"][0]
         ["loadStatus"] == "LOADED", 180)
    assert "fast path tunnel up" in appliance.logs()

    def tunnelled() -> list[str]:
        cp.graphql(WORKSPACE)  # the webserver asks the code server again (through the relay)
        log = cp.container.logs().decode(errors="replace")
        counts = re.findall(r"relay fast path, last \d+ s: (\d+) call\(s\) through agents' tunnels", log)
        return [n for n in counts if int(n) > 0]

    assert wait("a report of calls through the tunnel", tunnelled, 60)
    assert "fast path tunnel up for channel" in cp.container.logs().decode(errors="replace")


def test_dagsters_storage_is_created_once_before_the_programs_that_share_it_start(stack) -> None:
    """Started together on a new SQLite instance, the webserver, the daemon and the gateway could stamp two alembic
    revisions into one database (then every storage call fails): the entrypoint migrates first, alone."""
    cp, appliance = stack
    appliance.wait_for("example", "LOADED", timeout=240)
    log = cp.container.logs().decode(errors="replace")
    ready, spawned = log.find("airlock-cp: Dagster's storage is ready"), log.find("spawned: 'daemon'")
    assert 0 <= ready < spawned, log[:3000]
    result = cp.container.exec_run(["/opt/airlock-cp/venv/bin/python", "-c", ALEMBIC_ROWS])
    assert result.exit_code == 0, result.output.decode()
    stamped = dict(line.split(" ", 1) for line in result.output.decode().splitlines())
    assert {p.rsplit("/", 1)[1] for p in stamped} >= {"runs.db", "schedules.db", "index.db"}, stamped
    assert len(set(stamped.values())) == 1 and "," not in next(iter(stamped.values())), stamped  # one head, same


def test_separate_networks_and_nothing_reaches_the_appliance(stack) -> None:
    cp, appliance = stack
    appliance.wait_for("example", "LOADED", timeout=240)  # the appliance reached the control plane
    appliance.container.reload()
    assert not any(appliance.container.attrs["NetworkSettings"]["Ports"].values())
    assert appliance.container.attrs["HostConfig"]["PortBindings"] in ({}, None)
    networks = appliance.container.attrs["NetworkSettings"]["Networks"]
    assert cp.network not in networks
    appliance_ip = next(n["IPAddress"] for name, n in networks.items() if name.endswith("-user"))
    probe = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)"
             "\n print('reached')\nexcept OSError as e: print('blocked', e)")
    for port in ("3128", "22", "8443"):
        result = cp.container.exec_run(["python3", "-c", probe, appliance_ip, port])
        assert result.output.decode().startswith("blocked"), (port, result.output)


def _entry(cp: ControlPlane) -> dict:
    return cp.graphql(WORKSPACE)["workspaceOrError"]["locationEntries"][0]


def _ui_loaded(cp: ControlPlane) -> dict | None:
    entry = _entry(cp)
    return entry if entry["locationOrLoadError"]["__typename"] == "RepositoryLocation" else None


def test_import_error_shows_traceback_then_update_recovers_without_operator(stack) -> None:
    cp, appliance = stack
    cp.cli("location", "update", "example", "--module", "example_location.no_such_module")

    def ui_error() -> dict | None:
        entry = _entry(cp)
        error = entry["locationOrLoadError"]
        failed = error and error["__typename"] == "PythonError" and "no_such_module" in error["message"]
        return entry if failed else None

    entry = wait("the import error in the Dagster UI", ui_error, 240)
    assert "DagsterImportError" in entry["locationOrLoadError"]["message"]
    assert entry["locationOrLoadError"]["stack"], "the UI gets the traceback, not just a message"
    assert "no_such_module" in appliance.wait_for("example", "ERROR", timeout=120)["error"]
    cp.cli("location", "update", "example", "--module", "example_location.definitions")
    wait("example LOADED again in the Dagster UI", lambda: _ui_loaded(cp), 240)


def test_killed_code_server_comes_back_by_itself(stack) -> None:
    cp, appliance = stack
    first = appliance.wait_for("example", "LOADED", timeout=240)
    appliance.docker.containers.get(first["container_id"]).kill()
    appliance.wait_for("example", "LOADED", timeout=240, not_container=first["container_id"])
    wait("example LOADED in the Dagster UI after the kill", lambda: _ui_loaded(cp), 180)


def test_agent_restart_adopts_and_loses_no_queued_work(stack) -> None:
    cp, appliance = stack
    before = appliance.wait_for("example", "LOADED", timeout=240)
    code, out = appliance.exec("supervisorctl", "-c", "/etc/airlock/supervisord.conf", "signal", "KILL", "agent")
    assert code == 0, out
    # Work queued while the agent is down (the webserver's reload relays ListRepositories) is answered
    # once supervisord has restarted it.
    reload = """mutation { reloadWorkspace { __typename ... on Workspace { locationEntries { name
      locationOrLoadError { __typename } } } } }"""
    result = cp.graphql(reload)["reloadWorkspace"]["locationEntries"][0]["locationOrLoadError"]
    assert result["__typename"] == "RepositoryLocation", result
    after = appliance.wait_for("example", "LOADED", timeout=120)
    assert after["container_id"] == before["container_id"]  # adopted, not redeployed
    assert appliance.logs().count("adopted code server") >= 1


def test_daemon_evaluates_the_sensor_through_the_relay_with_a_cursor(stack) -> None:
    cp, appliance = stack
    appliance.wait_for("example", "LOADED", timeout=240)
    start = """mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename
      ... on Sensor { sensorState { id status } } ... on PythonError { message } } }"""
    started = wait("sensor started", lambda: (r := cp.graphql(start, {"s": SENSOR})["startSensor"])["__typename"]
                   == "Sensor" and r, 120)
    ticks_query = """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { __typename
      ... on Sensor { sensorState { status ticks(limit: 10) { status cursor runIds error { message } } } } } }"""

    def two_ticks() -> list | None:
        ticks = cp.graphql(ticks_query, {"s": SENSOR})["sensorOrError"]["sensorState"]["ticks"]
        cursors = [t["cursor"] for t in ticks if t["status"] == "SUCCESS" and t["cursor"]]
        return ticks if len(set(cursors)) >= 2 else None

    try:
        ticks = wait("two successful sensor ticks", two_ticks, 240)
    finally:  # each tick requests a run: stop it so the other tests do not share the appliance with them
        cp.graphql("""mutation($id: String!) { stopSensor(id: $id) { __typename } }""",
                   {"id": started["sensorState"]["id"]})
    cursors = [int(t["cursor"]) for t in ticks if t["status"] == "SUCCESS" and t["cursor"]]
    assert cursors == sorted(cursors, reverse=True) and cursors[0] > cursors[-1], ticks  # newest first, advancing
    # The runs the sensor requested are launched in the appliance like any other.
    run_id = next(t["runIds"][0] for t in ticks if t["runIds"])
    run_status = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""
    wait(f"sensor run {run_id} SUCCESS",
         lambda: cp.graphql(run_status, {"id": run_id})["runOrError"]["status"] == "SUCCESS", 240)
    print(json.dumps(ticks[:3]))
