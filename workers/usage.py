"""Writing what an upstream call cost, and settling async jobs, in Postgres.

A usage row's ``call_id`` (``<job>:<attempt>:<try>``) is unique and the insert is
``ON CONFLICT DO NOTHING``: a redelivered task that repeats a write never doubles a bill.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import sessionmaker

from common.db import Job, Usage


@dataclass(frozen=True)
class UsageRecord:
    call_id: str
    job_id: str
    api_key_id: str | None
    model: str
    provider: str
    provider_model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    queue_wait_ms: int
    upstream_latency_ms: int
    outcome: str
    status_code: int | None
    error: str | None = None


class UsageLedger:
    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions

    def record(self, usage: UsageRecord | None, *, job_update: dict[str, Any] | None = None,
               job_id: str | None = None) -> None:
        """Write a usage row (at most once per call_id) and, for async jobs, the job's new state,
        in one transaction."""
        with self.sessions.begin() as session:
            if usage is not None:
                session.execute(insert(Usage).values(**usage.__dict__)
                                .on_conflict_do_nothing(index_elements=["call_id"]))
            if job_update and job_id:
                session.execute(update(Job).where(Job.id == job_id).values(**job_update))

    def mark_job(self, job_id: str, **values: Any) -> None:
        self.record(None, job_update=values, job_id=job_id)

    def load_job(self, job_id: str) -> Job | None:
        with self.sessions() as session:
            return session.get(Job, job_id)


def now() -> datetime:
    return datetime.now(UTC)
