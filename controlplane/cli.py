"""`airlock-cp`: the control plane operator's tool for agents, the audit log and code locations.

Every command but `tls init` opens the control plane database (`--db`, or as controlplane/settings.py finds it:
AIRLOCK_CP_DB, AIRLOCK_CP_POSTGRES_*, else SQLite in the state directory), creates missing tables, does one
thing and exits. Bad input exits 2 with the field named (`location add: image: ... not pinned by digest`), as
argparse does for bad flags; a failure after the registry changed (e.g. the webserver reload) exits 1.

When AIRLOCK_CP_WORKSPACE (or `--workspace`) is set, every location change re-renders that workspace.yaml, and
with AIRLOCK_CP_WEBSERVER_URL also asks dagster-webserver to reload it. dagster-daemon re-reads the file by
itself within about a minute (see controlplane/workspace.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from controlplane.db import create_engine
from controlplane.deploy import deploy, observed_state
from controlplane.gateway.queue import WorkQueue
from controlplane.gateway.store import AgentStore
from controlplane.registry import DEFAULT_PORT_RANGE, DEFAULT_QUEUE, LocationRecord, Registry
from controlplane.settings import ControlPlaneSettings
from controlplane.tls import create_tls, fingerprint, tls_files
from controlplane.workspace import DEFAULT_RELAY_HOST, WorkspaceReloadError, reload, render_workspace, write_workspace
from protocol.errors import PolicyError, UsageError

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class _Context:
    """The opened database and the services on it, built once per command from the global options."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        if args.db.startswith("sqlite:///") and args.db != "sqlite:///:memory:":
            Path(args.db.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(args.db)
        self.store = AgentStore(self.engine)
        self.queue = WorkQueue(self.engine)
        self.registry = Registry(self.engine, self.queue, port_range=args.relay_ports)
        for part in (self.store, self.queue, self.registry):
            part.create_schema()


# -- argument types ---------------------------------------------------------------------------------------
def _duration(text: str) -> float:
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 1h or 7d")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def _port_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d{1,5})-(\d{1,5})", text.strip())
    if not m or not 0 < int(m.group(1)) <= int(m.group(2)) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port range like 4100-4299")
    return int(m.group(1)), int(m.group(2))


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


# -- commands ---------------------------------------------------------------------------------------------
def cmd_token_create(ctx: _Context) -> int:
    token = ctx.store.create_token(ctx.args.deployment, ttl_seconds=ctx.args.ttl)
    expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + ctx.args.ttl))
    print(f"one-time enrollment token for deployment {ctx.args.deployment!r}, valid until {expires}; "
          "it is shown only now:", file=sys.stderr)
    print(token)
    return 0


def cmd_agent_list(ctx: _Context) -> int:
    agents = ctx.store.list_agents()
    if ctx.args.json:
        print(json.dumps(agents, indent=2, default=str))
        return 0
    print(f"{'ID':<20} {'DEPLOYMENT':<16} {'STATUS':<8} {'LAST SEEN':<20} {'LABELS':<16} KEYS")
    for a in agents:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a["last_seen"])) if a.get("last_seen") else "never"
        keys = " ".join(f"{k['key_id']} ({k['state']})" for k in a["keys"] if k["state"] != "retired")
        print(f"{a['id']:<20} {a['deployment']:<16} {a['status']:<8} {seen:<20} "
              f"{','.join(json.loads(a['labels'])):<16} {keys}")
    return 0


def cmd_agent_revoke(ctx: _Context) -> int:
    if not ctx.store.revoke(ctx.args.agent_id):
        raise UsageError("agent revoke", f"no agent {ctx.args.agent_id!r} (see `airlock-cp agent list`)")
    ctx.store.audit(operation="agent revoke", accepted=True, reason="revoked by operator", agent_id=ctx.args.agent_id)
    print(f"revoked {ctx.args.agent_id}")
    return 0


def cmd_audit(ctx: _Context) -> int:
    for e in ctx.store.audit_entries(ctx.args.limit):
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.at))
        verdict = "accepted" if e.accepted else "refused"
        print(f"{at} {verdict:<8} {e.operation} key={e.key_id or '-'} agent={e.agent_id or '-'} {e.reason}")
    return 0


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    """The location fields given on the command line, in locations.yaml shape; absent flags are left out."""
    out: dict[str, Any] = {k: getattr(args, k) for k in ("image", "module", "package", "queue")
                           if getattr(args, k) is not None}
    if args.env is not None:
        out["env"] = dict(args.env)
    resources = {k: getattr(args, k) for k in ("memory", "cpus", "pids") if getattr(args, k) is not None}
    if resources:
        out["resources"] = resources
    egress = {k: v for k, v in (("allow", args.egress), ("allow_cidrs", args.egress_cidr)) if v is not None}
    if egress:
        out["egress"] = egress
    return out


