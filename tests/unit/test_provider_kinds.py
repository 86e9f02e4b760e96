"""The table of provider kinds: every kind builds an adapter that implements the protocol, the registry
accepts only listed kinds, and a new kind is one module plus one row."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from common.provider_kinds import KINDS, ProviderKind
from common.registry import Provider, RegistryError, parse_registry
from workers.adapters.base import Adapter, EmbeddingAdapter, build_adapter, make_http_session

EMBEDDING_KINDS = {"openai", "mock"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_builds_an_adapter_that_implements_the_protocol(kind: str) -> None:
    adapter = build_adapter(
        Provider(name=f"p-{kind}", kind=kind, base_url="http://127.0.0.1:9", api_key="k"),
        make_http_session(1),
    )
    assert isinstance(adapter, Adapter)
    assert isinstance(adapter, EmbeddingAdapter) == (kind in EMBEDDING_KINDS)
    assert adapter.map_error(503, {}, None).code == "upstream_unavailable"


def test_an_unknown_kind_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(
        RegistryError, match="unknown provider kind 'telepathy'; known kinds: anthropic, gemini"
    ):
        parse_registry({"providers": {"p": {"kind": "telepathy"}}, "models": {}}, {})


# id, kind, base URL given, base URL used, routable
URLS = [
    ("ollama-bare-host-gets-http", "ollama", "gpu-box:11434", "http://gpu-box:11434", True),
    ("openai-keeps-its-url", "openai", "https://api.example.com/v1/", "https://api.example.com/v1", True),
    ("local-kind-needs-no-url", "mock", None, None, True),
    ("network-kind-needs-a-url", "anthropic", None, None, False),
]


@pytest.mark.parametrize(
    ("kind", "given", "used", "routable"), [u[1:] for u in URLS], ids=[u[0] for u in URLS]
)
def test_what_a_kind_says_about_its_urls(
    kind: str, given: str | None, used: str | None, routable: bool
) -> None:
    provider = {"kind": kind, "requires_key": False, **({"base_url": given} if given else {})}
    registry = parse_registry({"providers": {"p": provider}, "models": {}}, {})
    assert (registry.providers["p"].base_url, registry.providers["p"].routable) == (used, routable)


NEW_ADAPTER = """
from common.errors import UpstreamError, UpstreamUnavailable
from common.types import ChatResponse, Usage


class ParrotAdapter:
    def __init__(self, provider, session):
        self.provider = provider

    def complete(self, request, model):
        return ChatResponse(body={"choices": [{"message": {"content": request.messages[-1].text()}}]},
                            usage=Usage(prompt_tokens=1, completion_tokens=1))

    def stream(self, request, model):
        yield {"choices": [{"index": 0, "delta": {"content": request.messages[-1].text()}}]}

    def map_error(self, status, headers, data) -> UpstreamError:
        return UpstreamUnavailable(f"parrot failed: {status}")
"""


def test_a_new_kind_is_its_adapter_module_and_one_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.types import ChatRequest

    (tmp_path / "parrot_adapter.py").write_text(textwrap.dedent(NEW_ADAPTER))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(KINDS, "parrot", ProviderKind("parrot", "parrot_adapter:ParrotAdapter"))  # type: ignore[index]
    registry = parse_registry(
        {
            "providers": {"birds": {"kind": "parrot", "base_url": "http://parrot", "requires_key": False}},
            "models": {"polly": {"provider": "birds", "model": "polly-1"}},
        },
        {},
    )
    adapter = build_adapter(registry.providers["birds"], make_http_session(1))
    request = ChatRequest(model="polly", messages=[{"role": "user", "content": "hello"}])
    assert (
        adapter.complete(request, registry.models["polly"]).body["choices"][0]["message"]["content"]
        == "hello"
    )
    monkeypatch.delitem(sys.modules, "parrot_adapter")


def test_an_adapter_that_misses_a_method_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "half_adapter.py").write_text(
        "class HalfAdapter:\n    def __init__(self, provider, session):\n"
        "        pass\n    def complete(self, request, model):\n"
        "        return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(KINDS, "half", ProviderKind("half", "half_adapter:HalfAdapter"))  # type: ignore[index]
    with pytest.raises(TypeError, match="does not implement Adapter"):
        build_adapter(
            Provider(name="h", kind="half", base_url="http://h", requires_key=False), make_http_session(1)
        )
    monkeypatch.delitem(sys.modules, "half_adapter")


# id, provider fields, resolved (connect, first_byte, total, stream_total, idle)
DEADLINES = [
    ("defaults", {}, (5.0, 600.0, 600.0, 600.0, 600.0)),
    ("timeout-sets-all", {"timeout": 20}, (5.0, 20.0, 20.0, 20.0, 20.0)),
    (
        "each-its-own",
        {
            "timeout": 60,
            "connect_timeout": 2,
            "first_byte_timeout": 10,
            "stream_timeout": 300,
            "idle_timeout": 15,
        },
        (2.0, 10.0, 60.0, 300.0, 15.0),
    ),
    ("idle-defaults-to-first-byte", {"timeout": 60, "first_byte_timeout": 10}, (5.0, 10.0, 60.0, 60.0, 10.0)),
    (
        "capped-by-the-whole-call",
        {"timeout": 3, "connect_timeout": 5, "first_byte_timeout": 9},
        (3.0, 3.0, 3.0, 3.0, 3.0),
    ),
]


@pytest.mark.parametrize(("fields", "resolved"), [d[1:] for d in DEADLINES], ids=[d[0] for d in DEADLINES])
def test_deadlines_resolve_their_defaults(fields: dict[str, float], resolved: tuple[float, ...]) -> None:
    d = Provider(kind="openai", **fields).deadlines
    assert (d.connect, d.first_byte, d.total, d.stream_total, d.idle) == resolved
