"""One job's run at a worker (:class:`JobRun`), and the usage row each of its upstream calls leaves."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from common.contract import JobSpec
from common.errors import GatewayError
from common.limits import Scope
from common.registry import Model, Provider
from common.types import ChatRequest, ChatResponse, EmbeddingsRequest, Usage
from workers.admission import Permit
from workers.usage import UsageRecord


@dataclass
class JobRun:
    """One job's run: its spec, what it calls, the limits it counts against, the permit it holds now."""

    job_id: str
    execution: str
    spec: JobSpec
    model: Model
    provider: Provider
    key: str
    scopes: list[Scope]
    request: ChatRequest | EmbeddingsRequest
    tokens: int
    permit: Permit | None = None
    deployment: str = ""   # provider/model serving it (common/routing)
    tries: int = 0         # upstream calls made for it in this run
    first_token_ms: int | None = None   # the current try's stream: its first chunk, ms after the call


def usage_row(job: JobRun, call_id: str, queue_wait_ms: int, latency_ms: int, *,
               response: ChatResponse | None = None, cost: Decimal = Decimal(0),
               error: GatewayError | None = None) -> UsageRecord:
    """The usage row of one upstream call: what it cost if it answered, else its error (and no cost)."""
    usage = response.usage if response is not None else Usage(prompt_tokens=0, completion_tokens=0)
    return UsageRecord(call_id=call_id, job_id=job.job_id, api_key_id=job.spec.api_key_id,
                       model=job.model.alias, provider=job.provider.name, provider_model=job.model.model,
                       prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                       cost_usd=cost,
                       queue_wait_ms=queue_wait_ms, upstream_latency_ms=latency_ms,
                       outcome="success" if error is None else (error.code or "error"),
                       status_code=200 if error is None else error.status,
                       error=None if error is None else error.message[:500],
                       first_token_ms=job.first_token_ms)


def money(value: Decimal) -> str:
    """USD to 10 places, trailing zeros dropped (how meta and billed figures carry cost)."""
    return format(value.quantize(Decimal("0.0000000001")).normalize(), "f")
