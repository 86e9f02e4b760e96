"""Reading what routing decides from: each candidate's breaker, measured latency and error rate, the
jobs waiting for its provider (broker queue + line), the provider's completion rate and 429
cooldown — one Redis pipeline for all candidates. Used by the API (the first pick), the worker (the
next one) and the routing view."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from common.errors import InvalidRequest
from common.jobs import JobStore, rate_of
from common.routing import Candidate, Load, candidates, fitting
from common.routing.breaker import Breakers, read_load
from common.routing.strategies import Option, choose
from common.settings import Settings
from common.tokens import estimate_prompt_tokens
from common.types import ChatRequest, EmbeddingsRequest


class Router:
    """Picks deployments for jobs; thread/greenlet-safe."""

    def __init__(self, settings: Settings, store: JobStore, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.store = store
        self.breakers = Breakers(store.redis, store.prefix, settings.registry.routing.breaker)
        self.rng = rng or random.Random()
        registry = settings.registry
        #: the aliases with one deployment and no fallbacks: nothing to decide (the registry is fixed
        #: for the process; ``Model.routes`` builds its deployments anew on every call)
        self.fixed = frozenset(alias for alias, model in registry.models.items()
                               if len(model.routes()) == 1 and not registry.fallbacks_of(model))

    def observe(self, candidates: list[Candidate]) -> list[Option]:
        """Each candidate with its :class:`Load` now (see the module's docstring)."""
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.time()
        providers = list(dict.fromkeys(c.provider for c in candidates))
        for name in providers:
            pipe.llen(self.settings.queue_key(name))
            pipe.zcard(f"{self.store.prefix}:lim:{name}:line")
            pipe.hgetall(self.store.stats_key(name))
            pipe.pttl(f"{self.store.prefix}:lim:{name}:cooldown")
        for c in candidates:
            pipe.hgetall(self.breakers.key(c.name))
        values: list[Any] = pipe.execute()
        seconds, micros = values[0]
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        per_provider: dict[str, tuple[int, float | None]] = {}
        for i, name in enumerate(providers):
            queued, line, ring, cooldown_ms = values[1 + 4 * i: 5 + 4 * i]
            waiting = int(queued) + int(line)
            rate = rate_of(ring, int(seconds))
            start = 0.0 if waiting == 0 else (waiting / rate if rate > 0 else None)
            if start is not None and cooldown_ms and int(cooldown_ms) > 0:
                start = max(start, int(cooldown_ms) / 1000)
            per_provider[name] = (waiting, start)
        base = 1 + 4 * len(providers)
        probes = self.settings.registry.routing.breaker.probes
        out: list[Option] = []
        for i, c in enumerate(candidates):
            waiting, start = per_provider[c.provider]
            out.append((c, replace(read_load(values[base + i], now_ms, probes), waiting=waiting,
                                   start_in_s=start)))
        return out

    def pick(self, strategy: str, candidates: list[Candidate]) -> tuple[Candidate, Load, str] | None:
        """The candidate to send a job to now and the decision in words (``<strategy>`` or
        ``wait-for-probe``: every candidate's breaker is open); None if there are no candidates. A
        single candidate is taken without reading Redis (its worker's breaker gate still applies)."""
        if len(candidates) == 1:
            return candidates[0], Load(), "only"
        chosen = choose(strategy, self.observe(candidates), self.rng)
        if chosen is None:
            return None
        (candidate, load), decision = chosen
        return candidate, load, decision


def place(router: Router, alias: str,
          request: ChatRequest | EmbeddingsRequest) -> tuple[Candidate, str] | None:
    """The deployment a new job of ``alias`` starts on, and the decision in words; None for an alias
    with one deployment and no fallbacks (nothing to decide: it runs there, as it always did).
    Deployments whose context window is too small for the request are skipped before anything is
    called; if none of the chain fits, the request is refused (400 ``context_length_exceeded``)."""
    if alias in router.fixed:
        return None
    registry = router.settings.registry
    model = registry.models[alias]
    fits = None
    if isinstance(request, ChatRequest):
        chat = request
        fits = fitting(lambda m: estimate_prompt_tokens(chat, m),
                       request.max_completion_tokens or request.max_tokens or 0)
    chain = candidates(registry, alias, fits)
    if not chain:
        if candidates(registry, alias):
            raise InvalidRequest(f"this request is larger than the context window of every deployment of "
                                 f"'{alias}' and its fallbacks", code="context_length_exceeded",
                                 param="messages")
        return None
    picked = router.pick(registry.strategy_of(model), chain)
    return None if picked is None else (picked[0], picked[2])
