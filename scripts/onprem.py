#!/usr/bin/env python3
"""On-prem: the control plane on Postgres with two TLS gateways, one appliance, and a run of the example job
(compose/onprem.yml).

    python scripts/onprem.py up      # tls init (once), postgres + control plane + gateway2, enroll, run the job
    python scripts/onprem.py down [--keep-data]

`up` makes the gateway's CA and certificate with `airlock-cp tls init` inside the control plane's state volume
(the key never leaves it; ca.pem is copied out for the appliance, which trusts that CA only), and a random
Postgres password in .airlock/<id>/postgres-password (0644 in a 0700 directory: the containers' users read it,
no other user of this host). Again with nothing changed it keeps everything and runs the job once more.
`down` removes the containers, networks, the three volumes (unless --keep-data) and what the appliance started.

Environment: AIRLOCK_ONPREM_ID (default onprem) names everything; AIRLOCK_UI_PORT, AIRLOCK_GATEWAY_PORT and
AIRLOCK_GATEWAY2_PORT pick the host ports (3000, 8443, 8444, on 127.0.0.1 unless AIRLOCK_GATEWAY_BIND);
AIRLOCK_TLS_HOSTNAMES adds names to the certificate (the address appliances on other hosts use).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.quickstart import (  # noqa: E402
    EXAMPLE_JOB,
    _example_loaded,
    _finished,
    ensure_enroll_token,
    launch_example,
    register_example,
    wait,
)

COMPOSE_FILE = ROOT / "compose" / "onprem.yml"
CA_IN_VOLUME = "/var/lib/airlock-cp/tls/ca.pem"
# The names the gateways are reached by: compose service names (appliance), and this host (tests, operators).
TLS_NAMES = ("controlplane", "gateway2", "localhost", "127.0.0.1")


def say(message: str) -> None:
    print(f"[onprem] {message}", flush=True)


@dataclass
class UpResult:
    run_id: str
    status: str
    run_seconds: float  # the run's own start to end, as Dagster recorded it
    phases: dict[str, float] = field(default_factory=dict)  # seconds since `up` started, per milestone


@dataclass
class OnPrem:
    """compose/onprem.yml under one id: four containers, three volumes, two networks, a work directory."""

    onprem_id: str = "onprem"
    ui_port: int = 3000
    gateway_ports: tuple[int, int] = (8443, 8444)
    extra_tls_names: tuple[str, ...] = ()
    docker: Any = field(default_factory=lambda: docker.from_env(timeout=300))

    @property
    def name(self) -> str:
        return f"airlock-{self.onprem_id}"

    @property
    def workdir(self) -> Path:
        return ROOT / ".airlock" / self.onprem_id

    @property
    def ui(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    def gateway_url(self, which: int) -> str:
        return f"https://localhost:{self.gateway_ports[which]}"

    def container(self, service: str) -> Any:
        return self.docker.containers.get(self.name if service == "appliance" else f"{self.name}-{service}")

    def compose(self, *args: str, images: dict[str, str] | None = None, capture: bool = False) -> str:
        tags = images or {}
        environment = {
            **os.environ, "AIRLOCK_ONPREM_ID": self.onprem_id, "AIRLOCK_NAME": self.name,
            "AIRLOCK_WORKDIR": str(self.workdir), "AIRLOCK_UI_PORT": str(self.ui_port),
            "AIRLOCK_GATEWAY_PORT": str(self.gateway_ports[0]), "AIRLOCK_GATEWAY2_PORT": str(self.gateway_ports[1]),
            "AIRLOCK_POSTGRES_IMAGE": tags.get("postgres", "unused"),
            "AIRLOCK_CONTROLPLANE_IMAGE": tags.get("controlplane", "unused"),
            "AIRLOCK_APPLIANCE_IMAGE": tags.get("appliance", "unused"),
        }
        result = subprocess.run(["docker-compose", "-p", self.name, "-f", str(COMPOSE_FILE), *args], env=environment,
                                check=True, stdout=subprocess.PIPE if capture else None, text=True)
        return result.stdout or ""

    def cp_cli(self, *args: str, service: str = "controlplane") -> str:
        result = self.container(service).exec_run(["airlock-cp", *args], demux=True)
        out, err = (part.decode(errors="replace") if part else "" for part in result.output)
        if result.exit_code != 0:
            raise RuntimeError(f"airlock-cp {' '.join(args)} failed: {err or out}")
        return out

    def psql(self, sql: str, database: str = "dagster") -> list[list[str]]:
        """Rows of a query run as the superuser over the postgres container's local socket."""
        result = self.container("postgres").exec_run(["psql", "-qAtX", "-F", "\t", "-d", database, "-c", sql],
                                                     demux=True)
        out, err = (part.decode(errors="replace") if part else "" for part in result.output)
        if result.exit_code != 0:
            raise RuntimeError(f"psql {sql!r}: {err or out}")
        return [line.split("\t") for line in out.splitlines() if line]

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        response = httpx.post(f"{self.ui}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
        body = response.json()
        if "errors" in body:
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    # -- up ---------------------------------------------------------------------------------------------------
    def prepare_workdir(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)  # the password file below is 0644 for the containers' users; this keeps it ours
        password = self.workdir / "postgres-password"
        if not password.exists():
            password.write_text(secrets.token_urlsafe(32) + "\n")
        files = {"locations.yaml": "version: 1\nlocations: []  # connected: the control plane's registry\n"}
        for name in ("enroll-token", "ca.pem", "locations.yaml"):
            path = self.workdir / name
            if name in files or not path.exists():
                path.write_text(files.get(name, ""))
        for name in ("postgres-password", "enroll-token", "ca.pem", "locations.yaml"):
            (self.workdir / name).chmod(0o644)

    def tls_init(self, images: dict[str, str]) -> None:
        """`airlock-cp tls init` in the control plane's volume, once; ca.pem copied out for the appliance."""
        run = ("run", "--rm", "--no-deps", "-T", "--entrypoint")
        present = subprocess.run(["docker", "volume", "inspect", f"airlock-cp-state-{self.onprem_id}"],
                                 capture_output=True).returncode == 0 and self.compose(
            *run, "sh", "controlplane", "-c", f"test -s {CA_IN_VOLUME} && echo yes || true",
            images=images, capture=True).strip() == "yes"
        if not present:
            names = ",".join(TLS_NAMES + self.extra_tls_names)
            self.compose(*run, "airlock-cp", "controlplane", "tls", "init", "--hostnames", names, images=images)
        ca = self.compose(*run, "cat", "controlplane", CA_IN_VOLUME, images=images, capture=True)
        (self.workdir / "ca.pem").write_text(ca)

    def up(self, images: dict[str, str]) -> UpResult:
        started = time.monotonic()
        phases: dict[str, float] = {}

        def mark(what: str) -> None:
            phases[what] = round(time.monotonic() - started, 1)
            say(f"{what} ({phases[what]:.1f} s)")

        self.prepare_workdir()
        self.tls_init(images)
        mark("TLS material ready")
        # compose waits for postgres, then the control plane, to be healthy before starting what depends on them.
        self.compose("up", "-d", "--no-build", "postgres", "controlplane", "gateway2", images=images)
        mark("postgres, control plane and gateway2 healthy")
        wait("the Dagster UI answering", lambda: self.graphql("{ version }")["version"], 180)

        register_example(self.cp_cli, self.docker.images.get(images["example-location"]).id)
        ensure_enroll_token(self.cp_cli, self.workdir / "enroll-token")
        self.compose("up", "-d", "--no-build", "appliance", images=images)
        wait("the example location loaded in the control plane", lambda: _example_loaded(self), 300)
        mark("example location loaded from the appliance")

        run_id = launch_example(self.graphql)
        say(f"launched {EXAMPLE_JOB} as run {run_id} ...")
        run = wait(f"run {run_id} finished", lambda: _finished(self, run_id), 300)
        mark(f"run {run['status']}")
        return UpResult(run_id, run["status"], run["endTime"] - run["startTime"], phases)

    # -- down -------------------------------------------------------------------------------------------------
    def down(self, keep_data: bool = False) -> None:
        client = self.docker
        # What the appliance started first: its networks would otherwise keep compose's network busy.
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(self.name).remove(force=True)
        for c in client.containers.list(all=True, filters={"label": f"airlock.appliance-id={self.onprem_id}"}):
            c.remove(force=True)
        for n in client.networks.list(filters={"label": f"airlock.appliance-id={self.onprem_id}"}):
            n.remove()
        self.compose("down", "--remove-orphans", *([] if keep_data else ["--volumes"]))
        if not keep_data:
            for name in ("enroll-token", "ca.pem", "postgres-password", "locations.yaml"):
                with contextlib.suppress(FileNotFoundError):
                    (self.workdir / name).unlink()
            with contextlib.suppress(OSError):
                self.workdir.rmdir()


def from_env() -> OnPrem:
    env = os.environ
    extra = tuple(n.strip() for n in env.get("AIRLOCK_TLS_HOSTNAMES", "").split(",") if n.strip())
    return OnPrem(onprem_id=env.get("AIRLOCK_ONPREM_ID", "onprem"), ui_port=int(env.get("AIRLOCK_UI_PORT", "3000")),
                  gateway_ports=(int(env.get("AIRLOCK_GATEWAY_PORT", "8443")),
                                 int(env.get("AIRLOCK_GATEWAY2_PORT", "8444"))), extra_tls_names=extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up")
    p = sub.add_parser("down")
    p.add_argument("--keep-data", action="store_true")
    args = parser.parse_args()
    stack = from_env()
    if args.command == "down":
        stack.down(args.keep_data)
        say("removed postgres, the control plane, gateway2, the appliance, its code servers, runs and networks"
            + ("" if args.keep_data else " and the three volumes"))
        return
    subprocess.run([sys.executable, str(ROOT / "images/build.py")], check=True)
    images = json.loads((ROOT / ".cache/images.json").read_text())
    result = stack.up(images)
    say(f"run {result.run_id}: {result.status} in {result.run_seconds:.1f} s; Dagster UI: {stack.ui}/runs/"
        f"{result.run_id}")
    say(f"gateways: {stack.gateway_url(0)} and {stack.gateway_url(1)} (CA: {stack.workdir / 'ca.pem'}); "
        "stop with: python3 scripts/onprem.py down")
    raise SystemExit(0 if result.status == "SUCCESS" else 1)


if __name__ == "__main__":
    main()
