#!/usr/bin/env python3
"""The quickstart: a control plane and one appliance on this host (compose/quickstart.yml), the example code
location served from the appliance, and a real run of the example job, launched through the Dagster UI's API.

    python scripts/quickstart.py up      # (re)start, enroll, wait for the location, run the example job
    python scripts/quickstart.py down [--keep-data]

`up` again with nothing changed keeps both containers (compose leaves them alone), re-uses the enrollment and
runs the job once more. `down` removes the containers, the networks and (unless --keep-data) both state
volumes, and what the appliance started (code servers, run containers, their networks).

The appliance is started the way docs/ describe for a VM: the Docker socket (root-equivalent: only
sockguard's user may open it), a state volume, a read-only root, no-new-privileges and only the capabilities
supervisord needs. `appliance_run_kwargs` is the same as a `docker run` line (the tests start it this way).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose" / "quickstart.yml"
# Tests run a quickstart of their own next to a user's by setting AIRLOCK_QUICKSTART_ID (and AIRLOCK_UI_PORT).
APPLIANCE_ID = os.environ.get("AIRLOCK_QUICKSTART_ID", "quickstart")
NAME = f"airlock-{APPLIANCE_ID}"
UI_PORT = int(os.environ.get("AIRLOCK_UI_PORT", "3000"))
SOCKET = "/var/run/docker.sock"
APPLIANCE_CAPS = ["CHOWN", "FOWNER", "SETUID", "SETGID", "KILL"]
EXAMPLE_JOB = "assets_job"

LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
RUN = """query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status startTime endTime } } }"""
LOCATION = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus locationOrLoadError {
  __typename ... on RepositoryLocation { repositories { jobs { name } } } ... on PythonError { message } } } } } }"""


def appliance_run_kwargs(image: str, *, name: str, appliance_id: str, locations_file: Path,
                         labels: dict[str, str] | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`docker run` of the appliance as docs/ describe it (docker-py keyword arguments)."""
    return {
        "image": image,
        "name": name,
        "detach": True,
        "labels": {"airlock.role": "appliance", **(labels or {})},
        "environment": {"AIRLOCK_APPLIANCE_ID": appliance_id, **(env or {})},
        "volumes": {
            SOCKET: {"bind": SOCKET, "mode": "rw"},
            f"airlock-state-{appliance_id}": {"bind": "/var/lib/airlock", "mode": "rw"},
            f"airlock-operator-{appliance_id}": {"bind": "/etc/airlock/operator", "mode": "rw"},  # airlock images
            str(locations_file): {"bind": "/etc/airlock/locations.yaml", "mode": "ro"},
        },
        "cap_drop": ["ALL"],
        "cap_add": APPLIANCE_CAPS,
        "security_opt": ["no-new-privileges:true"],
        "read_only": True,
        "tmpfs": {"/run": "rw,nosuid,nodev,mode=0755", "/tmp": "rw,nosuid,nodev"},
        "restart_policy": {"Name": "unless-stopped"},
        # sockguard and the egress proxy log every decision: keep the appliance's own log bounded.
        "log_config": {"Type": "json-file", "Config": {"max-size": "20m", "max-file": "5"}},
    }


def say(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


class Stack:
    """compose/quickstart.yml under this quickstart's id, and the two containers in it."""

    def __init__(self) -> None:
        self.workdir = ROOT / ".airlock" / APPLIANCE_ID
        self.docker = docker.from_env(timeout=300)
        self.ui = f"http://127.0.0.1:{UI_PORT}"

    def compose(self, *args: str, env: dict[str, str] | None = None) -> None:
        environment = {**os.environ, "AIRLOCK_QUICKSTART_ID": APPLIANCE_ID, "AIRLOCK_NAME": NAME,
                       "AIRLOCK_UI_PORT": str(UI_PORT), "AIRLOCK_WORKDIR": str(self.workdir),
                       "AIRLOCK_CONTROLPLANE_IMAGE": "unused", "AIRLOCK_APPLIANCE_IMAGE": "unused", **(env or {})}
        subprocess.run(["docker-compose", "-p", NAME, "-f", str(COMPOSE_FILE), *args], env=environment, check=True)

    def container(self, name: str) -> Any:
        return self.docker.containers.get(name)

    def cp_cli(self, *args: str) -> str:
        result = self.container(f"{NAME}-controlplane").exec_run(["airlock-cp", *args], demux=True)
        out, err = (part.decode(errors="replace") if part else "" for part in result.output)
        if result.exit_code != 0:
            raise SystemExit(f"[quickstart] airlock-cp {' '.join(args)} failed: {err or out}")
        return out

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        response = httpx.post(f"{self.ui}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
        body = response.json()
        if "errors" in body:
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]


def wait(what: str, check: Any, timeout: float) -> Any:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, RuntimeError, KeyError, TypeError, ValueError) as exc:
            last = exc
        time.sleep(1)
    raise SystemExit(f"[quickstart] {what}: not reached within {timeout:.0f} s (last: {last})")


