"""OpenAI Chat Completions, and any server that speaks it at a base URL (``kind: openai``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from common.errors import (
    UpstreamBadResponse,
    UpstreamError,
    UpstreamUnavailable,
)
from common.registry import Model, Provider
from common.types import ChatRequest, ChatResponse, EmbeddingsRequest, Usage
from workers.adapters import _http as http
from workers.adapters._http import (
    HttpClient,
    retry_after_seconds,  # noqa: F401  (part of this module's surface)
)


class OpenAIAdapter:
    def __init__(self, provider: Provider, session: HttpClient) -> None:
        self.provider = provider
        self.session = session
        self.url = f"{provider.base_url}/chat/completions"
        self.embeddings_url = f"{provider.base_url}/embeddings"
        self.headers = {"Content-Type": "application/json"}
        if provider.api_key:
            self.headers["Authorization"] = f"Bearer {provider.api_key}"

    def map_error(self, status: int, headers: Mapping[str, str], data: Any) -> UpstreamError:
        return error_for(self.provider.name, status, headers, data)

    def embed(self, request: EmbeddingsRequest, model: Model) -> ChatResponse:
        data, _ = self._answer(request.upstream_body(model.model), self.embeddings_url, embeddings_problem)
        return ChatResponse(body=data, usage=usage_of(data))

    def _answer(self, body: dict[str, Any], url: str, problem_of: Callable[[dict[str, Any]], str | None],
                ) -> tuple[dict[str, Any], Mapping[str, str]]:
        """A non-streamed call's answer (and headers), checked to be one (``problem_of`` says what is
        missing when it is not)."""
        call = self._post(body, stream=False, url=url)
        data = call.answer(upstream_error_message)
        problem = problem_of(data)
        if problem:
            raise UpstreamBadResponse(f"{self.provider.name} sent {problem}")
        return data, call.headers

    def _post(self, body: dict[str, Any], *, stream: bool, url: str | None = None) -> http.UpstreamCall:
        return http.post(self.session, self.provider, url or self.url, body, self.headers, stream=stream,
                         error_for=error_for)

    def stream(self, request: ChatRequest, model: Model) -> Iterator[dict[str, Any]]:
        body = request.upstream_body(model.model)
        body["stream"] = True
        # we bill by the usage chunk, so ask for it whatever the caller asked
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        call = self._post(body, stream=True)
        answered = False  # a stream that ends before any choice is no answer (and nothing went out)
        try:
            for line in call.lines():
                if not line.startswith(b"data:"):
                    continue  # SSE comments, blank separators, event names
                data = line[5:].strip()
                if data == b"[DONE]":
                    if not answered:
                        raise UpstreamBadResponse(f"{self.provider.name} sent a stream without choices")
                    call.finish()
                    return
                chunk = http.json_event(self.provider.name, data)
                if chunk.get("error"):
                    raise UpstreamBadResponse(f"{self.provider.name} failed mid-stream: "
                                              f"{_upstream_message(chunk, 200)}")
                answered = answered or bool(chunk.get("choices"))
                yield chunk
            raise UpstreamUnavailable(f"{self.provider.name} ended the stream without [DONE]")
        finally:
            call.close()

    def complete(self, request: ChatRequest, model: Model) -> ChatResponse:
        data, headers = self._answer(request.upstream_body(model.model), self.url, completion_problem)
        return ChatResponse(body=data, usage=usage_of(data), quota_reset_s=quota_exhausted_for(headers))


def usage_of(data: dict[str, Any]) -> Usage:
    """The billable usage of an OpenAI answer (``Usage`` makes the counts sane)."""
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return Usage.model_validate({"prompt_tokens": usage.get("prompt_tokens"),
                                 "completion_tokens": usage.get("completion_tokens")})


def completion_problem(data: dict[str, Any]) -> str | None:
    """What makes a 200 chat.completion no answer (None when it is one): it needs choices, each
    with a message."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return "a completion without choices"
    if not all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices):
        return "a completion choice without a message"
    return None


def embeddings_problem(data: dict[str, Any]) -> str | None:
    """What makes a 200 embeddings list no answer: it needs ``data``, one entry per input at least."""
    if not isinstance(data.get("data"), list) or not data["data"]:
        return "an embeddings answer without data"
    return None


def error_for(provider: str, status: int, headers: Any, data: Any) -> UpstreamError:
    retry_after = http.retry_after_seconds(headers)
    if status == 429 and retry_after is None:
        retry_after = quota_exhausted_for(headers) or None
    return http.status_error(provider, status, _upstream_message(data, status), retry_after=retry_after)


def quota_exhausted_for(headers: Any) -> float:
    """Seconds until OpenAI's quota refills when its ``x-ratelimit-remaining-*`` headers say a limit is
    spent (``x-ratelimit-reset-*`` reads like ``1s``, ``6m0s``, ``120ms``); 0 when nothing is spent."""
    wait = 0.0
    for kind in ("requests", "tokens"):
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        if remaining is not None and remaining.strip() == "0":
            wait = max(wait, parse_duration(headers.get(f"x-ratelimit-reset-{kind}", "")) or 1.0)
    return wait


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """``"6m0s"`` → 360.0, ``"120ms"`` → 0.12, ``"1.5s"`` → 1.5; None if unreadable."""
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)


def upstream_error_message(data: Any) -> str | None:
    """The message of an OpenAI error body (``{"error": {"message": …}}``; some servers send a string)."""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str) and error:
        return error
    return None


def _upstream_message(data: Any, status: int) -> str:
    return (upstream_error_message(data) or f"HTTP {status}")[:2000]
