"""The durable half of an async job: its row in Postgres ``jobs``. The only code that writes it.

The API adds the row before the job's live state (``common/jobs.py``) exists and cancels it; the worker
marks it ``running`` and settles it — with the call's usage row in the same transaction, so an async
job's result and its bill commit together; the reconciler reads the rows whose live state Redis lost.
Every state written here is a :class:`~common.contract.JobState`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from common.apikeys import ANONYMOUS
from common.contract import TERMINAL, JobSpec, JobState, Kind, Mode
from common.db import Job, Usage
from common.outbox import RowOutcome

_FINAL = tuple(state.value for state in TERMINAL)


def insert_usage(session: Session, row: dict[str, Any]) -> None:
    """A usage row, at most once per ``call_id`` (a redelivered task never doubles a bill); the rollups
    follow in the same transaction (the ``usage_rollup`` trigger counts only rows really inserted)."""
    session.execute(insert(Usage).values(**row).on_conflict_do_nothing(index_elements=["call_id"]))


def settle_outcome(session: Session, outcome: RowOutcome) -> None:
    """Write an async job's outcome that came the long way (the outbox, or the reconciler's repair):
    its usage row (at most once per ``call_id``) and, if the row is not final yet, its final columns.
    A row that is final already keeps what it has: whoever settled it first wins, so the outbox and
    the repair may both run, in either order."""
    if outcome.usage_row is not None:
        insert_usage(session, outcome.usage_row)
    session.execute(update(Job).where(Job.id == outcome.job_id, Job.status.not_in(_FINAL))
                    .values(status=outcome.state.value, finished_at=outcome.finished_at,
                            **_outcome_columns(outcome.result, outcome.error, outcome.usage)))


class DuplicateKey(Exception):
    """A job under the same owner and Idempotency-Key already exists."""


class JobRows:
    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions

    def add(self, job_id: str, spec: JobSpec, *, max_wait: float,
            idempotency: tuple[str, str] | None = None) -> Job:
        """The row of a newly accepted async job, ``queued``, its deadline ``max_wait`` from now; with
        ``idempotency`` (key, body fingerprint) it raises :class:`DuplicateKey` if the owner already
        has a job under that key."""
        created = datetime.now(UTC)
        key, body = idempotency or (None, None)
        job = Job(id=job_id, api_key_id=spec.api_key_id, model=spec.model, provider=spec.provider,
                  request=spec.request, status=JobState.QUEUED.value, attempts=0, created_at=created,
                  deadline_at=created + timedelta(seconds=max_wait),
                  idempotency_key=key, idempotency_body=body, key_limits=spec.key_limits)
        try:
            with self.sessions.begin() as session:
                session.add(job)
        except IntegrityError as exc:
            if key is not None and "ix_jobs_idempotency" in str(exc):
                raise DuplicateKey(job_id) from None
            raise
        return job

    def by_idempotency_key(self, owner: str, key: str) -> Job | None:
        with self.sessions() as session:
            return session.scalars(select(Job).where(
                func.coalesce(Job.api_key_id, ANONYMOUS) == owner, Job.idempotency_key == key)).first()

    def get(self, job_id: str) -> Job | None:
        with self.sessions() as session:
            return session.get(Job, job_id)

    def started(self, job_id: str, attempt: int, spec: JobSpec | None = None) -> None:
        """``running`` at claim ``attempt``; with ``spec``, on the alias and provider it names (a job
        that moved runs where its spec now says)."""
        where = {} if spec is None else {"model": spec.model, "provider": spec.provider}
        self._update(job_id, status=JobState.RUNNING.value, started_at=_now(), attempts=attempt, **where)

    def moved(self, job_id: str, attempt: int, spec: JobSpec) -> None:
        """The job left claim ``attempt`` for another deployment (``workers/failover.py``): ``queued``
        again, on the alias and provider of its new ``spec`` — unless a later attempt already wrote
        the row (the new deployment's worker marked it started first: that row is the newer truth)."""
        with self.sessions.begin() as session:
            session.execute(update(Job).where(Job.id == job_id, Job.status.not_in(_FINAL),
                                              Job.attempts <= attempt)
                            .values(status=JobState.QUEUED.value, model=spec.model, provider=spec.provider))

    def settle(self, job_id: str, state: JobState, *, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None, usage: dict[str, Any] | None = None,
               usage_row: dict[str, Any] | None = None) -> None:
        """The job's final ``state`` with its ``result`` or ``error`` and ``usage`` (tokens, cost) and, in
        the same transaction, the usage row of the call that settled it. Columns left None keep their
        value."""
        outcome = _outcome_columns(result, error, usage)
        with self.sessions.begin() as session:
            if usage_row is not None:
                insert_usage(session, usage_row)
            session.execute(update(Job).where(Job.id == job_id)
                            .values(status=state.value, finished_at=_now(), **outcome))

    def settle_late(self, outcome: RowOutcome) -> None:
        """:func:`settle_outcome` in a transaction of its own."""
        with self.sessions.begin() as session:
            settle_outcome(session, outcome)

    def open_rows(self, *, grace_s: float, limit: int) -> list[Job]:
        """Rows still ``queued`` or ``running`` that were created more than ``grace_s`` ago, oldest first:
        the reconciler checks whether their live state settled without them."""
        with self.sessions() as session:
            return list(session.scalars(
                select(Job).where(Job.created_at < _now() - timedelta(seconds=grace_s),
                                  Job.status.in_((JobState.QUEUED.value, JobState.RUNNING.value)))
                .order_by(Job.created_at).limit(limit)).all())

    def cancelled(self, job_id: str) -> Job:
        """The API withdrew the queued job: ``cancelled``; returns the row as it is now."""
        with self.sessions.begin() as session:
            session.execute(update(Job).where(Job.id == job_id)
                            .values(status=JobState.CANCELLED.value, finished_at=_now()))
            job = session.get(Job, job_id, populate_existing=True)
        assert job is not None
        return job

    def lost_candidates(self, *, grace_s: float, stuck_s: float, limit: int) -> list[Job]:
        """Rows that may have lost their live state, oldest first: ``queued`` (older than ``grace_s``:
        the API writes the row a moment before the live state), or ``running`` for longer than
        ``stuck_s``, more than any run may take."""
        now = _now()
        with self.sessions() as session:
            return list(session.scalars(
                select(Job).where(Job.created_at < now - timedelta(seconds=grace_s), or_(
                    Job.status == JobState.QUEUED.value,
                    (Job.status == JobState.RUNNING.value)
                    & (Job.started_at < now - timedelta(seconds=stuck_s))))
                .order_by(Job.created_at).limit(limit)).all())

    def _update(self, job_id: str, **values: Any) -> None:
        with self.sessions.begin() as session:
            session.execute(update(Job).where(Job.id == job_id).values(**values))


def spec_of(job: Job) -> JobSpec:
    """The live spec of an async job, rebuilt from its durable row (the deadline is set anew)."""
    return JobSpec(Mode.ASYNC, Kind.CHAT, job.model, job.provider, job.request, job.api_key_id,
                   key_limits=job.key_limits)


def _outcome_columns(result: dict[str, Any] | None, error: dict[str, Any] | None,
                     usage: dict[str, Any] | None) -> dict[str, Any]:
    """The outcome columns that are set (None: the column keeps its value)."""
    return {k: v for k, v in (("result", result), ("error", error), ("usage", usage)) if v is not None}


def _now() -> datetime:
    return datetime.now(UTC)
