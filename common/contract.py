"""The job contract: everything that crosses from the API to the workers and back, typed, in one place.

A job is a :class:`JobSpec` (what to run, for whom, until when) that the API writes into Redis and a
worker reads back once; the worker answers with :data:`JobEvent` s on the job's event stream; the job
ends in one of the :class:`JobState` s. Each type serialises itself (``to_json`` / ``to_dict``) and
parses itself (``JobSpec.parse`` / :func:`parse_event`): no other module spells an event type, a mode
or a state as a string.

Events, in the order a worker emits them::

    Chunk*  then  Done                      a streamed call that succeeded (usage rides on Done)
    Result                                  a whole answer
    Failed                                  the call failed (``error`` is a GatewayError.to_dict())
    Expired | Cancelled                     the job never ran (its max_wait passed / it was withdrawn)

Every event but :class:`Chunk` is *final*: it settles the job, and :attr:`JobEvent.state` says into
which state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar

from common.errors import ClientGone, GatewayError
from common.registry import Limits
from common.routing import Trail
from common.types import ChatRequest, EmbeddingsRequest

EVENT_TTL_S = 3600.0   # seconds a job's event stream (and a settled job's state) stays readable


class Mode(StrEnum):
    """``sync``: a caller holds the connection and waits; ``async``: ``POST /v1/jobs``, durable in
    Postgres."""

    SYNC = "sync"
    ASYNC = "async"


class Kind(StrEnum):
    CHAT = "chat"
    EMBEDDINGS = "embeddings"


class JobState(StrEnum):
    """``queued → running → succeeded | failed``; ``queued → expired | cancelled`` (never ran)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


class Start(StrEnum):
    """A worker's answer to "may this delivered job start?" (the claim, or the admission to a line);
    a job that may not because it already settled answers with its :class:`JobState` instead."""

    RUN = "run"              # it is ours: call upstream
    WAIT = "wait"            # in line, not its turn or no permits yet
    EXPIRED = "expired"      # its deadline passed while queued: moved to expired, never called
    BUSY = "busy"            # another worker runs it (its lease is alive)
    MISSING = "missing"      # Redis does not know it (lost state)
    GONE = "gone"            # it left the line: withdrawn, settled, or running elsewhere
    TOO_LARGE = "too_large"  # the call alone exceeds a limit: it could never start
    ORPHANED = "orphaned"    # moved to cancelled by the claim itself: nobody can use its answer (job.lua)
    LIMITED = "limited"      # a plain claim refused it: its key has limits of its own, so it waits in line


def start_or_state(text: str) -> Start | JobState:
    """A claim's answer: its :class:`Start` (``expired``: the claim itself just expired the job), else
    the state the job had settled in."""
    return Start(text) if text in Start._value2member_map_ else JobState(text)


def state_or_start(text: str) -> JobState | Start:
    """A job's state as a script reports it (``expired``: the job *is* expired, by whomever), or why
    there is none (``missing``) or it is not ours (``busy``)."""
    return JobState(text) if text in JobState._value2member_map_ else Start(text)


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})
WITHDRAWN = frozenset({JobState.EXPIRED, JobState.CANCELLED})   # what the API may move a queued job to


@dataclass(frozen=True)
class JobSpec:
    """What a job runs. ``deadline`` (epoch seconds, from the Redis clock when the job was created) is
    kept beside the spec in the job's hash, not inside it: Redis sets it, the worker reads it back.
    ``key_limits``: the calling key's own limits (``Limits`` fields) as they were when the job was
    admitted, so workers need no key lookup; None: the registry's ``key_limits`` apply."""

    mode: Mode
    kind: Kind
    model: str
    provider: str
    request: dict[str, Any]
    api_key_id: str | None = None
    deadline: float = 0.0
    key_limits: dict[str, int] | None = None
    deployment: str = ""        # the deployment (``provider/model``) routing chose; "" = the alias's first
    trail: Trail | None = None  # routing's decision and the deployments tried (common/routing)
    trace: str | None = None   # the API's W3C traceparent (tracing on): the worker's spans join its trace

    @classmethod
    def of(cls, request: ChatRequest | EmbeddingsRequest, *, mode: Mode, model: str, provider: str,
           api_key_id: str | None, key_limits: Limits | None = None) -> JobSpec:
        kind = Kind.EMBEDDINGS if isinstance(request, EmbeddingsRequest) else Kind.CHAT
        own = key_limits.model_dump(exclude_none=True) if key_limits is not None and key_limits.any else None
        return cls(mode, kind, model, provider, request.model_dump(exclude_none=True), api_key_id,
                   key_limits=own)

    @property
    def is_async(self) -> bool:
        return self.mode is Mode.ASYNC

    def canonical_request(self) -> ChatRequest | EmbeddingsRequest:
        if self.kind is Kind.EMBEDDINGS:
            return EmbeddingsRequest.model_validate(self.request)
        return ChatRequest.model_validate(self.request)

    def own_limits(self) -> Limits | None:
        return None if self.key_limits is None else Limits(**self.key_limits)

    def to_json(self) -> str:
        data = {"mode": self.mode.value, "kind": self.kind.value, "model": self.model,
                "provider": self.provider, "request": self.request, "api_key_id": self.api_key_id}
        if self.key_limits is not None:
            data["key_limits"] = self.key_limits
        if self.deployment:
            data["deployment"] = self.deployment
        if self.trail is not None:
            data["trail"] = self.trail.to_dict()
        if self.trace:
            data["trace"] = self.trace
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def parse(cls, raw: str | bytes, deadline: float) -> JobSpec:
        data = json.loads(raw)
        trail = data.get("trail")
        return cls(Mode(data.get("mode", Mode.SYNC)), Kind(data.get("kind", Kind.CHAT)), data["model"],
                   data["provider"], data["request"], data.get("api_key_id"), float(deadline),
                   data.get("key_limits"), str(data.get("deployment") or ""),
                   Trail.parse(trail) if isinstance(trail, dict) else None,
                   data.get("trace"))


