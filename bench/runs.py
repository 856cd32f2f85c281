#!/usr/bin/env python3
"""Runs: launch latency, a 1-op job end to end, and event throughput, each against a local-Dagster baseline
measured in the same run.

    python bench/runs.py                 # everything (5 launches, 10,000 events), about 2 minutes on 2 cores
    python bench/runs.py --launches 5 --events 2000

It starts what the integration tests start (tests/integration/stack.py): the control plane container and the
appliance on separate networks, the example location registered, the appliance enrolled. Runs are launched
through the webserver's GraphQL, as the UI does. The baselines run the same image with plain `docker run ...
dagster job execute` and a local SQLite instance (no appliance, no hardening, no network).

Figures (targets from the issue; the bench prints met / NOT met and asserts nothing):
  1. LAUNCH_RUN enqueue -> run container running, p50: the HybridRunLauncher's engine event ("Queued for the
     appliance ...", stamped when the work is enqueued) to the container's State.StartedAt.   target <= 1 s
  2. 1-op job (sleepy_job, 0 s) end to end: launchRun mutation -> status SUCCESS seen through GraphQL, vs the
     wall time of `docker run <image> dagster job execute` of the same job.                  target <= 1.3x
  3. events/s for a job logging N events (chatty_job): N / (RUN_START -> SUCCESS visible on the control plane)
     vs N / (RUN_START -> RUN_SUCCESS) in the local run.                  target >= 2,000/s and >= 50% of local
All timestamps are wall clock on this one host (containers share its clock).
"""

# ruff: noqa: E402  (the repository root goes on sys.path before the project's imports)
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import docker.errors

from tests import harness
from tests.integration.stack import ControlPlane, control_plane_and_appliance, launch, run_containers, wait

RUN_EVENTS = """query($id: ID!, $after: String) { logsForRun(runId: $id, afterCursor: $after) {
  ... on EventConnection { cursor hasMore events { __typename ... on MessageEvent { message timestamp } } } } }"""
STATUS = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""

LOCAL_SCRIPT = """
set -e
export DAGSTER_HOME=/tmp/dh && mkdir -p $DAGSTER_HOME
echo 'telemetry: {{enabled: false}}' > $DAGSTER_HOME/dagster.yaml
cat > /tmp/run.yaml <<'EOF'
{config}
EOF
dagster job execute -m example_location.definitions -j {job} -c /tmp/run.yaml > /tmp/out.log 2>&1
python - <<'EOF'
import json
from dagster import DagsterInstance, DagsterEventType
i = DagsterInstance.get()
run = i.get_runs()[0]
logs = i.all_logs(run.run_id)
t = {{e.dagster_event_type: e.timestamp for e in logs if e.is_dagster_event}}
print(json.dumps({{"events": len(logs), "start": t.get(DagsterEventType.RUN_START),
                  "end": t.get(DagsterEventType.RUN_SUCCESS), "status": run.status.value}}))
EOF
"""


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def local_run(image: str, job: str, config: dict) -> tuple[float, dict]:
    """`docker run <image> dagster job execute` with a local SQLite instance; (wall seconds, run stats)."""
    dc = harness.client()
    script = LOCAL_SCRIPT.format(config=json.dumps(config), job=job)
    started = time.monotonic()
    container = dc.containers.run(image, ["sh", "-c", script], detach=True, labels={"airlock.test-run": "bench"})
    try:
        container.wait(timeout=600)
        wall = time.monotonic() - started
        out = container.logs(stderr=False)
    finally:
        container.remove(force=True)
    return wall, json.loads(out.decode().strip().splitlines()[-1])


