"""A Dagster project of a user's own, taken through docs/USER_CODE.md as a new user would, on real Docker.

examples/acme-pipelines is not built FROM airlock/usercode-base: a plain Debian base with Python, its own
venv in /srv/acme, the project installed as a package, `humanize` as an extra dependency, airlock-userland from
its wheel. The steps, each timed (the closing note carries the figures):

1. build the image from a wheelhouse (offline, as docs/USER_CODE.md step 2 says);
2. deploy it with `airlock-cp deploy dagster_cloud.yaml --image acme=sha256:<id>` before it is allowed: the
   deploy fails, and both the CLI and the Dagster UI say why and how to allow it;
3. `airlock images allow acme/pipelines` on the appliance: no restart;
4. deploy again: LOADED within seconds;
5. launch its jobs through the UI's GraphQL: SUCCESS.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from tests import harness
from tests.integration.stack import ControlPlane, control_plane_and_appliance, launch, wait, wait_terminal

PROJECT = harness.ROOT / "examples" / "acme-pipelines"
EXTRA_WHEELS = ("humanize", "setuptools", "wheel")  # the project's own dependency, and what builds it
EVENTS = """query($id: ID!) { runOrError(runId: $id) { ... on Run { eventConnection { events { __typename
  ... on MessageEvent { message } ... on ErrorEvent { error { message stack } } } } } } }"""
LOAD_ERRORS = """{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError {
  __typename ... on PythonError { message } ... on RepositoryLocation { repositories { jobs { name } } } } } } } }"""


def _wheelhouse(target: Path) -> None:
    """Dagster and its dependencies (the hash-locked usercode wheelhouse images/build.py downloaded), the extra
    wheels from PyPI, and airlock-userland, built from this checkout."""
    target.mkdir(parents=True)
    lock = harness.ROOT / "requirements" / "usercode.lock"
    sys.path.insert(0, str(harness.ROOT / "images"))
    from build import wheelhouse  # type: ignore[import-not-found]
    from userland_wheel import build_wheel  # type: ignore[import-not-found]

    for wheel in wheelhouse(lock).glob("*.whl"):
        shutil.copy2(wheel, target / wheel.name)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
                    str(target), *EXTRA_WHEELS], check=True)
    build_wheel(target)


def _cp_file(cp: ControlPlane, path: Path, into: str) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        info = tarfile.TarInfo(Path(into).name)
        info.size, info.mode = path.stat().st_size, 0o644
        tar.addfile(info, io.BytesIO(path.read_bytes()))
    cp.container.put_archive(str(Path(into).parent), data.getvalue())


def _deploy(cp: ControlPlane, image_id: str, wait_s: str) -> tuple[int, str]:
    result = cp.container.exec_run(["airlock-cp", "deploy", "/tmp/dagster_cloud.yaml", "--image", f"acme={image_id}",
                                    "--wait", wait_s], demux=True)
    out = (result.output[0] or b"").decode() + (result.output[1] or b"").decode()
    return result.exit_code, out


def _run_story(cp: ControlPlane, run_id: str) -> str:
    """The run's event messages and errors, to read why it failed."""
    events = cp.graphql(EVENTS, {"id": run_id})["runOrError"]["eventConnection"]["events"]
    lines = []
    for e in events:
        error = e.get("error") or {}
        lines.append(f"{e['__typename']}: {e.get('message', '')} {error.get('message', '')} "
                     f"{''.join(error.get('stack') or [])[-1500:]}".rstrip())
    return "\n".join(lines)[-8000:]


def _load_error(cp: ControlPlane) -> str | None:
    entries = cp.graphql(LOAD_ERRORS)["workspaceOrError"]["locationEntries"]
    entry = next((e for e in entries if e["name"] == "acme"), None)
    loaded = entry and entry["locationOrLoadError"]
    return loaded["message"] if loaded and loaded["__typename"] == "PythonError" else None


