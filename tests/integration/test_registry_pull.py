"""Pulling a code-location image from a registry the operator listed: Debian's docker-registry on loopback, with a
login, started here. Pulled by digest, through sockguard, which adds the login (the agent never holds it).

Refused, each with its reason in `airlock status`: the same image by tag, and the same digest from a registry the
operator did not list. Nothing leaves this machine: the registry listens on 127.0.0.1, where dockerd pulls from.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import docker.errors
import httpx
import pytest

from tests import harness

USER, PASSWORD = "airlock-ci", "pull-only-" + harness.unique_id()
REPO = "airlock-test/pulled"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """docker-registry on 127.0.0.1:<port> with an htpasswd (bcrypt) login; yields host:port."""
    if shutil.which("docker-registry") is None or shutil.which("htpasswd") is None:
        pytest.fail("docker-registry and htpasswd are not installed: run `make setup` (scripts/setup-host.sh)")
    root, port = tmp_path_factory.mktemp("registry"), _free_port()
    htpasswd = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True)
    (root / "htpasswd").write_text(htpasswd.stdout)
    (root / "config.yml").write_text(
        f"version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\nauth: {{htpasswd: {{realm: airlock-test, path: {root / 'htpasswd'}}}}}\n")
    process = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    host = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://{host}/v2/", timeout=2).status_code == 401:  # up, and asking for a login
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stderr and process.stderr.read()
            time.sleep(0.2)
        yield host
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def pushed(registry: str) -> Iterator[str]:
    """An image of this run only, pushed to the registry and then deleted from the engine; its repo@digest."""
    images, dc = harness.images(), harness.client()
    run = harness.unique_id()
    context = Path(harness.ROOT / ".cache" / f"pull-{run}")
    context.mkdir(parents=True)
    (context / "Dockerfile").write_text(f"FROM {images['example-location']}\nLABEL airlock.test-run={run}\n")
    image, _ = dc.images.build(path=str(context), tag=f"{registry}/{REPO}:1", rm=True)
    shutil.rmtree(context)
    auth = {"username": USER, "password": PASSWORD}
    for line in dc.images.push(f"{registry}/{REPO}", tag="1", auth_config=auth, stream=True, decode=True):
        assert "error" not in line, line
    digest = next(d for d in dc.images.get(image.id).attrs["RepoDigests"] if d.startswith(registry))
    dc.images.remove(image.id, force=True)  # the appliance must pull it
    with pytest.raises(docker.errors.ImageNotFound):
        dc.images.get(digest)
    try:
        yield digest
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            dc.images.remove(digest, force=True)


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory, registry: str) -> Iterator[harness.Appliance]:
    app = harness.Appliance(harness.client(), harness.unique_id(), tmp_path_factory.mktemp("pull"),
                            harness.images()["appliance"])
    app.write_locations("version: 1\nlocations: []\n")
    try:
        app.start()
        code, out = app.exec("sh", "-c", f"printf '%s\\n' '{PASSWORD}' | airlock images registry add {registry} "
                                         f"--username {USER} && airlock images allow '{registry}/airlock-test/*'")
        assert code == 0, out
        yield app
    finally:
        app.remove()


def test_the_registry_needs_the_login_that_only_sockguard_holds(registry: str, pushed: str,
                                                                appliance: harness.Appliance) -> None:
    repository, _, digest = pushed.partition("@")
    with pytest.raises(docker.errors.APIError, match=r"no basic auth credentials|unauthorized"):
        harness.client().images.pull(repository, tag=digest)  # without the login: refused by the registry
    name = f"registry-{registry.replace(':', '_')}.json"
    code, out = appliance.exec("cat", f"/etc/airlock/operator/{name}", user="airlock-agent")
    assert code != 0 and "Permission denied" in out  # the agent cannot read it
    code, out = appliance.exec("airlock", "images", "list")
    assert code == 0 and f"{registry} (login)" in out and PASSWORD not in out


def test_a_location_named_by_digest_is_pulled_and_loads_tag_and_unlisted_registry_refused(
        registry: str, pushed: str, appliance: harness.Appliance) -> None:
    repository, _, digest = pushed.partition("@")
    other = f"127.0.0.1:{_free_port()}"
    appliance.write_locations(harness.locations_yaml(
        harness.location_entry("pulled", pushed),
        harness.location_entry("tagged", f"{repository}:1"),
        harness.location_entry("elsewhere", f"{other}/{REPO}@{digest}"),
    ))
    started = time.monotonic()
    loaded = appliance.wait_for("pulled", "LOADED", timeout=300)
    print(f"pulled by digest and LOADED in {time.monotonic() - started:.1f} s")
    assert loaded["image"] == pushed
    assert harness.client().images.get(pushed).attrs["RepoDigests"] == [pushed]
    tagged = appliance.wait_for("tagged", "ERROR", timeout=60)
    assert "by digest" in tagged["error"], tagged
    elsewhere = appliance.wait_for("elsewhere", "ERROR", timeout=60)
    assert f"{other} is not a registry this appliance pulls from" in elsewhere["error"], elsewhere
    assert PASSWORD not in appliance.logs()
