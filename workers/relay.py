"""Relaying a streamed upstream call to the API that waits for it, chunk by chunk.

The chunk with the first token goes out the moment it exists; the others are coalesced while a send
is in flight (``workers/chunksend.py``). Once a chunk went out the call cannot be retried: a later failure
ends the stream with :class:`UpstreamStreamBroken`, carrying what was produced so it is billed
(``workers/partial.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from common.contract import Chunk
from common.errors import ClientGone, UpstreamError, UpstreamStreamBroken
from common.jobs import JobStore
from common.registry import Model
from common.types import ChatRequest, ChatResponse, Usage
from workers.adapters.base import Adapter
from workers.chunksend import ChunkSender
from workers.observe import WorkerObserver
from workers.partial import chunk_text, with_partial

ABORT_CHECK_S = 0.25  # how often a relayed stream checks whether its client went away


def relay_stream(store: JobStore, observe: WorkerObserver, job_id: str, adapter: Adapter,
                 request: ChatRequest, model: Model, *, on_first: Callable[[int], None],
                 served: dict[str, Any] | None = None) -> ChatResponse:
    """Forward each upstream chunk to the waiting API as it arrives; returns the usage. Checks every
    ``ABORT_CHECK_S`` whether the client went away, and if so closes the upstream call. Calls
    ``on_first`` with the first chunk's time (ms after the call began, for the usage row); the answer's
    ``first_token_ms`` is the same (the virtual models' TTFT measure). The first chunk carries
    ``served`` (where the stream runs: the API's stream headers)."""
    began = time.perf_counter()
    chunks: Iterator[dict[str, Any]] = adapter.stream(request, model)
    sender = ChunkSender(lambda batch: store.emit_chunks(job_id, batch))
    sent = 0
    first_ms: float | None = None
    token_out = False   # the first chunk with text went out (it is sent urgently; see chunksend.py)
    usage: dict[str, Any] = {}
    produced: list[str] = []
    checked = time.monotonic()
    try:
        for chunk in chunks:
            if chunk.get("usage"):
                usage = chunk["usage"]
            if first_ms is None:
                first_ms = (time.perf_counter() - began) * 1000
                on_first(int(first_ms))
            text = chunk_text(chunk)
            produced.extend(text)
            urgent = not token_out and any(text)
            token_out = token_out or urgent
            # out at once (the first token even if the rest is buffered); coalesced while a send is in flight
            sender.put(Chunk(chunk, served) if not sent else Chunk(chunk), urgent=urgent)
            sent += 1
            observe.first_token(job_id, model)
            if time.monotonic() - checked > ABORT_CHECK_S:
                checked = time.monotonic()
                if store.aborted(job_id):
                    gone = ClientGone("the client disconnected; the upstream call was aborted")
                    raise with_partial(gone, request, model, usage, produced) from None
    except UpstreamError as exc:
        if not sent:
            raise
        broken = UpstreamStreamBroken(f"the upstream stream broke off: {exc.message}")
        raise with_partial(broken, request, model, usage, produced) from None
    finally:
        try:
            chunks.close()  # type: ignore[attr-defined]
        finally:
            sender.close()  # every chunk out before the job settles (or fails) after them
    return ChatResponse(body={"usage": usage} if usage else {},
                        usage=Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                    completion_tokens=int(usage.get("completion_tokens") or 0)),
                        first_token_ms=first_ms)
