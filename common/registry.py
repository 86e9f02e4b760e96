"""The model registry: which providers exist, how to reach them, and which model aliases they serve.

It is one YAML file (``GATEWAY_CONFIG``; the built-in ``default_registry.yaml`` otherwise)::

    providers:
      openai:
        kind: openai                 # a provider kind (common/provider_kinds.py)
        base_url: https://api.openai.com/v1
        api_key_env: OPENAI_API_KEY  # credentials come from the environment, never from the file
        base_url_env: OPENAI_BASE_URL
        pool: 32                     # jobs per worker process (running + waiting in line)
        limits: {concurrency: 50, rpm: 500, tpm: 200000}   # held across all workers; unset = none
                                     # (also rpd/tpd: per UTC day; models may set their own limits)
        timeout: 600                 # seconds for one whole upstream call (see README: deadlines)
    models:
      gpt-4o-mini:
        provider: openai
        model: gpt-4o-mini           # the provider's own name for it
        context_window: 128000
        capabilities: [chat, tools, vision, json]
        price: {input: 0.15, output: 0.60}   # USD per 1M tokens
    key_weights: {key_abc: 2}        # fair share in each line (default 1)
      gpt-4o-mini-anywhere:          # one alias, several deployments (README: Routing and fallbacks)
        deployments:
          - {provider: openai, model: gpt-4o-mini, weight: 2}
          - {provider: openrouter, model: openai/gpt-4o-mini, price: {input: 0.15, output: 0.60}}
        routing: earliest-start      # weighted | least-busy | lowest-latency | cheapest | earliest-start
        fallbacks: [gpt-4o]          # other aliases, tried in order when none of these can serve
    routing: {strategy: earliest-start, fallbacks: [], breaker: {failures: 5, window_s: 30, open_s: 10}}
    key_limits:                      # an API key's own quota, across all providers
      "*": {rpm: 60, tpd: 1000000}   # every key not listed, each on its own
      key_abc: {concurrency: 8, rpm: 600}
    virtual_models:                  # names resolved per call to one alias (common/routing/virtual.py)
      auto: {strategy: balanced}     # candidates: every chat model of a routable provider, unless listed
      cheap: {strategy: cheapest, candidates: [gpt-4o-mini, llama3.2]}

A model may name its ``tier`` (``small`` | ``medium`` | ``large``, default ``medium``): how capable it
is, for ``auto``'s complexity classifier (common/routing/classifier.py).

A provider that needs a key and has none in the environment is *not routable*: its models are
listed in ``/health`` as unavailable and calls to them get a clear 503, never a hang.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.provider_kinds import provider_kind

Capability = Literal["chat", "tools", "vision", "json", "embeddings", "stream"]
Tier = Literal["small", "medium", "large"]
# how a virtual model ranks its candidates; the weights of each are common/routing/virtual.py's STRATEGIES
RoutingStrategy = Literal["balanced", "cost", "quality", "latency", "cheapest", "fastest"]


class RegistryError(ValueError):
    """The registry file is unreadable or inconsistent; the message says where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    """USD per one million tokens."""

    input: Decimal = Decimal(0)
    output: Decimal = Decimal(0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (self.input * prompt_tokens + self.output * completion_tokens) / Decimal(1_000_000)


class Limits(_Strict):
    """What the upstream (or an API key's quota) allows; enforced across every worker
    (``common/limits.py``). Unset = unlimited.

    ``rpm``/``tpm`` hold over any sliding 60-second window; ``concurrency`` counts calls in flight;
    ``rpd``/``tpd`` count requests/tokens per UTC calendar day (reset at 00:00 UTC)."""

    concurrency: int | None = Field(default=None, ge=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    rpd: int | None = Field(default=None, ge=1)
    tpd: int | None = Field(default=None, ge=1)

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.concurrency, self.rpm, self.tpm, self.rpd, self.tpd))


@dataclass(frozen=True)
class CallDeadlines:
    """How long one upstream call may take, in seconds: ``connect`` to open the connection,
    ``first_byte`` from the start to the first byte of the answer (a stream's first event),
    ``total`` for a whole non-streamed call, ``stream_total`` for a whole stream and ``idle`` for
    the longest gap between two events of a stream."""

    connect: float
    first_byte: float
    total: float
    stream_total: float
    idle: float


