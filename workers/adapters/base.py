"""What every provider adapter implements, and how a worker finds the one for a provider's ``kind``.

An adapter turns a canonical :class:`ChatRequest` into one upstream HTTP call and the answer back
into a :class:`ChatResponse`; vendor errors become our ``Upstream*`` errors (``common.errors``).
Which class serves which kind is the table :data:`common.provider_kinds.KINDS` — the one place a kind
is listed; adding a kind is adding its adapter (and protocol) module and one row there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

from common.errors import UpstreamError
from common.provider_kinds import provider_kind
from common.registry import Model, Provider
from common.types import ChatRequest, ChatResponse, EmbeddingsRequest
from workers.adapters._http import HttpClient


@runtime_checkable
class Adapter(Protocol):
    """One provider kind's calls. Built once per worker process and provider as
    ``AdapterClass(provider, session)``; must be safe to call from many greenlets at once."""

    def complete(self, request: ChatRequest, model: Model) -> ChatResponse:
        """Make one upstream call. Raises ``UpstreamError`` subclasses on failure; a 200 that is not an
        answer (an error body, no choices) is ``UpstreamBadResponse``."""
        ...

    def stream(self, request: ChatRequest, model: Model) -> Iterator[dict[str, Any]]:
        """Make one streaming upstream call, yielding canonical chunks (OpenAI ``chat.completion.chunk``
        dicts) as they arrive; the last one carries ``usage``. Errors before the first chunk raise
        ``UpstreamError``; closing the iterator aborts the upstream call."""
        ...

    def map_error(self, status: int, headers: Mapping[str, str], data: Any) -> UpstreamError:
        """Our error for the provider's error answer (``data``: its body as JSON, or None)."""
        ...


@runtime_checkable
class EmbeddingAdapter(Protocol):
    """Adapters of providers that serve embeddings implement this too (optional)."""

    def embed(self, request: EmbeddingsRequest, model: Model) -> ChatResponse:
        """``body`` is an OpenAI embeddings list object; usage counts the input tokens."""
        ...


AdapterFactory = Callable[[Provider, HttpClient], Adapter]


def adapter_class(kind: str) -> AdapterFactory:
    """The adapter class of a provider kind, imported on first use (the API never needs one)."""
    module, _, name = provider_kind(kind).adapter.partition(":")
    factory: AdapterFactory = getattr(importlib.import_module(module), name)
    return factory


def build_adapter(provider: Provider, session: HttpClient) -> Adapter:
    adapter = adapter_class(provider.kind)(provider, session)
    if not isinstance(adapter, Adapter):
        raise TypeError(f"{type(adapter).__name__} (kind {provider.kind!r}) does not implement Adapter")
    return adapter


def make_http_session(pool_size: int) -> HttpClient:
    """One pooled, keep-alive client per worker process and provider (``pool_size``: the registry's
    ``pool``, connections kept per host)."""
    return HttpClient(pool_size)
