"""Postgres: the durable half of the gateway's state (async jobs, API keys, usage).

The schema changes only through Alembic (``migrations/``); :func:`migrate` applies it. Engines and
session factories are built here from a URL and handed to whoever needs them.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, DateTime, Index, Integer, Numeric, String, Text, create_engine, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    """A client credential. Only the SHA-256 of the secret is stored; ``prefix`` lets people tell keys
    apart."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the admin API's fields (migration 0004; common/apikeys.py validates and documents them)
    role: Mapped[str] = mapped_column(String(16), server_default="client")
    allowed_models: Mapped[list[str] | None] = mapped_column(JSONB)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, server_default="{}")
    limits: Mapped[dict[str, int] | None] = mapped_column(JSONB)
    team: Mapped[str | None] = mapped_column(String(100))
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    """An async job (``POST /v1/jobs``): survives API restarts and worker crashes."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(100))
    request: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(16), index=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deadline_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the caller's Idempotency-Key and its body's fingerprint; unique per owner (migration 0003)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    idempotency_body: Mapped[str | None] = mapped_column(String(64))
    # the calling key's own limits when the job was accepted (JobSpec.key_limits; migration 0004)
    key_limits: Mapped[dict[str, int] | None] = mapped_column(JSONB)


class Usage(Base):
    """One row per upstream call. ``call_id`` is unique so a redelivered task never writes twice."""

    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_created_at", "created_at"), Index("ix_usage_api_key_id", "api_key_id"))

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(String(80), unique=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(100))
    provider_model: Mapped[str] = mapped_column(String(200))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(18, 10), default=Decimal(0))
    queue_wait_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    upstream_latency_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    first_token_ms: Mapped[int | None] = mapped_column(BigInteger)   # streams: call start → first chunk
    outcome: Mapped[str] = mapped_column(String(40))
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class _UsageRollup:
    """Counters of the usage rows of one bucket × key × model × provider (migration 0005). Written only by
    the ``usage_rollup`` trigger on ``usage`` (each row really inserted, counted once); read by
    ``common/usage/``. ``api_key_id`` is ``anonymous`` for calls made while auth was open."""

    bucket: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    provider: Mapped[str] = mapped_column(String(100), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)   # rows whose outcome is not 'success'
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(38, 10))
    queue_wait_ms: Mapped[int] = mapped_column(BigInteger)        # sums: divided by requests for means
    upstream_latency_ms: Mapped[int] = mapped_column(BigInteger)


class UsageHourly(_UsageRollup, Base):
    __tablename__ = "usage_hourly"


class UsageDaily(_UsageRollup, Base):
    __tablename__ = "usage_daily"


def make_engine(database_url: str, *, pool_size: int = 10) -> Engine:
    return create_engine(database_url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
                         pool_recycle=1800)


def make_session_factory(database_url: str | Engine, *, pool_size: int = 10) -> sessionmaker:
    engine = (database_url if isinstance(database_url, Engine)
              else make_engine(database_url, pool_size=pool_size))
    return sessionmaker(engine, expire_on_commit=False)


def migrate(database_url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with Alembic (idempotent; safe to run at every start-up)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.upgrade(config, revision)
