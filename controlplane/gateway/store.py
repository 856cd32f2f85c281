"""Who may talk to the gateway: enrollment tokens, agents and their keys, and the audit log.

SQLAlchemy Core on the same database as the work queue (SQLite by default, Postgres on-prem).
Tokens are stored hashed; they are one-time and expire.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from protocol.errors import PermanentError

metadata = sa.MetaData()

enrollment_tokens = sa.Table(
    "airlock_enrollment_tokens", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("deployment", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("used_at", sa.Float),
    sa.Column("used_by", sa.String(64)),
)

agents = sa.Table(
    "airlock_agents", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("deployment", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(80), nullable=False, unique=True),
    sa.Column("public_key", sa.Text, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # active | revoked
    sa.Column("enrolled_at", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float),
    sa.Column("heartbeat", sa.Text),
)

# Keys an agent rotated away from: accepted until valid_until (the grace period), refused after.
old_keys = sa.Table(
    "airlock_agent_old_keys", metadata,
    sa.Column("key_id", sa.String(80), primary_key=True),
    sa.Column("agent_id", sa.String(64), nullable=False, index=True),
    sa.Column("public_key", sa.Text, nullable=False),
    sa.Column("rotated_at", sa.Float, nullable=False),
    sa.Column("valid_until", sa.Float, nullable=False),
)

audit_log = sa.Table(
    "airlock_audit_log", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("key_id", sa.String(80)),
    sa.Column("agent_id", sa.String(64)),
    sa.Column("operation", sa.String(200), nullable=False),
    sa.Column("accepted", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)


@dataclass(frozen=True)
class AgentRecord:
    """An agent as seen through one of its keys: `key_id`/`public_key` are that key, `status` is the agent's
    (active | revoked), or "retired" when the key is an old one past its grace period."""

    id: str
    deployment: str
    key_id: str
    public_key: str
    labels: tuple[str, ...]
    status: str
    current: bool = True  # False: a key rotated away from (still accepted until `valid_until`)
    valid_until: float | None = None


@dataclass(frozen=True)
class AuditEntry:
    at: float
    key_id: str | None
    agent_id: str | None
    operation: str
    accepted: bool
    reason: str


@dataclass(frozen=True)
class LocationState:
    """One agent's last word on one location: LOADING, LOADED or ERROR, with the reason when there is one."""

    agent_id: str
    queues: tuple[str, ...]
    name: str
    state: str
    error: str | None
    seen: float
    container: str | None = None  # the code server container serving it: a new one after a change of spec


class EnrollmentError(PermanentError):
    """The enrollment token is unknown, used or expired (the message says which)."""