def cmd_location_add(ctx: _Context) -> int:
    record = ctx.registry.add(ctx.args.deployment, {"name": ctx.args.name, **_changes(ctx.args)})
    print(f"added {record.spec.name} (relay port {record.relay_port}, queue {record.spec.queue})")
    return _after_change(ctx)


def cmd_location_update(ctx: _Context) -> int:
    before = ctx.registry.get(ctx.args.deployment, ctx.args.name)
    record = ctx.registry.update(ctx.args.deployment, ctx.args.name, _changes(ctx.args))
    changed = before is None or record.version != before.version
    print(f"{'updated' if changed else 'unchanged:'} {record.spec.name} (version {record.version})")
    return _after_change(ctx) if changed else 0


def cmd_location_remove(ctx: _Context) -> int:
    ctx.registry.remove(ctx.args.deployment, ctx.args.name, purge=ctx.args.purge)
    print(f"removed {ctx.args.name}" + (" (its artifact volume will be deleted on the appliance)"
                                         if ctx.args.purge else " (its artifact volume stays on the appliance)"))
    return _after_change(ctx)


def _as_dict(r: LocationRecord) -> dict[str, Any]:
    return {"deployment": r.deployment, **r.spec.entry(with_queue=True), "relay_port": r.relay_port,
            "version": r.version, "created_at": r.created_at, "updated_at": r.updated_at}


def cmd_location_list(ctx: _Context) -> int:
    records = ctx.registry.list(ctx.args.deployment)
    states = {(r.deployment, r.spec.name): observed_state(ctx.store, r)[:2] for r in records}
    if ctx.args.json:
        print(json.dumps([{**_as_dict(r), "state": states[(r.deployment, r.spec.name)][0],
                           "error": states[(r.deployment, r.spec.name)][1]} for r in records], indent=2))
        return 0
    print(f"{'NAME':<24} {'STATE':<9} {'QUEUE':<12} {'PORT':<6} {'VER':<4} {'TARGET':<32} IMAGE")
    for r in records:
        target = f"module:{r.spec.module}" if r.spec.module else f"package:{r.spec.package}"
        state, error = states[(r.deployment, r.spec.name)]
        print(f"{r.spec.name:<24} {state:<9} {r.spec.queue:<12} {r.relay_port:<6} {r.version:<4} {target:<32} "
              f"{r.spec.image}")
        for line in (error or "").splitlines()[-6:]:
            print(f"    {line}")
    return 0


def cmd_deploy(ctx: _Context) -> int:
    """Add or replace the locations of a dagster_cloud.yaml, then wait until each is LOADED (or say why not)."""
    images = {}
    for item in ctx.args.image:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref:
            raise UsageError("deploy", f"--image {item!r}: give LOCATION=IMAGE, e.g. acme=sha256:<id>")
        images[name] = ref
    result = deploy(ctx.registry, ctx.store, ctx.args.file, ctx.args.deployment, wait_seconds=ctx.args.wait,
                    images=images, on_change=lambda: _after_change(ctx))
    for o in result.outcomes:
        print(f"{o.name}: {o.change}, {o.state}")
        for line in (o.error or "").splitlines()[-12:] if o.state != "LOADED" else ():
            print(f"    {line}")
    if not result.ok:
        print(f"airlock-cp: deploy failed: {', '.join(o.name for o in result.outcomes if o.state != 'LOADED')} "
              "not LOADED (`airlock-cp location list` shows the state; the Dagster UI the load error)",
              file=sys.stderr)
    return 0 if result.ok else 1


def cmd_apply(ctx: _Context) -> int:
    result = ctx.registry.apply(ctx.args.file, ctx.args.deployment)
    for label, names in (("added", result.added), ("updated", result.updated), ("removed", result.removed),
                         ("unchanged", result.unchanged)):
        print(f"{label}: {', '.join(names) or '-'}")
    return _after_change(ctx) if result.added or result.updated or result.removed else 0


def cmd_workspace_render(ctx: _Context) -> int:
    text = render_workspace(ctx.registry.list(ctx.args.deployment), ctx.args.relay_host)
    if ctx.args.out is None:
        sys.stdout.write(text)
        return 0
    written = write_workspace(ctx.args.out, text)
    print(f"{'wrote' if written else 'unchanged:'} {ctx.args.out}")
    return _reload(ctx) if ctx.args.reload else 0


