"""The code-location registry: what each deployment's agents should serve, and which relay port fronts it.

One table on the gateway's database. Each accepted change commits, then sends one RECONCILE_LOCATIONS item per
affected (deployment, agent queue) with that queue's *whole* desired set, read after the commit: agents never
merge deltas, and a lost item (or two racing writers' snapshots queued out of order) is healed by the next.
Specs are checked with the rules both sides share (protocol.locations.parse_location), so errors read as the
appliance's would, before anything reaches an agent; resource bounds are the appliance's policy and are enforced
there.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from controlplane.gateway.queue import WorkQueue
from protocol.errors import PolicyError
from protocol.fields import Fields, yaml_fields
from protocol.locations import parse_location
from protocol.work import WorkKind

__all__ = ["ApplyResult", "LocationRecord", "LocationSpec", "Registry", "RegistryError", "metadata",
           "parse_locations_file", "parse_spec"]

DEFAULT_QUEUE = "default"
DEFAULT_PORT_RANGE = (4100, 4299)
RECONCILE_TTL_SECONDS = 24 * 3600  # an agent that is down for a while still finds the latest desired set
_PINNED = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._/:-]*@)?sha256:[0-9a-f]{64}")

metadata = sa.MetaData()

locations = sa.Table(
    "airlock_locations", metadata,
    sa.Column("deployment", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("image", sa.Text, nullable=False),
    sa.Column("module", sa.String(255)), sa.Column("package", sa.String(255)),  # exactly one is set
    sa.Column("env", sa.Text, nullable=False),  # JSON object
    sa.Column("resources", sa.Text, nullable=False),  # JSON: memory (bytes), cpus, pids; absent = appliance default
    sa.Column("egress", sa.Text, nullable=False),  # JSON: {"allow": [host:port], "allow_cidrs": [cidr]}
    sa.Column("queue", sa.String(128), nullable=False),  # the agent queue (label) that serves it
    sa.Column("relay_port", sa.Integer, nullable=False, unique=True),  # one host, so unique across deployments
    sa.Column("version", sa.Integer, nullable=False),  # +1 on every change
    sa.Column("created_at", sa.Float, nullable=False), sa.Column("updated_at", sa.Float, nullable=False),
)


class RegistryError(PolicyError):
    """A registry operation was refused (unknown or duplicate location, no free relay port); nothing changed."""


@dataclass(frozen=True)
class LocationSpec:
    """A validated location as the operator declared it; equal specs mean nothing to redeploy."""

    name: str
    image: str
    module: str | None
    package: str | None
    env: tuple[tuple[str, str], ...]
    resources: tuple[tuple[str, int | float], ...]  # subset of memory/cpus/pids, sorted
    egress_allow: tuple[str, ...]
    egress_cidrs: tuple[str, ...]
    queue: str = DEFAULT_QUEUE

    def entry(self, *, with_queue: bool = False) -> dict[str, Any]:
        """This spec in locations.yaml shape; without the queue it is what the appliance's loader accepts."""
        out = {"name": self.name, "image": self.image,
               **({"module": self.module} if self.module else {"package": self.package}),
               "env": dict(self.env), "resources": dict(self.resources),
               "egress": {"allow": list(self.egress_allow), "allow_cidrs": list(self.egress_cidrs)}}
        return {**out, "queue": self.queue} if with_queue else out


@dataclass(frozen=True)
class LocationRecord:
    deployment: str
    spec: LocationSpec
    relay_port: int
    version: int
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class ApplyResult:
    added: tuple[str, ...]
    updated: tuple[str, ...]
    removed: tuple[str, ...]
    unchanged: tuple[str, ...]


