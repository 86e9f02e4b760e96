"""What every provider adapter implements, and the registry that finds one by ``kind``.

An adapter turns a canonical :class:`ChatRequest` into one upstream HTTP call and the answer back
into a :class:`ChatResponse`; vendor errors become our ``Upstream*`` errors (``common.errors``).
Adding a provider is adding a module here that calls :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import requests

from common.registry import Model, Provider
from common.types import ChatRequest, ChatResponse, EmbeddingsRequest


class Adapter(Protocol):
    def complete(self, request: ChatRequest, model: Model) -> ChatResponse:
        """Make one upstream call. Raises ``UpstreamError`` subclasses on failure."""
        ...

    def stream(self, request: ChatRequest, model: Model) -> Iterator[dict[str, Any]]:
        """Make one streaming upstream call, yielding canonical chunks (OpenAI ``chat.completion.chunk``
        dicts) as they arrive; the last one carries ``usage``. Errors before the first chunk raise
        ``UpstreamError``; closing the iterator aborts the upstream call."""
        ...


class EmbeddingAdapter(Protocol):
    """Adapters of providers that serve embeddings implement this too."""

    def embed(self, request: EmbeddingsRequest, model: Model) -> ChatResponse:
        """``body`` is an OpenAI embeddings list object; usage counts the input tokens."""
        ...


AdapterFactory = Callable[[Provider, requests.Session], Adapter]
_FACTORIES: dict[str, AdapterFactory] = {}


def register(kind: str) -> Callable[[AdapterFactory], AdapterFactory]:
    def decorate(factory: AdapterFactory) -> AdapterFactory:
        _FACTORIES[kind] = factory
        return factory
    return decorate


def build_adapter(provider: Provider, session: requests.Session) -> Adapter:
    from workers.adapters import anthropic, gemini, mock, ollama, openai  # noqa: F401  (they self-register)

    try:
        factory = _FACTORIES[provider.kind]
    except KeyError:
        raise ValueError(f"no adapter for provider kind {provider.kind!r}") from None
    return factory(provider, session)


def make_http_session(pool_size: int) -> requests.Session:
    """One pooled, keep-alive session per worker process and provider."""
    session = requests.Session()
    session.trust_env = False  # no proxy/netrc lookups from the environment on every call (~5% CPU)
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
