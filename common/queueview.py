"""Who is waiting where: a provider's line (jobs its workers hold, not yet started) and its broker queue
(messages no worker has taken yet), by API key, with the oldest waiting job. Read-only, for the
dashboard's Queues page; the figures ``GET /v1/limits`` shows (limits, use, cooldown) come from
``Gateway.limits`` and are not repeated here.

The line's job ids come from its sorted set (``common/limits.py``), the broker's from the Celery
messages in ``P:llm.<provider>`` (``common/taskwire.py``: the message's ``headers.id`` is the job id);
each job's key, model and creation time from its hash (``common/jobs.py``). A busy queue is sampled:
at most ``sample`` jobs of each are read (the oldest ones), and the counts say how many were read.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from common.jobs import JobStore
from common.limits import Limiter

SAMPLE = 500


@dataclass
class Waiting:
    """The jobs waiting in one place: how many there are (``total``), how many were read (``sampled``)
    and of those, how many per API key; the oldest one's id, model, key and age in seconds."""

    total: int = 0
    sampled: int = 0
    by_key: dict[str, int] = field(default_factory=dict)
    oldest_job: str | None = None
    oldest_model: str | None = None
    oldest_key: str | None = None
    oldest_age_s: float | None = None


def waiting(store: JobStore, limiter: Limiter, provider: str, broker_key: str,
            sample: int = SAMPLE) -> dict[str, Waiting]:
    """``{"line": Waiting, "broker": Waiting}`` for ``provider`` (see the module's docstring)."""
    pipe = store.redis.pipeline()
    pipe.zrange(limiter.key(provider, "line"), 0, sample - 1)
    pipe.lrange(broker_key, -sample, -1)   # LPUSHed, consumed from the right: the oldest last
    pipe.zcard(limiter.key(provider, "line"))
    pipe.llen(broker_key)
    line_ids, messages, line_total, broker_total = pipe.execute()
    places = {"line": [_text(job) for job in line_ids],
              "broker": [job for job in (_job_of(m) for m in reversed(messages)) if job is not None]}
    pipe = store.redis.pipeline()
    for ids in places.values():
        for job_id in ids:
            pipe.hmget(store.job_key(job_id), "spec", "created_at", "state")
    fields = iter(pipe.execute())
    now = time.time()
    out = {place: _summary(ids, [next(fields) for _ in ids], now) for place, ids in places.items()}
    out["line"].total, out["broker"].total = int(line_total), int(broker_total)
    return out


def _summary(ids: list[str], rows: list[list[Any]], now: float) -> Waiting:
    out = Waiting(sampled=len(ids))
    keys: Counter[str] = Counter()
    oldest: float | None = None
    for job_id, (spec_raw, created, state) in zip(ids, rows, strict=True):
        if spec_raw is None or (state is not None and _text(state) != "queued"):
            continue  # gone from Redis, or already started / withdrawn: not waiting any more
        spec = json.loads(spec_raw)
        key = spec.get("api_key_id") or "anonymous"
        keys[key] += 1
        created_s = float(created) if created is not None else now
        if oldest is None or created_s < oldest:
            oldest = created_s
            out.oldest_job, out.oldest_model, out.oldest_key = job_id, spec.get("model"), key
    out.by_key = dict(keys.most_common())
    out.oldest_age_s = None if oldest is None else round(max(0.0, now - oldest), 1)
    return out


def _job_of(message: bytes) -> str | None:
    try:
        job = json.loads(message)["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None  # not one of our task messages
    return job if isinstance(job, str) else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