def parse_spec(f: Fields) -> LocationSpec:
    """Validate one location mapping, e.g. `parse_spec(Fields("location add", entry))`; errors name the field."""
    queue = f.str("queue", DEFAULT_QUEUE, pattern=r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
    request = parse_location(f)
    _check_pinned(f, request.image)
    return LocationSpec(name=request.name, image=request.image, module=request.module, package=request.package,
                        env=request.env, resources=request.resources,
                        egress_allow=tuple(str(h) for h in request.egress_hosts),
                        egress_cidrs=tuple(str(c) for c in request.egress_cidrs), queue=queue)


def _check_pinned(f: Fields, image: str) -> None:
    """The control plane names images by digest only: a tag can move between the add and the launch."""
    if _PINNED.fullmatch(image):
        return
    if "@" in image or image.startswith("sha256:"):
        raise f.error("image", f"{image!r} has a malformed digest: expected '@sha256:' and 64 lowercase hex digits")
    repo = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    raise f.error("image", f"{image!r} is not pinned by digest (a tag can move). For an image built or loaded on "
                           f"the appliance's host use its id, 'sha256:<id>' (`docker inspect --format "
                           f"'{{{{.Id}}}}' {image}` prints it); for an image in a registry use "
                           f"'{repo}@sha256:<digest>' (`docker inspect --format '{{{{index .RepoDigests 0}}}}' "
                           f"{image}` prints it once the image was pushed or pulled)")


def parse_locations_file(path: str | Path) -> tuple[LocationSpec, ...]:
    """Read a whole desired set (`version: 1`, `locations: [...]`); a bad file raises before anything changes."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PolicyError(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    f = yaml_fields(text, str(path))
    specs: dict[str, LocationSpec] = {}
    for entry in f.children("locations"):
        spec = parse_spec(entry)
        if spec.name in specs:
            raise entry.error("name", f"duplicate location name {spec.name!r}")
        specs[spec.name] = spec
    f.done()
    return tuple(specs.values())


def _row_values(spec: LocationSpec) -> dict[str, Any]:
    entry = spec.entry(with_queue=True)
    return {**entry, "env": json.dumps(entry["env"]), "resources": json.dumps(entry["resources"]),
            "egress": json.dumps(entry["egress"]), "module": spec.module, "package": spec.package}


def _record(row: Any) -> LocationRecord:
    egress = json.loads(row.egress)
    spec = LocationSpec(row.name, row.image, row.module, row.package, tuple(sorted(json.loads(row.env).items())),
                        tuple(sorted(json.loads(row.resources).items())), tuple(egress["allow"]),
                        tuple(egress["allow_cidrs"]), row.queue)
    return LocationRecord(row.deployment, spec, row.relay_port, row.version, row.created_at, row.updated_at)


class Registry:
    """Add, update, remove and apply locations; each change commits, then the affected queues get their set."""

    def __init__(self, engine: sa.Engine, queue: WorkQueue, *, port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
                 clock: Callable[[], float] = time.time) -> None:
        low, high = port_range
        if not 0 < low <= high < 65536:
            raise ValueError(f"relay port range {low}-{high} is not within 1-65535 or is reversed")
        self._engine, self._queue, self._ports, self._clock = engine, queue, range(low, high + 1), clock
        self._sqlite = engine.dialect.name == "sqlite"

    def create_schema(self) -> None:
        metadata.create_all(self._engine, checkfirst=True)  # safe on every start

    def get(self, deployment: str, name: str) -> LocationRecord | None:
        return next(iter(self.list(deployment, name)), None)

    def list(self, deployment: str | None = None, name: str | None = None) -> tuple[LocationRecord, ...]:
        """Locations (of one deployment, or of all), ordered by deployment and name."""
        with self._engine.connect() as conn:
            return self._rows(conn, deployment, name)

    def add(self, deployment: str, entry: Mapping[str, Any], *, source: str = "location add") -> LocationRecord:
        spec = parse_spec(Fields(source, entry))
        with self._write(source) as conn:
            if self._rows(conn, deployment, spec.name):
                raise RegistryError(source, "name", f"location {spec.name!r} already exists in deployment "
                                                    f"{deployment!r}; use `location update` to change it")
            record = self._insert(conn, deployment, spec, self._free_ports(conn, 1, source)[0])
        self.publish(deployment, spec.queue)
        return record

    def update(self, deployment: str, name: str, changes: Mapping[str, Any], *,
               source: str = "location update") -> LocationRecord:
        """Given fields replace old ones; `resources`/`egress` merge per key (None unsets); `module` drops `package`."""
        if changes.get("name", name) != name:
            raise RegistryError(source, "name", "a location cannot be renamed; add the new name, then remove the old")
        with self._write(source) as conn:
            old = self._rows(conn, deployment, name, required_by=source)[0]
            merged = old.spec.entry(with_queue=True)
            for key, value in changes.items():
                if key in ("module", "package"):
                    merged.pop("package" if key == "module" else "module", None)
                nested = key in ("resources", "egress") and isinstance(value, Mapping)
                merged[key] = {**merged.get(key, {}), **value} if nested else value
            spec = parse_spec(Fields(source, merged))
            if spec == old.spec:
                return old
            record = self._replace(conn, old, spec)
        self.publish(deployment, spec.queue, old.spec.queue)
        return record

    def put(self, deployment: str, entry: Mapping[str, Any], *, source: str) -> tuple[LocationRecord, str]:
        """Add the location, or replace its whole spec: ("added" | "updated" | "unchanged")."""
        spec = parse_spec(Fields(source, entry))
        with self._write(source) as conn:
            old = next(iter(self._rows(conn, deployment, spec.name)), None)
            if old is not None and old.spec == spec:
                return old, "unchanged"
            record = (self._replace(conn, old, spec) if old is not None
                      else self._insert(conn, deployment, spec, self._free_ports(conn, 1, source)[0]))
        self.publish(deployment, spec.queue, *((old.spec.queue,) if old is not None else ()))
        return record, "added" if old is None else "updated"

    def remove(self, deployment: str, name: str, *, source: str = "location remove", purge: bool = False) -> None:
        """Remove the location; with `purge`, the appliance also deletes its artifact volume once nothing of it
        runs (without, the files stay, and adding the location back finds them)."""
        with self._write(source) as conn:
            old = self._rows(conn, deployment, name, required_by=source)[0]
            conn.execute(sa.delete(locations).where(locations.c.deployment == deployment, locations.c.name == name))
        self.publish(deployment, old.spec.queue, purge=(name,) if purge else ())

    def apply(self, path: str | Path, deployment: str) -> ApplyResult:
        """Make the deployment's registry equal the file: validate all of it first, then one transaction."""
        desired = {spec.name: spec for spec in parse_locations_file(path)}
        source, t = str(path), locations
        with self._write(source) as conn:
            current = {rec.spec.name: rec for rec in self._rows(conn, deployment)}
            added = [n for n in desired if n not in current]
            changed = [n for n in desired if n in current and desired[n] != current[n].spec]
            removed = [n for n in current if n not in desired]
            for n, port in zip(added, self._free_ports(conn, len(added), source), strict=True):
                self._insert(conn, deployment, desired[n], port)
            for n in changed:
                self._replace(conn, current[n], desired[n])
            conn.execute(sa.delete(t).where(t.c.deployment == deployment, t.c.name.in_(removed)))
        self.publish(deployment, *(desired[n].queue for n in added + changed),
                     *(current[n].spec.queue for n in changed + removed))
        unchanged = tuple(n for n in desired if n in current and n not in changed)
        return ApplyResult(tuple(added), tuple(changed), tuple(removed), unchanged)

    def desired_for_queue(self, deployment: str, queue: str, purge: tuple[str, ...] = ()) -> dict[str, Any]:
        """The RECONCILE_LOCATIONS payload: every location of this queue, each in the appliance's entry shape;
        `purge` names removed locations whose artifact volumes the appliance is to delete."""
        records = [r for r in self.list(deployment) if r.spec.queue == queue]
        payload = {"deployment": deployment, "queue": queue, "as_of": self._clock(),
                   "locations": [r.spec.entry() for r in records]}
        return payload | ({"purge": list(purge)} if purge else {})

    def publish(self, deployment: str, *queues: str, purge: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Send each queue its desired set (again, e.g. when an agent comes back); returns the work item ids."""
        return tuple(self._queue.enqueue(deployment, q, WorkKind.RECONCILE_LOCATIONS.value,
                                         self.desired_for_queue(deployment, q, purge),
                                         ttl_seconds=RECONCILE_TTL_SECONDS)
                     for q in sorted(set(queues)))

    @staticmethod
    def _rows(conn: sa.Connection, deployment: str | None, name: str | None = None, *,
              required_by: str | None = None) -> tuple[LocationRecord, ...]:
        t = locations
        stmt = sa.select(t).order_by(t.c.deployment, t.c.name)
        stmt = stmt if deployment is None else stmt.where(t.c.deployment == deployment)
        rows = tuple(_record(row) for row in conn.execute(stmt if name is None else stmt.where(t.c.name == name)))
        if required_by and not rows:
            raise RegistryError(required_by, "name", f"no location {name!r} in deployment {deployment!r}")
        return rows

    def _free_ports(self, conn: sa.Connection, count: int, source: str) -> tuple[int, ...]:
        """The lowest `count` ports of the range that no location holds; a removed location's port is free."""
        held = set(conn.execute(sa.select(locations.c.relay_port)).scalars())
        free = tuple(p for p in self._ports if p not in held)[:count]
        if len(free) < count:
            raise RegistryError(source, "relay_port", f"no free relay port in {self._ports[0]}-{self._ports[-1]} "
                                f"({len(held)} held); widen the range (--relay-ports or AIRLOCK_CP_RELAY_PORTS)")
        return free

    def _insert(self, conn: sa.Connection, deployment: str, spec: LocationSpec, port: int) -> LocationRecord:
        now = self._clock()
        conn.execute(sa.insert(locations).values(deployment=deployment, relay_port=port, version=1,
                                                 created_at=now, updated_at=now, **_row_values(spec)))
        return LocationRecord(deployment, spec, port, 1, now, now)

    def _replace(self, conn: sa.Connection, old: LocationRecord, spec: LocationSpec) -> LocationRecord:
        """Same relay port, version + 1: the port lives as long as the location."""
        t, now = locations, self._clock()
        conn.execute(sa.update(t).where(t.c.deployment == old.deployment, t.c.name == old.spec.name)
                     .values(version=old.version + 1, updated_at=now, **_row_values(spec)))
        return LocationRecord(old.deployment, spec, old.relay_port, old.version + 1, old.created_at, now)

    @contextmanager
    def _write(self, source: str) -> Iterator[sa.Connection]:
        """One write transaction (BEGIN IMMEDIATE on SQLite); a lost race on name or port is a clear error."""
        try:
            with self._engine.connect() as conn:
                if self._sqlite:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                yield conn
                conn.commit()
        except sa.exc.IntegrityError as exc:
            raise RegistryError(source, "name", "another process changed this location or took its relay port "
                                                "at the same moment; try again") from exc