def up() -> int:
    started = time.monotonic()
    tags = json.loads((ROOT / ".cache/images.json").read_text())
    stack = Stack()
    stack.workdir.mkdir(parents=True, exist_ok=True)
    images = {"AIRLOCK_CONTROLPLANE_IMAGE": tags["controlplane"], "AIRLOCK_APPLIANCE_IMAGE": tags["appliance"]}
    for name, text in (("locations.yaml", "version: 1\nlocations: []  # connected: the control plane's registry\n"),
                       ("enroll-token", None), ("ca.pem", None)):
        path = stack.workdir / name
        if text is not None or not path.exists():
            path.write_text(text or "")
        path.chmod(0o644)  # read by the appliance's unprivileged agent user; the token is one-time

    say(f"control plane ({tags['controlplane']}) ...")
    stack.compose("up", "-d", "--no-build", "controlplane", env=images)
    wait("the Dagster UI answering", lambda: stack.graphql("{ version }")["version"], 180)

    register_example(stack.cp_cli, stack.docker.images.get(tags["example-location"]).id)
    ensure_enroll_token(stack.cp_cli, stack.workdir / "enroll-token")
    (stack.workdir / "ca.pem").write_bytes(_file_from(stack.container(f"{NAME}-controlplane"),
                                                      "/var/lib/airlock-cp/tls/ca.pem"))
    say(f"appliance ({tags['appliance']}) ...")
    stack.compose("up", "-d", "--no-build", "appliance", env=images)

    say("waiting for the example code location (served from the appliance) ...")
    try:
        wait("the example location loaded in the control plane", lambda: _example_loaded(stack), 300)
    except SystemExit:
        _explain_location(stack)
        raise
    run_id = launch_example(stack.graphql)
    say(f"launched {EXAMPLE_JOB} as run {run_id}; it runs in a hardened container the appliance starts ...")
    run = wait(f"run {run_id} finished", lambda: _finished(stack, run_id), 300)
    say(f"run {run_id}: {run['status']} in {run['endTime'] - run['startTime']:.1f} s")
    say(f"Dagster UI: {stack.ui}/runs/{run_id}")
    say(f"ready in {time.monotonic() - started:.1f} s. Next: docker exec {NAME} airlock doctor; stop with: make down")
    return 0 if run["status"] == "SUCCESS" else 1


def register_example(cp_cli: Callable[..., str], image_id: str) -> None:
    """Register the example location on this image (add, or update when its image changed; else nothing)."""
    registered = {r["name"]: r for r in json.loads(cp_cli("location", "list", "--json"))}
    if "example" not in registered:
        print(cp_cli("location", "add", "example", "--image", image_id, "--module",
                     "example_location.definitions").rstrip())
    elif registered["example"]["image"] != image_id:
        print(cp_cli("location", "update", "example", "--image", image_id).rstrip())


