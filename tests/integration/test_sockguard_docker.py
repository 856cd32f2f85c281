"""sockguard in the real appliance, on real Docker: what a compromised agent asks for is refused with a
named rule and nothing is created or touched; the hardened spec still runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import harness

ATTEMPTS = (Path(__file__).parent / "sockguard_attempts.py").read_text()


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Appliance]:
    images = harness.images()
    app = harness.Appliance(harness.client(), harness.unique_id(), tmp_path_factory.mktemp("sg"), images["appliance"])
    app.write_locations(harness.locations_yaml(harness.location_entry("example", images["example-location"])))
    try:
        app.start()
        app.wait_for("example", "LOADED")
        yield app
    finally:
        app.remove()


def test_forbidden_requests_refused_by_named_rule_and_nothing_created(appliance: harness.Appliance) -> None:
    dc = appliance.docker
    run = appliance.appliance_id
    images = harness.images()
    victim = dc.containers.run(
        images["example-location"],
        ["sleep", "300"],
        detach=True,
        name=f"airlock-{run}-victim",
        labels={"airlock.test-run": run},
    )
    args = {
        "run": run,
        "image": images["example-location"],
        "foreign_image": images["appliance"],
        "network": f"airlock-{run}-example",
        "victim": victim.id,
    }
    _, out = appliance.exec("python3", "-c", ATTEMPTS, json.dumps(args), user="airlock-agent")
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert results, out
    by_name = {r["attempt"]: r for r in results}
    refused = [r for r in results if not r["attempt"].startswith("allowed:")]
    for r in refused:
        print(f"  {r['attempt']:32} {r['status']} {r.get('message', r.get('result'))[:110]}")
    assert len(refused) >= 20
    for r in refused:
        if r["attempt"] == "container-list-unfiltered":
            assert r["status"] == 200 and r["result"] == "[]", r  # listing is narrowed to airlock objects
            continue
        assert r["status"] in (403, 413), r
        assert "airlock sockguard refused" in r["message"], r
        if r["attempt"].startswith("create:"):
            assert f"refused {r['attempt'].split(':', 1)[1]}" in r["message"], r
    # Nothing was created by a refused request; the victim was neither stopped nor removed.
    created = dc.containers.list(all=True, filters={"name": f"airlock-{run}-attempt"})
    assert created == [], [c.name for c in created]
    assert not dc.volumes.list(filters={"name": "airlock-attempt"})
    assert not dc.volumes.list(filters={"name": f"airlock-{run}-evil"})
    assert not dc.networks.list(names=[f"airlock-{run}-open"])
    victim.reload()
    assert victim.status == "running"
    # The allowed twin: the hardened spec was created, ran (exit 0) and was removed.
    assert by_name["allowed:hardened-create"] == {
        "attempt": "allowed:hardened-create",
        "status": 200,
        "result": "exit 0",
    }, by_name["allowed:hardened-create"]
    assert by_name["allowed:artifacts-mount"]["result"] == "exit 0", by_name["allowed:artifacts-mount"]
    logs = appliance.logs()
    assert '"allow": false, "rule": "privileged"' in logs


def test_doctor_reports_enforcement(appliance: harness.Appliance) -> None:
    code, out = appliance.exec("airlock", "doctor")
    print(out)
    assert code == 0, out
    for line in (
        "[ok  ] seccomp filter active",
        "[ok  ] no-new-privileges",
        "[ok  ] all capabilities dropped",
        "[ok  ] read-only root filesystem",
        "[ok  ] host unreachable from the location network",
        "[ok  ] sockguard refuses an unhardened create",
        "[ok  ] egress proxy refuses unknown sources",
    ):
        assert line in out, line
    code, out = appliance.exec("airlock", "doctor", "--json")
    report = json.loads(out)
    assert report["ok"] is True and len(report["checks"]) >= 15
