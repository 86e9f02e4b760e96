"""Relaying a job's stream to its caller as it arrives, in the caller's own format.

The worker publishes each upstream chunk as a canonical OpenAI ``chat.completion.chunk``; a
:class:`StreamFormat` turns chunks into the caller's wire format (OpenAI SSE, Anthropic's event
sequence, Ollama NDJSON). Nothing is buffered: each chunk is written as soon as it is received.

Before the first chunk the call may still fail with a proper HTTP status, so the relay holds the
response for up to ``HOLD_S`` waiting for the first chunk (or the outcome). If the job is still in
line after that, the stream starts and keeps the connection alive with the format's ping, which also
tells the caller its position; a later error arrives as an in-stream error event. A caller that
disconnects withdraws its queued job, or makes its worker abort the upstream call.

Routing (common/routing): the headers say where the job is when the stream starts —
``x-gateway-provider``, ``-model``, ``-deployment``, ``-routing-decision``, ``-fallback-used`` as the
worker put them on the first chunk (else — a stream that starts waiting in line — from its live spec).
After a first chunk that is final (a stream fails over only before its first token); a stream that
starts waiting in line (no chunk within ``HOLD_S``) may still move, so the format's ``done(meta)`` gets
the whole story — for OpenAI, the ``x-gateway`` object of the last chunk, with ``attempts`` too
(api/openai_routes.py). Anthropic's, Ollama's and Gemini's stream shapes have no place for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from flask import Response

from api.gateway import Gateway
from api.watch import JobWatch
from common.budgets import remaining_headers
from common.contract import Chunk, Done
from common.errors import GatewayError, QueueTimeout
from common.jobs import StreamEvent

log = logging.getLogger(__name__)

HOLD_S = 5.0    # how long to hold the response for the first chunk before committing to a 200 stream
PING_S = 5.0    # keep-alive interval while waiting in line


class StreamFormat(Protocol):
    mimetype: str

    def chunk(self, chunk: dict[str, Any]) -> Iterable[str]: ...

    def done(self, meta: dict[str, Any]) -> Iterable[str]:
        """The stream's end; ``meta``: the job's id and the gateway's metadata (as in a whole answer)."""
        ...

    def error(self, error: GatewayError) -> Iterable[str]: ...

    def waiting(self, position: int | None) -> Iterable[str]: ...


def stream_response(gateway: Gateway, watch: JobWatch, fmt: StreamFormat,
                    headers: dict[str, str]) -> Response:
    """Raises the job's error (as a normal HTTP error) if it fails before its first chunk within HOLD_S."""
    try:
        first = _first_output(gateway, watch)
    except BaseException:
        if not watch.settled:  # answered without the job's result: it must never run (again)
            watch.give_up()
        watch.close()
        raise
    # its cost is not known yet: what remains of its budgets with its worst case still reserved
    worst = watch.reservation.worst if watch.reservation is not None else None
    budget = remaining_headers(watch.reservation, worst.usd if worst else 0, worst.tokens if worst else 0)
    return Response(_relay(gateway, watch, fmt, first), mimetype=fmt.mimetype,
                    headers={**headers, **routing_headers(watch, first), **budget,
                             "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                             "x-gateway-job-id": watch.job_id})


def routing_headers(watch: JobWatch, first: StreamEvent | None = None) -> dict[str, str]:
    """Where the job is as its stream starts: what its first chunk says (``Chunk.served``; no Redis
    read between the first token and the client), else its live spec (the route it was queued on if
    Redis cannot say)."""
    served = first.event.served if first is not None and isinstance(first.event, Chunk) else None
    if served is not None:
        return {"x-gateway-provider": str(served["provider"]),
                "x-gateway-model": str(served["provider_model"]),
                "x-gateway-deployment": str(served["deployment"]),
                "x-gateway-routing-decision": str(served["routing_decision"]),
                "x-gateway-fallback-used": "true" if served["fallback_used"] else "false"}
    route = watch.current_route()
    spec = watch.live_spec
    trail = spec.trail if spec is not None else None
    named = spec.deployment if spec is not None else None
    deployment = named or f"{route.provider.name}/{route.model.model}"
    return {"x-gateway-provider": route.provider.name, "x-gateway-model": route.model.model,
            "x-gateway-deployment": deployment,
            "x-gateway-routing-decision": trail.decision if trail is not None else "only",
            "x-gateway-fallback-used": "true" if trail is not None and trail.fallback_used else "false"}


def _first_output(gateway: Gateway, watch: JobWatch) -> StreamEvent | None:
    """The first chunk (None if none came within HOLD_S); raises if the job ends without one."""
    while True:
        entry = watch.next(timeout=HOLD_S)
        if entry is None:
            return None
        if isinstance(entry.event, Chunk | Done):
            return entry
        gateway.final(watch, entry)  # raises the job's error


def _relay(gateway: Gateway, watch: JobWatch, fmt: StreamFormat, entry: StreamEvent | None) -> Iterator[str]:
    finished = False
    try:
        while True:
            if entry is None:
                yield from fmt.waiting(_position(gateway, watch))
            elif isinstance(entry.event, Chunk):
                # the chunks already here go out with it in one write (one send, one wake-up of the
                # client): they pile up only while the client side is slower than the upstream
                out = list(fmt.chunk(entry.event.chunk))
                while (more := watch.ready()) is not None and isinstance(more.event, Chunk):
                    out.extend(fmt.chunk(more.event.chunk))
                if out:  # (a format may turn a chunk into nothing: an empty write would end the body)
                    yield "".join(out)
                if more is not None:  # the end (or an error) arrived with them
                    entry = more
                    continue
            elif isinstance(entry.event, Done):
                finished = True
                yield from fmt.done({"job_id": watch.job_id, **entry.event.meta})
                return
            else:
                finished = True
                try:
                    gateway.final(watch, entry)
                except GatewayError as exc:
                    yield from fmt.error(exc)
                return
            try:
                entry = watch.next(timeout=PING_S)
            except (QueueTimeout, GatewayError) as exc:
                finished = True
                yield from fmt.error(exc)
                return
    finally:
        if not finished:  # the caller went away (or the server is stopping) mid-stream
            watch.abandon()
        watch.close()


def _position(gateway: Gateway, watch: JobWatch) -> int | None:
    return gateway.limiter.position(watch.current_route().provider.name, watch.job_id)
