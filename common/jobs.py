"""The live half of a job's state, in Redis: its spec, state machine, deadline and event stream.

Keys (``P`` is the settings' key prefix)::

    P:job:<id>          hash   spec, state, deadline, reply_to, timestamps, attempts, holder (the worker
                               process holding its delivery), abandoned (the API answered its caller
                               without it: never run again)
    P:job:<id>:events   stream the job's events (common/contract.py): chunk*, then one final event
    P:job:<id>:lease    string the running worker's execution id, with a TTL it renews (a dead worker's
                               lapses)
    P:job:<id>:abort    string the caller went away: the worker stops relaying
    P:reply:<api-id>    pubsub each event is also published to the channel of the API process waiting
    P:reply:<api-id>:alive  string that API process's heartbeat (a sync job whose API died never starts)
    P:lim:wake          pubsub a withdrawn job's id, for the worker holding it in a provider's line

The state machine is ``common/lua/job.lua``, the only code that writes a job's state; every arrow is
one atomic script, timed with Redis ``TIME``::

    queued ──claim──► running ──settle (emit)──► succeeded | failed | cancelled
       │                 ▲ └──(lease lapsed: worker died) claim again on redelivery
       ├──claim after deadline──► expired        (the worker never calls upstream)
       │  running ──move──► queued               (another deployment's queue: common/routing)
       └──withdraw──► expired | cancelled        (the API gave up waiting / the client cancelled)

Whoever moves a job out of ``queued`` first wins: a job the API withdrew can never start, and a
job that started is never reported as expired. A limited provider's job is claimed by the admission
script (``common/limits.py``), which calls the same Lua claim.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from common import lua
from common.budgets import BudgetRefusal, Reservation
from common.contract import (
    EVENT_TTL_S,
    WITHDRAWN,
    JobEvent,
    JobSpec,
    JobState,
    Start,
    parse_event,
    start_or_state,
    state_or_start,
)
from common.outbox import RowOutcome

WAKE_CHANNEL_SUFFIX = "lim:wake"  # pubsub: a job id whose waiting worker should try its line again


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


@dataclass(frozen=True)
class Claim:
    """What a worker may do with a delivered job: ``run`` it (``attempt``, how long it waited, and its
    spec if the claim read it), or not — ``expired``, ``busy`` (another worker runs it), ``missing``
    (Redis forgot it), or the terminal state it is already in."""

    outcome: Start | JobState
    attempt: int = 0
    queue_wait_s: float = 0.0
    spec: JobSpec | None = None
    lost_attempt: int = 0   # not run: the attempt a dead worker lost (the claim settled it cancelled)


@dataclass(frozen=True)
class StreamEvent:
    """A job event as read from its stream (or its pubsub copy): ``stream_id`` orders them."""

    stream_id: str
    event: JobEvent


CHUNK_BATCH = 256  # chunks per emit_chunks.lua call at most

# an API process's heartbeat: its queued sync jobs are cancelled this long after it dies
CALLER_ALIVE_TTL_S = 15.0

class JobStore:
    """Every Redis operation on jobs. Thread/greenlet-safe: it only holds a connection pool."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self._create = lua.register(client, "create")
        self._claim = lua.register(client, "claim")
        self._withdraw = lua.register(client, "withdraw")
        self._abandon = lua.register(client, "abandon")
        self._emit = lua.register(client, "emit")
        self._emit_chunks = lua.register(client, "emit_chunks")
        self._renew = lua.register(client, "renew_lease")
        self._move = lua.register(client, "move")

    # keys -----------------------------------------------------------------------------------
    @property
    def job_prefix(self) -> str:
        return f"{self.prefix}:job:"

    def job_key(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:events"

    def lease_key(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:lease"

    def abort_key(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:abort"

    def reply_channel(self, api_instance: str) -> str:
        return f"{self.prefix}:reply:{api_instance}"

    @staticmethod
    def alive_key(reply_channel: str) -> str:
        """The heartbeat of the API process listening on ``reply_channel`` (``job.lua`` derives it the
        same way from a job's ``reply_to``)."""
        return f"{reply_channel}:alive"

    @property
    def wake_channel(self) -> str:
        return f"{self.prefix}:{WAKE_CHANNEL_SUFFIX}"

    def stats_key(self, provider: str) -> str:
        return f"{self.prefix}:stats:{provider}"

    def usage_key(self) -> str:
        return f"{self.prefix}:usage"

    # the API's side -------------------------------------------------------------------------
    def create(self, job_id: str, spec: JobSpec, *, max_wait: float, reply_to: str, ttl: float,
               queue: str = "", message: str = "", only_if_missing: bool = False,
               budget: Reservation | None = None) -> float | None:
        """Record a new queued job and (with ``queue``) push its broker ``message`` in the same atomic
        step; returns its creation time (Redis clock, epoch seconds). With ``only_if_missing`` a job
        that exists is left as it is (None): whoever recreated it first wins. With ``budget`` its worst
        case is reserved in the same step, or — a budget refuses it — :class:`BudgetRefusal` is raised
        and nothing was recorded or queued."""
        created = self._create(keys=[self.job_key(job_id), queue or self.job_key(job_id)],
                               args=[spec.to_json(), max_wait, reply_to, int(ttl) + 1, message,
                                     1 if only_if_missing else 0, int(CALLER_ALIVE_TTL_S * 1000),
                                     1 if spec.key_limits else 0,
                                     *(budget.args() if budget is not None else [0])])
        if isinstance(created, list):
            if _text(created[0]) != "ok":
                raise BudgetRefusal(_text(created[0]), int(created[1]) - 1,
                                    tuple(int(n) for n in created[2:]))
            assert budget is not None
            numbers = [int(n) for n in created[2:]]
            budget.after[:] = [tuple(numbers[i:i + 6]) for i in range(0, len(numbers), 6)]
            return float(created[1])
        return float(created) if created else None

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.job_key(job_id)))

    def withdraw(self, job_id: str, new_state: JobState) -> JobState | Start:
        """Move a *queued* job to ``new_state`` so that it never runs; returns the resulting state.

        If the job already left ``queued`` (a worker claimed it) it is left alone and its current
        state is returned: the caller then knows the job will run or has run."""
        assert new_state in WITHDRAWN
        return state_or_start(_text(self._withdraw(keys=[self.job_key(job_id)],
                                                   args=[new_state.value, job_id, self.wake_channel])))

    def read_events(self, job_id: str, after: str = "0-0") -> list[StreamEvent]:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]],
                       self.redis.xrange(self.events_key(job_id), min=f"({after}" if after != "0-0" else "-"))
        return [StreamEvent(_text(sid), parse_event(json.loads(fields[b"e"]))) for sid, fields in entries]

    def abort(self, job_id: str) -> JobState | Start:
        """The caller went away: :meth:`abandon` the job as ``cancelled``. Returns the job's state."""
        return self.abandon(job_id, JobState.CANCELLED)

    def abandon(self, job_id: str, new_state: JobState) -> JobState | Start:
        """The API answered the job's caller without its result (504, 503, a disconnect): withdraw it
        to ``new_state`` if it is still queued; if it runs, mark it ``abandoned`` — a claim never
        starts it again (``job.lua``), so a worker's death cannot make it run twice for nobody — and
        ask its worker to stop relaying. One atomic step; returns the job's state afterwards."""
        assert new_state in WITHDRAWN
        return state_or_start(_text(self._abandon(keys=[self.job_key(job_id), self.abort_key(job_id)],
                                                  args=[new_state.value, job_id, self.wake_channel, 3600])))

    def aborted(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.abort_key(job_id)))

    def state(self, job_id: str) -> dict[str, str]:
        raw = self.redis.hgetall(self.job_key(job_id))
        return {_text(k): _text(v) for k, v in raw.items() if k != b"spec"}

    # the worker's side ----------------------------------------------------------------------
    def spec(self, job_id: str) -> JobSpec | None:
        """The job's spec as the API wrote it, with its deadline; None if Redis does not know it."""
        raw, deadline = cast(list[bytes], self.redis.hmget(self.job_key(job_id), "spec", "deadline"))
        return None if raw is None else JobSpec.parse(raw, float(deadline))

    def claim(self, job_id: str, execution: str, lease_ttl: float, *, with_spec: bool = True,
              holder: str = "") -> Claim:
        """Atomically take a delivered job for running (see the module's state machine), recording
        ``holder`` (the worker process) in the job. With ``with_spec`` a job that may run comes with
        its spec, read in the same step (a worker that already read it to learn the job's limits
        passes False: the spec is read once per job) — and a job whose key has limits of its own is
        not started but answered ``limited`` with its spec (it must wait in its provider's line)."""
        reply = self._claim(keys=[self.job_key(job_id), self.lease_key(job_id)],
                            args=[execution, int(lease_ttl * 1000), 1 if with_spec else 0, holder])
        outcome = start_or_state(_text(reply[0]))
        if outcome is Start.LIMITED:  # its key has limits of its own: it waits in line (runner.py)
            return Claim(outcome, spec=JobSpec.parse(reply[2], float(reply[3])))
        if outcome is not Start.RUN:
            return Claim(outcome, lost_attempt=int(reply[1]) if len(reply) > 1 else 0)
        spec = JobSpec.parse(reply[3], float(reply[4])) if with_spec else None
        return Claim(Start.RUN, int(reply[1]), float(reply[2]), spec)

    def move(self, job_id: str, execution: str, spec: JobSpec, *, queue: str, message: str) -> bool:
        """Put a job this execution runs back to ``queued`` with ``spec`` (another deployment) and its
        broker ``message`` onto ``queue``, in one step (``job.lua`` job_requeue). It keeps its id, its
        waiting caller and its deadline. False if the job is no longer ours to move."""
        return bool(self._move(keys=[self.job_key(job_id), self.lease_key(job_id), queue],
                               args=[execution, spec.to_json(), message]))

    def append_usage(self, row: dict[str, Any]) -> None:
        """A usage row onto the usage stream, which the ledger moves to Postgres (workers/usage.py)."""
        self.redis.xadd(self.usage_key(), {"u": json.dumps(row, separators=(",", ":"), default=str)})

    def renew_lease(self, job_id: str, execution: str, lease_ttl: float) -> bool:
        return bool(self._renew(keys=[self.lease_key(job_id)], args=[execution, int(lease_ttl * 1000)]))

    def renew_lease_in(self, batch: lua.ScriptBatch, job_id: str, execution: str, lease_ttl: float) -> int:
        """:meth:`renew_lease`, queued on ``batch`` (a worker renews all its jobs' leases in one trip)."""
        return batch.script(self._renew, [self.lease_key(job_id)], [execution, int(lease_ttl * 1000)])

    def completion_rate(self, provider: str, window_s: int = 60) -> float:
        """Jobs per second the provider's workers settled over the last ``window_s`` seconds."""
        return rate_of(self.redis.hgetall(self.stats_key(provider)), int(self.redis.time()[0]), window_s)

    def emit(self, job_id: str, event: JobEvent, *, final_state: JobState | None = None, execution: str = "",
             provider: str = "", usage: dict[str, Any] | None = None,
             outcome: RowOutcome | None = None, charge: tuple[int, int] = (0, 0)) -> bool:
        """Append ``event`` to the job's stream and publish it to the waiting API process.

        With ``final_state`` it also settles the job (and drops the lease of ``execution``) in the same
        atomic step; returns False if the job was already settled, in which case nothing is emitted.
        ``outcome``: an async job's row outcome that Postgres did not take; it joins the usage stream
        (the outbox, ``common/outbox.py``) in the same step, as does ``charge`` — what the job cost its
        budgets (units of 1e-10 USD, tokens): its reservation is released and that charged, once."""
        done = self._emit(keys=[self.events_key(job_id), self.job_key(job_id), self.lease_key(job_id),
                                self.stats_key(provider), self.usage_key()],
                          args=[job_id, event.to_json(), int(EVENT_TTL_S * 1000),
                                final_state.value if final_state else "", execution,
                                json.dumps(usage, separators=(",", ":"), default=str) if usage else "",
                                outcome.to_json() if outcome is not None else "", charge[0], charge[1]])
        return bool(done)

    def emit_chunks(self, job_id: str, events: Sequence[JobEvent]) -> None:
        """Append non-final ``events`` (a stream's chunks, in order) to the job's stream and publish them
        to the waiting API process as one message, in one round trip (``emit_chunks.lua``; batches of
        at most ``CHUNK_BATCH`` so no one script holds Redis long)."""
        for at in range(0, len(events), CHUNK_BATCH):
            self._emit_chunks(keys=[self.events_key(job_id), self.job_key(job_id)],
                              args=[job_id, int(EVENT_TTL_S * 1000),
                                    *(event.to_json() for event in events[at:at + CHUNK_BATCH])])

    def queue_usage(self, usage: dict[str, Any]) -> None:
        """Put a usage row on the usage stream (a failed try's: no job settles with it)."""
        self.redis.xadd(self.usage_key(), {"u": json.dumps(usage, separators=(",", ":"), default=str)})


def rate_of(ring: dict[Any, Any], now_s: int, window_s: int = 60) -> float:
    """Completions per second over the last ``window_s`` seconds, from a provider's ring of ten-second
    buckets (``P:stats:<provider>``, counted by ``emit.lua``) read at Redis time ``now_s``."""
    raw = {_text(k): int(v) for k, v in ring.items()}
    oldest = now_s // 10 - window_s // 10
    done = sum(raw.get(f"c{slot}", 0) for slot in range(12) if raw.get(f"t{slot}", -1) >= oldest)
    return done / float(window_s)


def parse_reply(message: bytes) -> tuple[str, list[StreamEvent]]:
    """Decode one pubsub message published by ``emit.lua`` (one event) or ``emit_chunks.lua`` (a
    batch): ``job_id``, then ``stream_id`` and ``event`` lines, in the order they were appended."""
    job_id, *lines = message.split(b"\n")
    if not lines or len(lines) % 2:
        raise ValueError(f"a reply message of {len(lines)} lines after the job id, not id/event pairs")
    return job_id.decode(), [StreamEvent(lines[i].decode(), parse_event(json.loads(lines[i + 1])))
                             for i in range(0, len(lines), 2)]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
