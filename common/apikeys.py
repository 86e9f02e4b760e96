"""API keys: the one service that creates, lists, changes and revokes them (the admin API and the CLI
both call it; neither has SQL of its own). A secret is shown once and stored as its SHA-256.

Every committed change bumps ``<prefix>:keys:version`` in Redis: each API process compares it at most
every ``VERSION_CHECK_SECONDS`` (api/auth.py) and reloads its key set when it moved, so a create,
update or revoke takes effect everywhere within about a second, with no restart. Workers never look a
key up: a job carries its key's own limits in its spec (common/contract.py).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from common.db import ApiKey
from common.errors import InvalidRequest, JobConflict, NotFound
from common.keyschema import KeyCreate, KeyRecord, KeyUpdate
from common.registry import Limits

log = logging.getLogger(__name__)

SECRET_PREFIX = "sk-gw-"
#: who calls when auth is open (GATEWAY_AUTH=off, or auto with no key yet): the owner of the jobs and usage
#: rows of such calls. No key id looks like it (theirs are ``key_<hex>``), so no key inherits them.
ANONYMOUS = "anonymous"
PAGE_DEFAULT, PAGE_MAX = 50, 200
#: more work for a key change's transaction (common/keybudgets.py writes the key's budgets in it)
Within = Callable[[Session, "ApiKey"], None]


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def version_key(prefix: str) -> str:
    """The Redis counter every committed key change bumps."""
    return f"{prefix}:keys:version"


def key_view(row: ApiKey) -> dict[str, Any]:
    """A key as the admin API and the CLI show it: everything but its hash."""
    def stamp(value: datetime | None) -> str | None:
        return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")

    return {"id": row.id, "object": "api_key", "name": row.name, "prefix": row.prefix, "role": row.role,
            "created_at": stamp(row.created_at), "expires_at": stamp(row.expires_at),
            "last_used_at": stamp(row.last_used_at), "revoked_at": stamp(row.revoked_at),
            "allowed_models": row.allowed_models, "metadata": row.meta, "limits": row.limits,
            "team": row.team}


@dataclass(frozen=True)
class Page:
    """One page of keys in creation order; ``next_cursor`` (the last key's id) fetches the next."""

    keys: list[ApiKey]
    has_more: bool

    @property
    def next_cursor(self) -> str | None:
        return self.keys[-1].id if self.has_more and self.keys else None


class KeyService:
    """``redis_client`` None (a CLI without ``REDIS_URL``): changes are not signalled and reach the
    API processes at their next periodic reload (``CACHE_SECONDS``)."""

    def __init__(self, sessions: sessionmaker, redis_client: redis.Redis | None = None,
                 prefix: str = "gw") -> None:
        self.sessions = sessions
        self.redis = redis_client
        self.prefix = prefix

    # changes -----------------------------------------------------------------------------------
    def create(self, body: KeyCreate, within: Within | None = None) -> tuple[ApiKey, str]:
        """Create a key; returns it and its secret (shown once: only its hash is stored). ``within``
        runs in the same transaction (its failure creates nothing)."""
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(id="key_" + secrets.token_hex(8), name=body.name, key_hash=hash_secret(secret),
                     prefix=secret[:10], created_at=datetime.now(UTC), **_columns(body.model_dump(
                         exclude={"name"}, mode="python"), body))
        with self.sessions.begin() as session:
            session.add(row)
            if within is not None:
                within(session, row)
        self._changed()
        return row, secret

    def update(self, key_id: str, body: KeyUpdate, within: Within | None = None) -> ApiKey:
        """Change the fields ``body`` names (409 on a revoked key); ``within`` runs in the same
        transaction."""
        changes = body.changes()
        with self.sessions.begin() as session:
            row = self._row(session, key_id)
            if row.revoked_at is not None:
                raise JobConflict(f"API key '{key_id}' is revoked and cannot be changed", code="key_revoked")
            for column, value in _columns(changes, body).items():
                setattr(row, column, value)
            row.updated_at = datetime.now(UTC)
            if within is not None:
                within(session, row)
        self._changed()
        return row

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (idempotent: a revoked key keeps its first ``revoked_at``)."""
        with self.sessions.begin() as session:
            row = self._row(session, key_id)
            if row.revoked_at is None:
                row.revoked_at = datetime.now(UTC)
        self._changed()
        return row

    def touch(self, key_ids: Iterable[str], at: datetime) -> None:
        """Record that these keys were used (one statement for a batch; api/auth.py batches)."""
        ids = sorted(set(key_ids))
        if ids:
            with self.sessions.begin() as session:
                session.execute(update(ApiKey).where(ApiKey.id.in_(ids)).values(last_used_at=at))

    # reads -------------------------------------------------------------------------------------
    def get(self, key_id: str) -> ApiKey:
        with self.sessions() as session:
            return self._row(session, key_id)

    def list(self, *, limit: int = PAGE_DEFAULT, after: str | None = None) -> Page:
        """Keys in creation order, ``limit`` (1..PAGE_MAX) at a time, after the key ``after``."""
        if not 1 <= limit <= PAGE_MAX:
            raise InvalidRequest(f"limit must be between 1 and {PAGE_MAX}", param="limit")
        with self.sessions() as session:
            query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id).limit(limit + 1)
            if after is not None:
                cursor = session.get(ApiKey, after)
                if cursor is None:
                    raise InvalidRequest(f"after: no API key '{after}' to continue from", param="after")
                query = query.where(tuple_(ApiKey.created_at, ApiKey.id) > (cursor.created_at, cursor.id))
            rows = list(session.scalars(query))
        return Page(rows[:limit], len(rows) > limit)

    def records(self) -> dict[str, KeyRecord]:
        """``{key_hash: KeyRecord}`` of every key. Revoked and expired ones too: each gets its own 401,
        and in ``GATEWAY_AUTH=auto`` revoking the last key must not reopen the gateway."""
        with self.sessions() as session:
            rows = session.execute(select(ApiKey.key_hash, ApiKey.id, ApiKey.role, ApiKey.allowed_models,
                                          ApiKey.expires_at, ApiKey.limits, ApiKey.team, ApiKey.revoked_at))
            return {r.key_hash: KeyRecord(
                r.id, r.role, None if r.allowed_models is None else tuple(r.allowed_models), r.expires_at,
                None if r.limits is None else Limits(**r.limits), r.team, r.revoked_at is not None)
                for r in rows}

    def revoked_ids(self) -> set[str]:
        """The ids of every revoked key (workers refuse to start their queued jobs)."""
        with self.sessions() as session:
            return set(session.scalars(select(ApiKey.id).where(ApiKey.revoked_at.is_not(None))))

    def version(self) -> str | None:
        """The current change counter (None before the first change); raises redis errors."""
        if self.redis is None:
            return None
        value = self.redis.get(version_key(self.prefix))
        return None if value is None else value.decode() if isinstance(value, bytes) else str(value)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _row(session: Session, key_id: str) -> ApiKey:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"no API key with id '{key_id}'", param="id", code="key_not_found")
        return row

    def _changed(self) -> None:
        """Tell every API process that the key set changed. Redis down: they notice at their next
        periodic reload instead (the change itself is committed in Postgres)."""
        if self.redis is None:
            return
        try:
            self.redis.incr(version_key(self.prefix))
        except redis.RedisError as exc:
            log.warning("API key change committed but not signalled (Redis: %s); it takes effect at "
                        "each API process's next periodic reload", type(exc).__name__)


def _columns(fields: dict[str, Any], body: KeyCreate | KeyUpdate) -> dict[str, Any]:
    """Body fields → ApiKey columns (``metadata`` is the ``meta`` attribute; limits stored as JSON)."""
    out = {("meta" if name == "metadata" else name): value for name, value in fields.items()
           if name != "budgets"}   # not a column: common/keybudgets.py stores them
    if "limits" in out:
        out["limits"] = None if body.limits is None else body.limits.model_dump(exclude_none=True)
    return out
