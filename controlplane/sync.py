"""`python -m controlplane.sync`: keep Dagster's view of the code locations in step with airlock.

The webserver never re-reads workspace.yaml on its own and keeps a location's load error until asked
again. So whenever the registry changes, or an agent reports a location's state changed (heartbeat),
re-render workspace.yaml and ask the webserver to reload. The daemon re-reads the file every ~60 s.
Every few minutes it also purges the control plane's own bookkeeping past its retention (retention.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import sqlalchemy as sa

from controlplane.db import create_engine
from controlplane.gateway.queue import WorkQueue
from controlplane.gateway.store import AgentStore
from controlplane.registry import Registry
from controlplane.retention import Retention, purge
from controlplane.settings import ControlPlaneSettings
from controlplane.storage.service import metadata as storage_metadata
from controlplane.workspace import WorkspaceReloadError, reload, render_workspace, write_workspace

log = logging.getLogger("airlock.sync")
PURGE_EVERY_SECONDS = 300.0


def reported_states(store: AgentStore) -> tuple[tuple[str, str, str, str], ...]:
    """(agent, location, state, container) from every active agent's last heartbeat."""
    states = []
    for agent in store.list_agents():
        if agent["status"] != "active" or not agent["heartbeat"]:
            continue
        for loc in json.loads(agent["heartbeat"]).get("locations", []):
            states.append((agent["id"], loc.get("name", ""), loc.get("state", ""), loc.get("container") or ""))
    return tuple(sorted(states))


def sync_once(registry: Registry, store: AgentStore, workspace_path: str, webserver_url: str,
              last: tuple[object, ...] | None) -> tuple[object, ...] | None:
    text = render_workspace(registry.list())
    write_workspace(workspace_path, text)
    current = (text, reported_states(store))
    if current == last:
        return last
    try:
        loads = reload(webserver_url, timeout=60)
    except WorkspaceReloadError as exc:
        log.warning("webserver reload failed, will retry: %s", exc)
        return last
    log.info("workspace reloaded: %s", ", ".join(f"{loc.name}={loc.state}" for loc in loads) or "no locations")
    return current


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sync %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = ControlPlaneSettings.from_env()
    engine = create_engine(settings.database_url)
    queue, store = WorkQueue(engine), AgentStore(engine)
    queue.create_schema()
    store.create_schema()
    registry = Registry(engine, queue)
    registry.create_schema()
    storage_metadata.create_all(engine)
    retention, purged_at = Retention.from_env(), 0.0
    workspace = os.environ.get("AIRLOCK_CP_WORKSPACE", f"{settings.state_dir}/workspace.yaml")
    webserver = os.environ.get("AIRLOCK_CP_WEBSERVER_URL", "http://127.0.0.1:3000")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    last = None
    while not stop.is_set():
        last = sync_once(registry, store, workspace, webserver, last)
        if time.monotonic() - purged_at >= PURGE_EVERY_SECONDS:
            try:
                purge(engine, retention)
            except sa.exc.SQLAlchemyError as exc:  # a locked database: next time
                log.warning("purge failed, will retry: %s", exc)
            purged_at = time.monotonic()
        stop.wait(3.0)


if __name__ == "__main__":
    main()