class Provider(_Strict):
    name: str = ""
    kind: str
    base_url: str | None = None
    api_key_env: str | None = None
    base_url_env: str | None = None
    # more hosts serving the same models, tried in order when the one before cannot be reached
    # (Ollama boxes, vLLM replicas); from the file, or comma-separated in ``fallback_base_urls_env``
    fallback_base_urls: tuple[str, ...] = ()
    fallback_base_urls_env: str | None = None
    requires_key: bool = True
    pool: int = Field(default=32, ge=1, le=10_000)
    # deadlines of one upstream call, in seconds (workers/adapters/_deadline.py enforces them)
    timeout: float = Field(default=600.0, gt=0)            # a whole non-streamed call, connect to last byte
    connect_timeout: float = Field(default=5.0, gt=0)      # to open the connection
    first_byte_timeout: float | None = Field(default=None, gt=0)  # to the answer's first byte (timeout)
    stream_timeout: float | None = Field(default=None, gt=0)      # a whole streamed call (timeout)
    idle_timeout: float | None = Field(default=None, gt=0)  # longest gap between stream events
    max_retries: int = Field(default=2, ge=0, le=10)
    limits: Limits = Limits()
    # resolved from the environment at load time
    api_key: str | None = Field(default=None, repr=False)

    @property
    def deadlines(self) -> CallDeadlines:
        """The resolved deadlines, defaults filled in (each capped by its call's whole deadline)."""
        first_byte = min(self.first_byte_timeout or self.timeout, self.timeout)
        stream_total = self.stream_timeout or self.timeout
        return CallDeadlines(connect=min(self.connect_timeout, first_byte), first_byte=first_byte,
                             total=self.timeout, stream_total=stream_total,
                             idle=min(self.idle_timeout or first_byte, stream_total))

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        provider_kind(kind)  # raises, naming the known kinds
        return kind

    @property
    def routable(self) -> bool:
        return self.unroutable_reason is None

    @property
    def unroutable_reason(self) -> str | None:
        if provider_kind(self.kind).local:
            return None
        if not self.base_url:
            return f"no base URL (set {self.base_url_env or 'base_url'})"
        if self.requires_key and not self.api_key:
            return f"no credentials (set {self.api_key_env})"
        return None


class Deployment(_Strict):
    """One place an alias is served: a provider and the provider's own name for the model, with its
    own limits, price, context window and weight (``weighted`` routing). Unset fields take the
    alias's own value (``Model``), so a deployment line can be as short as ``{provider, model}``."""

    provider: str
    model: str
    weight: float = Field(default=1.0, gt=0)
    price: Price | None = None
    limits: Limits | None = None
    context_window: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)

    @property
    def name(self) -> str:
        """``provider/model``: the deployment's identity (its circuit breaker and latency are kept
        under it, shared by every alias that names the same deployment)."""
        return f"{self.provider}/{self.model}"