def test_a_users_own_project_is_built_allowed_deployed_and_runs(tmp_path: Path) -> None:
    images = harness.images()
    dc = harness.client()
    tag = f"acme/pipelines:{harness.unique_id()}"
    times: dict[str, float] = {}
    context = tmp_path / "acme"
    shutil.copytree(PROJECT, context, ignore=shutil.ignore_patterns("__pycache__"))
    started = time.monotonic()
    _wheelhouse(context / "wheels")
    image, _ = dc.images.build(path=str(context), tag=tag, buildargs={"BASE_IMAGE": images["base"]}, rm=True,
                               forcerm=True, pull=False)
    times["1. build the image (wheelhouse + docker build)"] = time.monotonic() - started
    try:
        config = image.attrs["Config"]
        assert config["User"] == "10001:10001" and "/srv/acme/venv/bin" in " ".join(config["Env"])
        (tmp_path / "stack").mkdir()
        with control_plane_and_appliance(tmp_path / "stack") as (cp, appliance):
            _cp_file(cp, context / "dagster_cloud.yaml", "/tmp/dagster_cloud.yaml")

            started = time.monotonic()
            code, out = _deploy(cp, image.id, "60s")
            times["2. deploy before allowing (fails with the reason)"] = time.monotonic() - started
            assert code == 1, out
            assert "acme: added, ERROR" in out and "airlock images allow acme/pipelines" in out, out
            # The first load may come before the appliance has reported (UNAVAILABLE); the sync reloads the
            # location when the report arrives, and from then on the UI shows airlock's reason.
            message = wait("the refusal as the location's load error in the UI",
                           lambda: (m := _load_error(cp)) and "is not allowed" in m and m, 120)
            assert "is not allowed by this appliance's image policy" in message, message
            assert "airlock images allow acme/pipelines" in message, message

            # The agent's user cannot allow an image: the operator's file is root's to write.
            forged = appliance.container.exec_run(["sh", "-c", "echo 'version: 1' > /etc/airlock/operator/x.yaml"],
                                                  user="airlock-agent")
            assert forged.exit_code != 0 and b"Permission denied" in forged.output, forged.output
            started = time.monotonic()
            allowed = appliance.container.exec_run(["airlock", "images", "allow", "acme/pipelines"])
            assert allowed.exit_code == 0, allowed.output.decode()
            times["3. airlock images allow"] = time.monotonic() - started

            started = time.monotonic()
            code, out = _deploy(cp, image.id, "240s")
            times["4. deploy again until LOADED"] = time.monotonic() - started
            assert code == 0 and "acme: unchanged, LOADED" in out, out
            listed = cp.cli("location", "list")
            assert any(line.split()[:2] == ["acme", "LOADED"] for line in listed.splitlines()), listed

            def jobs() -> set[str] | None:
                entries = cp.graphql(LOAD_ERRORS)["workspaceOrError"]["locationEntries"]
                entry = next(e for e in entries if e["name"] == "acme")["locationOrLoadError"]
                names = {j["name"] for r in entry.get("repositories", []) for j in r["jobs"]}
                return names if {"orders_job", "nightly_report"} <= names else None

            started = time.monotonic()
            wait("acme loaded in the webserver", jobs, 120)
            times["5. the UI has the location's jobs"] = time.monotonic() - started
            started = time.monotonic()
            orders = launch(cp, "orders_job", location="acme")
            report = launch(cp, "nightly_report", {"ops": {"build_report": {"config": {"recipients": 5}}}},
                            location="acme")
            for run_id in (orders, report):
                assert wait_terminal(cp, run_id) == "SUCCESS", _run_story(cp, run_id)
            times["6. two runs, launch -> SUCCESS"] = time.monotonic() - started
    finally:
        for step, seconds in times.items():
            print(f"[own project] {step}: {seconds:.1f} s")
        dc.images.remove(tag, force=True)
