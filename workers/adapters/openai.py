"""OpenAI Chat Completions, and any server that speaks it at a base URL (``kind: openai``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import requests

from common.errors import (
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from common.registry import Model, Provider
from common.types import ChatRequest, ChatResponse, EmbeddingsRequest, Usage
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
        try:
            response = self.session.post(url or self.url, json=body, headers=self.headers, stream=stream,
                                         timeout=(self.provider.connect_timeout, self.provider.timeout))
        except requests.Timeout:
            raise UpstreamTimeout(f"{self.provider.name} did not answer within {self.provider.timeout:g}s") from None
        except requests.ConnectionError:
            raise UpstreamUnavailable(f"cannot reach {self.provider.name}") from None
        if response.status_code >= 400:
            try:
                raise map_error(self.provider.name, response)
            finally:
                response.close()
        return response

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
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
            raise UpstreamUnavailable(f"{self.provider.name} broke the stream off") from None
        except requests.Timeout:
            raise UpstreamTimeout(f"{self.provider.name} stalled mid-stream") from None
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


def map_error(provider: str, response: requests.Response) -> UpstreamError:
    """Turn an OpenAI-style error response into ours. The upstream's own message passes through,
    except for credential errors, which are the gateway operator's problem, not the caller's."""
    status = response.status_code
    message = _upstream_message(response)
    if status == 429:
        retry_after = retry_after_seconds(response.headers)
        if retry_after is None:
            retry_after = quota_exhausted_for(response.headers) or None
        return UpstreamRateLimited(f"{provider} is rate limiting: {message}", retry_after=retry_after)
    if status in (401, 403):
        return UpstreamUnavailable(f"{provider} rejected the gateway's credentials (HTTP {status}); "
                                   "the operator must fix its API key", code="upstream_auth_failed")
    if status in (408, 504):
        return UpstreamTimeout(f"{provider} timed out: {message}")
    if status >= 500:
        return UpstreamUnavailable(f"{provider} failed (HTTP {status}): {message}")
    return UpstreamRejected(message, status=status)


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds to wait per ``retry-after-ms`` / ``Retry-After`` (OpenAI sends both)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) / scale)
            except ValueError:
                continue
    return None


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


def _upstream_message(response: requests.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:2000]
    if isinstance(error, str):
        return error[:2000]
    return f"HTTP {response.status_code}"