def _after_change(ctx: _Context) -> int:
    """Re-render the configured workspace.yaml (and reload the webserver) so the UI sees the change now."""
    if not ctx.args.workspace:
        return 0
    write_workspace(ctx.args.workspace, render_workspace(ctx.registry.list(ctx.args.deployment), ctx.args.relay_host))
    print(f"rendered {ctx.args.workspace}")
    return _reload(ctx) if ctx.args.webserver_url else 0


def _reload(ctx: _Context) -> int:
    if not ctx.args.webserver_url:
        raise UsageError("workspace render", "--reload needs --webserver-url (or its env var)")
    try:
        loads = reload(ctx.args.webserver_url)
    except WorkspaceReloadError as exc:
        print(f"airlock-cp: the registry changed, but the webserver did not reload: {exc}; dagster-daemon still "
              "picks the file up within a minute; retry with `airlock-cp workspace render --out ... --reload`",
              file=sys.stderr)
        return 1
    for load in loads:
        if load.error:  # e.g. UNAVAILABLE until the appliance has started the location's code server
            print(f"webserver: {load.name} ERROR (airlock reloads it when its appliance reports a change): "
                  f"{load.error.strip()}")
        else:
            print(f"webserver: {load.name} {load.state}")
    return 0


def cmd_tls_init(args: argparse.Namespace) -> int:
    """The gateway's CA and certificate, made once by the operator; needs no database."""
    files = tls_files(args.out)
    present = [p.name for p in (files.ca_cert, files.cert, files.key) if p.exists()]
    if present and not args.force:
        raise UsageError("tls init", f"{args.out} already holds {', '.join(present)}; --force replaces them "
                          "(every appliance then needs the new ca.pem)")
    if not args.hostnames:
        raise UsageError("tls init", "give the names appliances reach the gateway by, e.g. "
                          "--hostnames cp.example.internal,10.0.0.5 (or AIRLOCK_CP_TLS_HOSTNAMES)")
    create_tls(args.out, list(args.hostnames), days=args.days)
    print(f"CA certificate:      {files.ca_cert}  <- give this file to every appliance (AIRLOCK_CA_FILE)")
    print(f"  sha256:            {fingerprint(files.ca_cert)}")
    print(f"gateway certificate: {files.cert}  for {', '.join(args.hostnames)}, valid {args.days} days")
    print(f"gateway key:         {files.key}  (0600; the CA's key was not kept)")
    return 0