def wait_success(cp: ControlPlane, run_id: str, poll: float = 0.1, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cp.graphql(STATUS, {"id": run_id})["runOrError"]["status"]
        if state == "SUCCESS":
            return time.time()
        if state in ("FAILURE", "CANCELED"):
            raise RuntimeError(f"run {run_id} ended {state}")
        time.sleep(poll)
    raise TimeoutError(run_id)


def container_started(run_id: str, timeout: float = 60) -> float:
    """The run container's State.StartedAt (epoch seconds), polled right after launch: it is removed soon."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = [c.attrs["State"].get("StartedAt") or "" for c in run_containers(run_id)]
        except docker.errors.NotFound:  # listed, then gone: look again
            found = []
        for started_at in found:
            if not started_at.startswith("0001"):
                return dt.datetime.fromisoformat(started_at[:26].rstrip("Z") + "+00:00").timestamp()
        time.sleep(0.05)
    raise TimeoutError(f"no run container for {run_id}")


def all_events(cp: ControlPlane, run_id: str) -> list[dict]:
    """Every event of the run, page by page (the webserver answers at most 1,000 at a time)."""
    found: list[dict] = []
    after = None
    while True:
        page = cp.graphql(RUN_EVENTS, {"id": run_id, "after": after})["logsForRun"]
        found += page["events"]
        if not page["hasMore"] or not page["events"]:
            return found
        after = page["cursor"]


def queued_at(cp: ControlPlane, run_id: str) -> float:
    """When the HybridRunLauncher enqueued LAUNCH_RUN: its engine event's timestamp."""
    events = all_events(cp, run_id)
    return next(float(e["timestamp"]) / 1000 for e in events if "Queued for the appliance" in (e.get("message") or ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=5, help="1-op runs to launch (figures 1 and 2)")
    parser.add_argument("--events", type=int, default=10_000, help="events the chatty job logs (figure 3)")
    args = parser.parse_args()
    image = harness.images()["example-location"]
    one_op = {"ops": {"wait_a_while": {"config": {"seconds": 0}}}}
    chatty = {"ops": {"log_events": {"config": {"count": args.events, "interval": 0.0}}}}

    local_walls = [local_run(image, "sleepy_job", one_op)[0] for _ in range(3)]
    _, local_events = local_run(image, "chatty_job", chatty)
    with tempfile.TemporaryDirectory() as tmp, control_plane_and_appliance(Path(tmp), quiet=True) as (cp, appliance):
        appliance.wait_for("example", "LOADED", timeout=240)
        wait("example in the webserver", lambda: "chatty_job" in json.dumps(cp.graphql(
            "{ workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError { ... on "
            "RepositoryLocation { repositories { jobs { name } } } } } } } }")), 240)
        launches, e2e = [], []
        for _ in range(args.launches):
            asked = time.time()
            run_id = launch(cp, "sleepy_job", one_op)
            started = container_started(run_id)
            e2e.append(wait_success(cp, run_id) - asked)
            launches.append(started - queued_at(cp, run_id))
        run_id = launch(cp, "chatty_job", chatty)
        done = wait_success(cp, run_id, poll=0.2)
        events = all_events(cp, run_id)
        start = next(float(e["timestamp"]) / 1000 for e in events if e["__typename"] == "RunStartEvent")

    remote_rate = len(events) / (done - start)
    local_rate = local_events["events"] / (local_events["end"] - local_events["start"])
    e2e_p50, local_p50 = statistics.median(e2e), statistics.median(local_walls)
    print(f"\nairlock bench/runs.py  {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC  "
          f"(host: {harness.client().info().get('NCPU')} cpus)")
    print(f"1. LAUNCH_RUN enqueue -> container running: p50 {pct(launches, 50):.3f} s, max {max(launches):.3f} s "
          f"over {len(launches)} runs   target <= 1 s: {verdict(pct(launches, 50) <= 1.0)}")
    print(f"2. 1-op job end to end: airlock p50 {e2e_p50:.2f} s (all {', '.join(f'{x:.2f}' for x in e2e)}) vs "
          f"docker run + dagster job execute p50 {local_p50:.2f} s -> {e2e_p50 / local_p50:.2f}x   "
          f"target <= 1.3x: {verdict(e2e_p50 / local_p50 <= 1.3)}")
    print(f"3. {args.events} events: airlock {remote_rate:,.0f} events/s end to end ({len(events)} events in "
          f"{done - start:.1f} s) vs local SQLite {local_rate:,.0f}/s ({local_events['events']} in "
          f"{local_events['end'] - local_events['start']:.1f} s) -> {remote_rate / local_rate:.0%}   "
          f"target >= 2,000/s and >= 50%: {verdict(remote_rate >= 2000 and remote_rate >= 0.5 * local_rate)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