class EventType(StrEnum):
    CHUNK = "chunk"
    RESULT = "result"
    DONE = "done"
    ERROR = "error"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class JobEvent:
    """One entry of a job's event stream. Subclasses are dataclasses whose fields are the payload."""

    type: ClassVar[EventType]
    state: ClassVar[JobState | None] = None   # the state a final event settles the job into

    @property
    def final(self) -> bool:
        return self.state is not None

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type.value, **{f.name: getattr(self, f.name) for f in fields(self)}}  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


@dataclass(frozen=True)
class Chunk(JobEvent):
    """One upstream stream chunk, as a canonical OpenAI ``chat.completion.chunk``."""

    type = EventType.CHUNK
    chunk: dict[str, Any]
    # a stream's first chunk only: where it is served (``provider``, ``provider_model``, ``deployment``,
    # ``routing_decision``, ``fallback_used``, as in a whole answer's meta). A stream fails over only
    # before its first chunk, so this is final: the API's stream headers need no read of the live spec.
    served: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"type": self.type.value, "chunk": self.chunk}
        if self.served is not None:
            data["served"] = self.served
        return data


@dataclass(frozen=True)
class Result(JobEvent):
    """A whole answer (the canonical response body) and the gateway's metadata about the call."""

    type = EventType.RESULT
    state = JobState.SUCCEEDED
    result: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Done(JobEvent):
    """A streamed call ended well; ``usage`` is the upstream's token count."""

    type = EventType.DONE
    state = JobState.SUCCEEDED
    meta: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] | None = None


@dataclass(frozen=True)
class Failed(JobEvent):
    """The job failed; ``error`` is :meth:`GatewayError.to_dict`. (A call aborted because its caller
    left settles as ``cancelled`` with this event: see :func:`failure_state`.)"""

    type = EventType.ERROR
    state = JobState.FAILED
    error: dict[str, Any]

    @classmethod
    def of(cls, error: GatewayError) -> Failed:
        return cls(error.to_dict())

    def exception(self) -> GatewayError:
        return GatewayError.from_dict(self.error)


@dataclass(frozen=True)
class Expired(JobEvent):
    type = EventType.EXPIRED
    state = JobState.EXPIRED
    message: str = "the job expired in the queue"


@dataclass(frozen=True)
class Cancelled(JobEvent):
    type = EventType.CANCELLED
    state = JobState.CANCELLED
    message: str = "the job was cancelled"


_EVENTS: dict[str, type[JobEvent]] = {
    cls.type.value: cls for cls in (Chunk, Result, Done, Failed, Expired, Cancelled)}


def parse_event(data: dict[str, Any]) -> JobEvent:
    """The event a ``to_dict()`` made (unknown fields are ignored; an unknown type raises ValueError)."""
    cls = _EVENTS.get(str(data.get("type")))
    if cls is None:
        raise ValueError(f"unknown job event type {data.get('type')!r}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def unrun_event(state: JobState, message: str) -> JobEvent:
    """The final event of a job that never ran: it expired in line, or was withdrawn."""
    return Expired(message) if state is JobState.EXPIRED else Cancelled(message)


def failure_state(error: GatewayError) -> JobState:
    """The state a job that ended with ``error`` settles into: a call whose caller left is cancelled."""
    return JobState.CANCELLED if isinstance(error, ClientGone) else JobState.FAILED
