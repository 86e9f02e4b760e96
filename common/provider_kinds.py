"""The provider kinds the gateway can call — the one list of them.

A *kind* is a wire protocol an upstream speaks (``kind:`` of a provider in the registry file). Each
kind is an adapter module, ``workers/adapters/<kind>.py``, whose class implements
:class:`workers.adapters.base.Adapter`, and (unless it speaks the canonical OpenAI shape) a protocol
module, ``common/protocols/<kind>.py``, of pure translations. This table is the only place that names
them: the registry accepts a ``kind`` only if it is here, and a worker imports the adapter named here
(the API never imports adapters). Adding a kind is the two modules plus one row below — see
``docs/architecture.md``, "Adding a provider kind".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ProviderKind:
    """What the gateway needs to know about a kind before it imports its adapter."""

    name: str
    adapter: str  # "package.module:Class", imported by workers only (the API process stays lean)
    local: bool = False  # answers in-process: needs neither a base URL nor credentials
    # a base URL given as a bare ``host:port`` gets this scheme (Ollama's own CLI accepts OLLAMA_HOST so)
    bare_host_scheme: str | None = None


KINDS: Mapping[str, ProviderKind] = {
    kind.name: kind
    for kind in (
        ProviderKind("openai", "workers.adapters.openai:OpenAIAdapter"),
        ProviderKind("anthropic", "workers.adapters.anthropic:AnthropicAdapter"),
        ProviderKind("ollama", "workers.adapters.ollama:OllamaAdapter", bare_host_scheme="http://"),
        ProviderKind("gemini", "workers.adapters.gemini:GeminiAdapter"),
        ProviderKind("mock", "workers.adapters.mock:MockAdapter", local=True),
    )
}


def provider_kind(name: str) -> ProviderKind:
    """The kind called ``name``; ``ValueError`` naming the known kinds otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown provider kind {name!r}; known kinds: {', '.join(sorted(KINDS))}") from None
