"""API keys: created once (the secret is shown once), stored as SHA-256, checked on every request."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from common.db import ApiKey

SECRET_PREFIX = "sk-gw-"
#: who calls when auth is open (GATEWAY_AUTH=off, or auto with no key yet): the owner of the jobs and usage
#: rows of such calls. No key id looks like it (theirs are ``key_<hex>``), so no key inherits them.
ANONYMOUS = "anonymous"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(sessions: sessionmaker, name: str) -> tuple[str, str]:
    """Create a key; returns ``(key_id, secret)``. Only the hash of the secret is stored."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(8)
    with sessions.begin() as session:
        session.add(ApiKey(id=key_id, name=name, key_hash=hash_secret(secret), prefix=secret[:10]))
    return key_id, secret


def list_keys(sessions: sessionmaker) -> list[ApiKey]:
    with sessions() as session:
        return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(sessions: sessionmaker, key_id: str) -> bool:
    with sessions.begin() as session:
        result = session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                                 .values(revoked_at=datetime.now(UTC)))
        return bool(result.rowcount)


def active_key_hashes(sessions: sessionmaker) -> dict[str, str]:
    """``{key_hash: key_id}`` of every active key (the API caches this briefly)."""
    with sessions() as session:
        rows = session.execute(select(ApiKey.key_hash, ApiKey.id).where(ApiKey.revoked_at.is_(None)))
        return {key_hash: key_id for key_hash, key_id in rows}