class RotationError(PermanentError):
    """A key rotation that cannot be applied (the message says why); nothing was changed."""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AgentStore:
    def __init__(self, engine: sa.Engine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine, self.clock = engine, clock

    def create_schema(self) -> None:
        metadata.create_all(self.engine)

    # -- enrollment -------------------------------------------------------------------------------
    def create_token(self, deployment: str, ttl_seconds: float = 3600) -> str:
        token = "airlock-enroll-" + secrets.token_urlsafe(32)
        now = self.clock()
        with self.engine.begin() as conn:
            conn.execute(enrollment_tokens.insert().values(
                token_hash=_hash(token), deployment=deployment, created_at=now, expires_at=now + ttl_seconds))
        return token

    def enroll(self, token: str, key_id: str, public_key: str, labels: tuple[str, ...]) -> AgentRecord:
        """Consume the token and register the key, atomically: a token enrolls exactly one agent."""
        now = self.clock()
        agent_id = "agent-" + uuid.uuid4().hex[:12]
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(enrollment_tokens).where(
                enrollment_tokens.c.token_hash == _hash(token))).first()
            if row is None:
                raise EnrollmentError("unknown enrollment token")
            if row.used_at is not None:
                raise EnrollmentError("enrollment token already used")
            if row.expires_at < now:
                raise EnrollmentError("enrollment token expired")
            if conn.execute(sa.select(agents.c.id).where(agents.c.key_id == key_id)).first():
                raise EnrollmentError("this key is already enrolled")
            claimed = conn.execute(enrollment_tokens.update().where(
                (enrollment_tokens.c.token_hash == row.token_hash) & enrollment_tokens.c.used_at.is_(None)
            ).values(used_at=now, used_by=agent_id))
            if claimed.rowcount != 1:
                raise EnrollmentError("enrollment token already used")
            conn.execute(agents.insert().values(
                id=agent_id, deployment=row.deployment, key_id=key_id, public_key=public_key,
                labels=json.dumps(list(labels)), status="active", enrolled_at=now))
        return AgentRecord(agent_id, row.deployment, key_id, public_key, labels, "active")

    # -- agents -----------------------------------------------------------------------------------
    def by_key(self, key_id: str) -> AgentRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(agents).where(agents.c.key_id == key_id)).first()
            if row is not None:
                return AgentRecord(row.id, row.deployment, row.key_id, row.public_key,
                                   tuple(json.loads(row.labels)), row.status)
            old = conn.execute(sa.select(old_keys, agents.c.deployment, agents.c.labels, agents.c.status).join(
                agents, agents.c.id == old_keys.c.agent_id).where(old_keys.c.key_id == key_id)).first()
        if old is None:
            return None
        status = old.status if old.status != "active" or self.clock() < old.valid_until else "retired"
        return AgentRecord(old.agent_id, old.deployment, old.key_id, old.public_key, tuple(json.loads(old.labels)),
                           status, current=False, valid_until=old.valid_until)

    def rotate_key(self, agent_id: str, old_key_id: str, new_key_id: str, new_public_key: str,
                   grace_seconds: float) -> float:
        """Make `new_key_id` the agent's key; the old one stays valid for `grace_seconds`. Returns until when.

        Atomic, and only from the agent's current key: a rotation raced by another, or signed by a key
        already rotated away from, changes nothing."""
        now = self.clock()
        with self.engine.begin() as conn:
            taken = conn.execute(sa.select(agents.c.id).where(agents.c.key_id == new_key_id)).first() or \
                conn.execute(sa.select(old_keys.c.key_id).where(old_keys.c.key_id == new_key_id)).first()
            if taken:
                raise RotationError(f"key {new_key_id} is already registered; generate a new one")
            row = conn.execute(sa.select(agents).where(agents.c.id == agent_id)).first()
            if row is None or row.status != "active":
                raise RotationError(f"agent {agent_id} is not active")
            changed = conn.execute(agents.update().where(agents.c.id == agent_id, agents.c.key_id == old_key_id)
                                   .values(key_id=new_key_id, public_key=new_public_key)).rowcount
            if changed != 1:
                raise RotationError(f"key {old_key_id} is not the current key of {agent_id}")
            conn.execute(old_keys.insert().values(key_id=old_key_id, agent_id=agent_id, public_key=row.public_key,
                                                  rotated_at=now, valid_until=now + grace_seconds))
        return now + grace_seconds

    def revoke(self, agent_id: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(agents.update().where(agents.c.id == agent_id).values(status="revoked")).rowcount == 1

    def record_heartbeat(self, agent_id: str, heartbeat: dict) -> None:
        with self.engine.begin() as conn:
            conn.execute(agents.update().where(agents.c.id == agent_id).values(
                last_seen=self.clock(), heartbeat=json.dumps(heartbeat)))

    def live_agents(self, deployment: str, queue: str, *, within_seconds: float = 30.0) -> int:
        """Active agents serving `queue` whose last heartbeat is recent: is anyone there to answer?"""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(agents.c.labels).where(
                agents.c.deployment == deployment, agents.c.status == "active",
                agents.c.last_seen >= self.clock() - within_seconds)).all()
        return sum(1 for row in rows if queue in json.loads(row.labels))

    def location_states(self, deployment: str, *, within_seconds: float = 60.0) -> list[LocationState]:
        """What each live agent of the deployment last said about its locations (its heartbeat), newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(agents.c.id, agents.c.labels, agents.c.last_seen, agents.c.heartbeat).where(
                agents.c.deployment == deployment, agents.c.status == "active",
                agents.c.last_seen >= self.clock() - within_seconds).order_by(agents.c.last_seen.desc())).all()
        out = []
        for row in rows:
            try:
                beat = json.loads(row.heartbeat or "{}")
            except ValueError:
                continue
            for loc in beat.get("locations") or []:
                if isinstance(loc, dict) and isinstance(loc.get("name"), str):
                    out.append(LocationState(agent_id=row.id, queues=tuple(json.loads(row.labels)),
                                             name=loc["name"], state=str(loc.get("state") or "UNKNOWN"),
                                             error=loc.get("error") or None, seen=row.last_seen,
                                             container=loc.get("container") or None))
        return out

    def list_agents(self) -> list[dict]:
        """Every agent with its keys: the current one, and old ones with the time they stop (or stopped) working."""
        with self.engine.connect() as conn:
            listed = [dict(row._mapping) for row in conn.execute(sa.select(agents).order_by(agents.c.enrolled_at))]
            old = conn.execute(sa.select(old_keys).order_by(old_keys.c.rotated_at)).all()
        now = self.clock()
        for agent in listed:
            agent["keys"] = [{"key_id": agent["key_id"], "state": "current"}] + [
                {"key_id": k.key_id, "state": "retiring" if now < k.valid_until else "retired",
                 "valid_until": k.valid_until} for k in old if k.agent_id == agent["id"]]
        return listed

    # -- audit ------------------------------------------------------------------------------------
    def audit(self, *, operation: str, accepted: bool, reason: str, key_id: str | None = None,
              agent_id: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(audit_log.insert().values(at=self.clock(), key_id=key_id, agent_id=agent_id,
                                                   operation=operation[:200], accepted=accepted, reason=reason))

    def audit_entries(self, limit: int = 100) -> list[AuditEntry]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)).all()
        return [AuditEntry(r.at, r.key_id, r.agent_id, r.operation, r.accepted, r.reason) for r in rows]
