"""OpenAI Chat Completions, and any server that speaks it at a base URL (``kind: openai``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import requests

from common.errors import (
    UpstreamError,
    UpstreamUnavailable,
)
from common.registry import Model, Provider
from common.types import ChatRequest, ChatResponse, EmbeddingsRequest, Usage
from workers.adapters import _http as http
from workers.adapters._http import retry_after_seconds  # noqa: F401  (part of this module's surface)
from workers.adapters.base import register


@register("openai")
class OpenAIAdapter:
    def __init__(self, provider: Provider, session: requests.Session) -> None:
        self.provider = provider
        self.session = session
        self.url = f"{provider.base_url}/chat/completions"
        self.embeddings_url = f"{provider.base_url}/embeddings"
        self.headers = {"Content-Type": "application/json"}
        if provider.api_key:
            self.headers["Authorization"] = f"Bearer {provider.api_key}"

    def embed(self, request: EmbeddingsRequest, model: Model) -> ChatResponse:
        response = self._post(request.upstream_body(model.model), stream=False, url=self.embeddings_url)
        try:
            data = response.json()
            usage = data.get("usage") or {}
            return ChatResponse(body=data, usage=Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0)))
        except (ValueError, AttributeError):
            raise UpstreamUnavailable(f"{self.provider.name} sent a malformed response") from None

    def _post(self, body: dict[str, Any], *, stream: bool, url: str | None = None) -> requests.Response:
        return http.post(self.session, self.provider, url or self.url, body, self.headers, stream=stream,
                         error_for=error_for)

    def stream(self, request: ChatRequest, model: Model) -> Iterator[dict[str, Any]]:
        body = request.upstream_body(model.model)
        body["stream"] = True
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}  # we bill by it
        response = self._post(body, stream=True)
        try:
            for line in response.iter_lines():
                if not line.startswith(b"data:"):
                    continue  # SSE comments, blank separators, event names
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise UpstreamUnavailable(f"{self.provider.name} sent a malformed stream event") from None
                if isinstance(chunk, dict) and chunk.get("error"):
                    raise UpstreamUnavailable(f"{self.provider.name} failed mid-stream: {chunk['error']}")
                yield chunk
            raise UpstreamUnavailable(f"{self.provider.name} ended the stream without [DONE]")
        except requests.RequestException as exc:
            raise http.broken_stream(self.provider.name, exc) from None
        finally:
            response.close()

    def complete(self, request: ChatRequest, model: Model) -> ChatResponse:
        response = self._post(request.upstream_body(model.model), stream=False)
        try:
            data = response.json()
            usage = data.get("usage") or {}
            return ChatResponse(body=data, usage=Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                                       completion_tokens=int(usage.get("completion_tokens") or 0)),
                                quota_reset_s=quota_exhausted_for(response.headers))
        except (ValueError, AttributeError):
            raise UpstreamUnavailable(f"{self.provider.name} sent a malformed response") from None
        except requests.RequestException:  # the body broke off while being read
            raise UpstreamUnavailable(f"{self.provider.name} broke its answer off") from None


def map_error(provider: str, response: requests.Response) -> UpstreamError:
    """Our error for an OpenAI-style error response."""
    return error_for(provider, response.status_code, response.headers, http.response_json(response))


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


def _upstream_message(data: Any, status: int) -> str:
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:2000]
    if isinstance(error, str):
        return error[:2000]
    return f"HTTP {status}"