def ensure_enroll_token(cp_cli: Callable[..., str], token_file: Path) -> None:
    """First start: a one-time token in the file the appliance reads; later the key it enrolled is kept."""
    if not token_file.read_text().strip():
        token_file.write_text(cp_cli("agent-token", "create").strip().splitlines()[-1] + "\n")


def launch_example(graphql: Callable[..., dict]) -> str:
    """Launch the example job through the UI's GraphQL; its run id."""
    params = {"selector": {"repositoryLocationName": "example", "repositoryName": "__repository__",
                           "jobName": EXAMPLE_JOB}, "runConfigData": {}}
    launched = graphql(LAUNCH, {"p": params})["launchRun"]
    if launched["__typename"] != "LaunchRunSuccess":
        raise RuntimeError(f"launching {EXAMPLE_JOB} failed: {launched}")
    return launched["run"]["runId"]


def _example_loaded(stack: Stack) -> bool:
    entries = stack.graphql(LOCATION)["workspaceOrError"]["locationEntries"]
    entry = next((e for e in entries if e["name"] == "example"), None)
    location = (entry or {}).get("locationOrLoadError") or {}
    return location.get("__typename") == "RepositoryLocation" and any(
        job["name"] == EXAMPLE_JOB for repo in location["repositories"] for job in repo["jobs"])


def _explain_location(stack: Stack) -> None:
    """Why the location did not load, as the user would look for it: the control plane's and the appliance's
    view of it, and the appliance's last log lines (sockguard's allowed calls left out)."""
    for what, probe in (("airlock-cp location list", lambda: stack.cp_cli("location", "list")),
                        ("airlock status", lambda: stack.container(NAME).exec_run(["airlock", "status"]).output.decode(
                            errors="replace")),
                        ("appliance log", lambda: "\n".join(
                            line for line in stack.container(NAME).logs(tail=400).decode(errors="replace").splitlines()
                            if '"sockguard.decision", "allow": true' not in line)[-4000:])):
        try:
            print(f"[quickstart] {what}:\n{probe()}", flush=True)
        except (SystemExit, docker.errors.DockerException) as exc:
            print(f"[quickstart] {what}: unavailable ({exc})", flush=True)


def _finished(stack: Stack, run_id: str) -> dict | None:
    run = stack.graphql(RUN, {"id": run_id})["runOrError"]
    return run if run.get("status") in {"SUCCESS", "FAILURE", "CANCELED"} else None


def _file_from(container: Any, path: str) -> bytes:
    stream, _ = container.get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.getmembers()[0]
        extracted = tar.extractfile(member)
        assert extracted is not None, f"{path} is not a file"
        return extracted.read()


def down(keep_data: bool) -> int:
    stack = Stack()
    client = stack.docker
    # What the appliance started first: its networks would otherwise keep compose's network busy.
    with contextlib.suppress(docker.errors.NotFound):
        client.containers.get(NAME).remove(force=True)
    for c in client.containers.list(all=True, filters={"label": f"airlock.appliance-id={APPLIANCE_ID}"}):
        c.remove(force=True)
    for n in client.networks.list(filters={"label": f"airlock.appliance-id={APPLIANCE_ID}"}):
        n.remove()
    stack.compose("down", "--remove-orphans", *([] if keep_data else ["--volumes"]))
    if not keep_data:
        for name in ("enroll-token", "ca.pem"):  # the enrollment goes with the state volumes
            with contextlib.suppress(FileNotFoundError):
                (stack.workdir / name).unlink()
    say("removed the control plane, the appliance, its code servers, runs and networks"
        + ("" if keep_data else " and both state volumes"))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up")
    p = sub.add_parser("down")
    p.add_argument("--keep-data", action="store_true")
    args = parser.parse_args()
    try:
        code = up() if args.command == "up" else down(args.keep_data)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"[quickstart] {exc}", file=sys.stderr)
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