def _hostnames(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no host; give e.g. cp.example.internal,10.0.0.5")
    return names


# -- parser -----------------------------------------------------------------------------------------------
def _location_flags(p: argparse.ArgumentParser, *, adding: bool) -> None:
    p.add_argument("name")
    p.add_argument("--image", required=adding, help="pinned: 'sha256:<image id>' for an image on the appliance's host "
                   "(docker inspect --format '{{.Id}}' IMAGE), or 'repository@sha256:<digest>' for a registry image")
    target = p.add_mutually_exclusive_group(required=adding)
    target.add_argument("--module")
    target.add_argument("--package")
    p.add_argument("--env", action="append", type=_env_pair, metavar="KEY=VALUE", help="repeat; replaces all env")
    p.add_argument("--queue", default=DEFAULT_QUEUE if adding else None, help="agent queue (label) that serves it")
    p.add_argument("--memory", help="e.g. 512m (default: the appliance's)")
    p.add_argument("--cpus", type=float)
    p.add_argument("--pids", type=int)
    p.add_argument("--egress", action="append", metavar="HOST:PORT", help="repeat; replaces the allow list")
    p.add_argument("--egress-cidr", action="append", metavar="CIDR", help="repeat; replaces allow_cidrs")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    settings = ControlPlaneSettings.from_env()
    parser = argparse.ArgumentParser(prog="airlock-cp", description="airlock control plane administration")
    parser.add_argument("--db", default=settings.database_url,
                        help="SQLAlchemy URL (AIRLOCK_CP_DB, else AIRLOCK_CP_POSTGRES_*, else SQLite in the state dir)")
    ports = env.get("AIRLOCK_CP_RELAY_PORTS", "{}-{}".format(*DEFAULT_PORT_RANGE))
    parser.add_argument("--relay-ports", type=_port_range, default=ports,
                        help="range relay ports are allocated from (AIRLOCK_CP_RELAY_PORTS)")
    parser.add_argument("--relay-host", default=env.get("AIRLOCK_CP_RELAY_HOST", DEFAULT_RELAY_HOST))
    parser.add_argument("--workspace", default=env.get("AIRLOCK_CP_WORKSPACE"),
                        help="workspace.yaml to re-render after every location change (AIRLOCK_CP_WORKSPACE)")
    parser.add_argument("--webserver-url", default=env.get("AIRLOCK_CP_WEBSERVER_URL"),
                        help="dagster-webserver to reload after rendering (AIRLOCK_CP_WEBSERVER_URL)")
    deployment = argparse.ArgumentParser(add_help=False)
    deployment.add_argument("--deployment", default=env.get("AIRLOCK_CP_DEPLOYMENT", "default"))
    sub = parser.add_subparsers(dest="command", required=True)

    token = sub.add_parser("agent-token").add_subparsers(dest="action", required=True)
    p = token.add_parser("create", parents=[deployment], help="print a one-time enrollment token")
    p.add_argument("--ttl", type=_duration, default=3600.0, help="e.g. 30m, 1h (default), 7d")
    p.set_defaults(func=cmd_token_create)

    agent = sub.add_parser("agent").add_subparsers(dest="action", required=True)
    p = agent.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_agent_list)
    p = agent.add_parser("revoke")
    p.add_argument("agent_id")
    p.set_defaults(func=cmd_agent_revoke)

    p = sub.add_parser("audit", help="latest audit log entries, newest first")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_audit)

    location = sub.add_parser("location").add_subparsers(dest="action", required=True)
    p = location.add_parser("add", parents=[deployment])
    _location_flags(p, adding=True)
    p.set_defaults(func=cmd_location_add)
    p = location.add_parser("update", parents=[deployment], help="change only the fields given")
    _location_flags(p, adding=False)
    p.set_defaults(func=cmd_location_update)
    p = location.add_parser("remove", parents=[deployment])
    p.add_argument("name")
    p.add_argument("--purge", action="store_true",
                   help="also delete the location's artifact volume (its IO manager files) on the appliance")
    p.set_defaults(func=cmd_location_remove)
    p = location.add_parser("list", parents=[deployment])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_location_list)

    p = sub.add_parser("deploy", parents=[deployment], help="add or replace the locations of a dagster_cloud.yaml, "
                       "then wait until each is LOADED (non-zero exit if one is not)")
    p.add_argument("file", help="a dagster_cloud.yaml (Dagster+'s format; see controlplane/deploy.py)")
    p.add_argument("--wait", type=_duration, default=300.0, help="how long to wait for LOADED (default 300s)")
    p.add_argument("--image", action="append", default=[], metavar="LOCATION=IMAGE",
                   help="the image CI just built for a location, instead of the file's (repeatable)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("apply", parents=[deployment], help="make the deployment's locations equal a locations.yaml")
    p.add_argument("file")
    p.set_defaults(func=cmd_apply)

    workspace = sub.add_parser("workspace").add_subparsers(dest="action", required=True)
    p = workspace.add_parser("render", parents=[deployment], help="Dagster workspace.yaml (stdout, or --out)")
    p.add_argument("--out")
    p.add_argument("--reload", action="store_true", help="then ask --webserver-url to reload it")
    p.set_defaults(func=cmd_workspace_render)

    tls = sub.add_parser("tls").add_subparsers(dest="action", required=True)
    p = tls.add_parser("init", help="make the gateway's CA and certificate (no database needed)")
    p.add_argument("--hostnames", type=_hostnames, default=settings.tls_hostnames if
                   env.get("AIRLOCK_CP_TLS_HOSTNAMES") else (), metavar="NAME[,NAME...]",
                   help="DNS names and IP addresses appliances reach the gateway by (AIRLOCK_CP_TLS_HOSTNAMES)")
    p.add_argument("--out", default=settings.tls_dir, help="directory for ca.pem, gateway.pem, gateway.key "
                   "(default: AIRLOCK_CP_TLS_DIR, else <state dir>/tls, where the gateway reads them)")
    p.add_argument("--days", type=int, default=825, help="validity of both certificates (default 825)")
    p.add_argument("--force", action="store_true", help="replace an existing CA and certificate")
    p.set_defaults(offline=cmd_tls_init)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = None
    try:
        if hasattr(args, "offline"):
            return int(args.offline(args))
        ctx = _Context(args)
        return int(args.func(ctx))
    except (PolicyError, UsageError) as exc:
        print(f"airlock-cp: error: {exc}", file=sys.stderr)
        return 2
    except sa.exc.SQLAlchemyError as exc:
        where = sa.make_url(args.db).render_as_string(hide_password=True)
        print(f"airlock-cp: database {where}: {exc.__class__.__name__}: {exc.args[0] if exc.args else exc}",
              file=sys.stderr)
        return 1
    finally:
        if ctx is not None:
            ctx.engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