class Model(_Strict):
    """An alias. Either one provider (``provider`` + ``model``, as before deployments existed) or a
    list of ``deployments``; ``provider``/``model`` then name the first one. ``routing`` names the
    strategy that picks a deployment per call (``common/routing/strategies.py``; default
    ``earliest-start``), ``fallbacks`` the aliases tried, in order, when none of this one's can serve."""

    alias: str = ""
    provider: str = ""
    model: str = ""
    context_window: int = Field(default=8192, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    capabilities: tuple[Capability, ...] = ("chat",)
    price: Price = Price()
    limits: Limits = Limits()
    tier: Tier = "medium"   # how capable: auto sends simple prompts to small, hard ones to large
    deployments: tuple[Deployment, ...] = ()
    routing: str | None = None
    fallbacks: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _one_way_to_name_deployments(self) -> Model:
        if self.deployments:
            first = self.deployments[0]
            if (self.provider or self.model) and (self.provider, self.model) != (first.provider, first.model):
                raise ValueError("give either provider/model or deployments, not both")
            object.__setattr__(self, "provider", first.provider)
            object.__setattr__(self, "model", first.model)
        elif not self.provider or not self.model:
            raise ValueError("a model needs provider and model (or a list of deployments)")
        return self

    def routes(self) -> tuple[Deployment, ...]:
        """The alias's deployments, each with the alias's values filled in where it sets none (an alias
        without a ``deployments`` list has exactly one)."""
        listed = self.deployments or (Deployment(provider=self.provider, model=self.model),)
        return tuple(d.model_copy(update={
            "price": d.price or self.price, "limits": d.limits or self.limits,
            "context_window": d.context_window or self.context_window,
            "max_output_tokens": d.max_output_tokens or self.max_output_tokens}) for d in listed)

    def deployment(self, name: str) -> Deployment | None:
        return next((d for d in self.routes() if d.name == name), None)

    def on(self, deployment: Deployment) -> Model:
        """This alias as served by ``deployment``: provider, provider model, price, limits and context
        window are the deployment's (what the runner, the limits and the usage rows work from)."""
        d = next((r for r in self.routes() if r.name == deployment.name), deployment)
        return self.model_copy(update={
            "provider": d.provider, "model": d.model, "price": d.price or self.price,
            "limits": d.limits or self.limits, "context_window": d.context_window or self.context_window,
            "max_output_tokens": d.max_output_tokens or self.max_output_tokens})


class BreakerSettings(_Strict):
    """A deployment's circuit breaker (``common/routing/breaker.py``): it opens after ``failures``
    failed calls within ``window_s``, stays open ``open_s`` (``misconfigured_open_s`` after a 401/403),
    then lets ``probes`` calls through at once; a probe that succeeds closes it."""

    failures: int = Field(default=5, ge=1)
    window_s: float = Field(default=30.0, gt=0)
    open_s: float = Field(default=10.0, gt=0)
    misconfigured_open_s: float = Field(default=300.0, gt=0)
    probes: int = Field(default=1, ge=1, le=100)


class RoutingSettings(_Strict):
    """The registry-wide defaults: the strategy, the fallback aliases of every model that names none,
    and the breakers."""

    strategy: str = "earliest-start"
    fallbacks: tuple[str, ...] = ()
    breaker: BreakerSettings = BreakerSettings()


class VirtualModel(_Strict):
    """A model name that is no model: each call resolves it to one of ``candidates`` (every chat model
    of a routable provider if empty) by ``strategy`` (common/routing/virtual.py)."""

    name: str = ""
    strategy: RoutingStrategy = "balanced"
    candidates: tuple[str, ...] = ()


class Registry(_Strict):
    providers: dict[str, Provider]
    models: dict[str, Model]
    # fair share inside a provider's line: an API key with weight 2 gets twice the turns of one with 1
    key_weights: dict[str, float] = Field(default_factory=dict)
    # an API key's own quota, over all providers together; "*" applies to each key not listed
    # (each on its own: "*": {rpm: 60} lets every key make 60 calls a minute)
    key_limits: dict[str, Limits] = Field(default_factory=dict)
    virtual_models: dict[str, VirtualModel] = Field(default_factory=dict)
    routing: RoutingSettings = RoutingSettings()

    def limits_of_key(self, key_id: str) -> Limits:
        """The limits an API key's calls count against (``key_limits[key]``, else ``key_limits["*"]``)."""
        return self.key_limits.get(key_id) or self.key_limits.get("*") or Limits()

    @model_validator(mode="after")
    def _models_name_known_providers(self) -> Registry:
        from common.routing.strategies import STRATEGIES  # the table of strategy names

        for alias, model in self.models.items():
            for d in model.routes():
                if d.provider not in self.providers:
                    raise ValueError(f"model {alias!r} names unknown provider {d.provider!r}")
            if len({d.name for d in model.routes()}) != len(model.routes()):
                raise ValueError(f"model {alias!r} lists the same deployment twice")
            if model.routing is not None and model.routing not in STRATEGIES:
                raise ValueError(f"model {alias!r}: unknown routing strategy {model.routing!r} "
                                 f"(known: {', '.join(STRATEGIES)})")
            for fallback in model.fallbacks or ():
                if fallback not in self.models or fallback == alias:
                    raise ValueError(f"model {alias!r}: fallback {fallback!r} is not another model alias")
        if self.routing.strategy not in STRATEGIES:
            raise ValueError(f"routing.strategy {self.routing.strategy!r} is unknown "
                             f"(known: {', '.join(STRATEGIES)})")
        for fallback in self.routing.fallbacks:
            if fallback not in self.models:
                raise ValueError(f"routing.fallbacks names unknown model {fallback!r}")
        for name, virtual in self.virtual_models.items():
            if name in self.models:
                raise ValueError(f"virtual model {name!r} has the name of a model alias")
            unknown = [c for c in virtual.candidates if c not in self.models]
            if unknown:
                raise ValueError(f"virtual model {name!r} names unknown candidates {unknown}")
        return self

    def model(self, alias: str) -> Model | None:
        return self.models.get(alias)

    def provider_of(self, model: Model) -> Provider:
        return self.providers[model.provider]

    def serves(self, model: Model) -> bool:
        """Whether some deployment of ``model`` has a routable provider (it is listed, and callable)."""
        return any(self.providers[d.provider].routable for d in model.routes())

    def strategy_of(self, model: Model) -> str:
        return model.routing or self.routing.strategy

    def fallbacks_of(self, model: Model) -> tuple[str, ...]:
        """The aliases tried after ``model``'s own deployments: its own list (even empty), else the
        registry's default (never the model itself)."""
        chain = model.fallbacks if model.fallbacks is not None else self.routing.fallbacks
        return tuple(a for a in chain if a != model.alias)


def parse_registry(data: object, env: Mapping[str, str]) -> Registry:
    """Validate a registry document and resolve credentials and base URLs from ``env``."""
    if not isinstance(data, dict):
        raise RegistryError("the registry must be a mapping with 'providers' and 'models'")
    try:
        raw = Registry.model_validate(data)
    except ValidationError as exc:
        raise RegistryError(f"invalid registry: {exc}") from None
    providers = {}
    for name, p in raw.providers.items():
        base_url = (env.get(p.base_url_env) if p.base_url_env else None) or p.base_url
        api_key = env.get(p.api_key_env) if p.api_key_env else None
        fallbacks = p.fallback_base_urls
        if p.fallback_base_urls_env and env.get(p.fallback_base_urls_env):
            fallbacks = tuple(u.strip() for u in env[p.fallback_base_urls_env].split(",") if u.strip())
        providers[name] = p.model_copy(update={
            "name": name, "base_url": _normalise_url(base_url, p.kind) if base_url else None,
            "api_key": api_key,
            "fallback_base_urls": tuple(_normalise_url(u, p.kind) for u in fallbacks)})
    models = {alias: m.model_copy(update={"alias": alias}) for alias, m in raw.models.items()}
    for name, weight in raw.key_weights.items():
        if weight <= 0:
            raise RegistryError(f"key_weights.{name} must be positive, got {weight}")
    for name, limits in raw.key_limits.items():
        if not limits.any:
            raise RegistryError(f"key_limits.{name} sets no limit: give concurrency, rpm, tpm, rpd or tpd")
    virtual = {name: v.model_copy(update={"name": name}) for name, v in raw.virtual_models.items()}
    return Registry(providers=providers, models=models, key_weights=raw.key_weights,
                    key_limits=raw.key_limits, routing=raw.routing, virtual_models=virtual)


def _normalise_url(url: str, kind: str) -> str:
    """No trailing slash; a bare ``host:port`` gets its kind's scheme (``OLLAMA_HOST`` may be one)."""
    url = url.strip().rstrip("/")
    scheme = provider_kind(kind).bare_host_scheme
    if scheme and "://" not in url:
        url = scheme + url
    return url


def load_registry(path: Path, env: Mapping[str, str]) -> Registry:
    try:
        text = path.read_text()
    except OSError as exc:
        raise RegistryError(f"cannot read GATEWAY_CONFIG {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path} is not valid YAML: {exc}") from None
    try:
        return parse_registry(data, env)
    except RegistryError as exc:
        raise RegistryError(f"{path}: {exc}") from None
