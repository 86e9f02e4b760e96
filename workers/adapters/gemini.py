"""Google Gemini API (``kind: gemini``): ``POST {base_url}/v1beta/models/{model}:generateContent``, and
``:streamGenerateContent?alt=sse`` when streaming. The key travels in the ``x-goog-api-key`` header,
never in the URL (where it would end up in logs and exception texts).

Translation lives in :mod:`common.protocols.gemini`; this module makes the call and maps Google's
errors (``{"error": {"code", "message", "status", "details": [...]}}``):

    429 RESOURCE_EXHAUSTED          UpstreamRateLimited; retry_after from ``Retry-After``, else the
                                    ``google.rpc.RetryInfo`` detail's ``retryDelay``
    401, 403, and 400 with an       UpstreamUnavailable ``upstream_auth_failed`` (Google answers a bad
    ErrorInfo reason API_KEY_*      key with 400 API_KEY_INVALID; its details can quote the key, so the
                                    upstream message is not passed on)
    408, 504 DEADLINE_EXCEEDED      UpstreamTimeout
    5xx (500 INTERNAL, 503 UNAVAILABLE)  UpstreamUnavailable
    other 4xx                       UpstreamRejected with Google's status and message
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import requests
from urllib3.exceptions import ReadTimeoutError

from common.errors import (
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from common.protocols import gemini as protocol
from common.registry import Model, Provider
from common.types import ChatRequest, ChatResponse
from workers.adapters.base import register
from workers.adapters.openai import retry_after_seconds

API_VERSION = "v1beta"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_SECONDS = re.compile(r"^(\d+(?:\.\d+)?)s$")


@register("gemini")
class GeminiAdapter:
    def __init__(self, provider: Provider, session: requests.Session) -> None:
        self.provider = provider
        self.session = session
        self.headers = {"Content-Type": "application/json"}
        if provider.api_key:
            self.headers["x-goog-api-key"] = provider.api_key

    def url(self, model: Model, *, stream: bool) -> str:
        return f"{self.provider.base_url}/{API_VERSION}/{protocol.upstream_path(model.model, stream=stream)}"

    def complete(self, request: ChatRequest, model: Model) -> ChatResponse:
        response = self._post(self.url(model, stream=False), protocol.to_upstream(request), stream=False)
        try:
            return protocol.from_upstream(response.json())
        except (ValueError, AttributeError, TypeError):
            raise UpstreamUnavailable(f"{self.provider.name} sent a malformed response") from None
        finally:
            response.close()

    def stream(self, request: ChatRequest, model: Model) -> Iterator[dict[str, Any]]:
        response = self._post(self.url(model, stream=True), protocol.to_upstream(request), stream=True)
        mapper = protocol.UpstreamStreamMapper()
        try:
            for line in response.iter_lines():
                if not line.startswith(b"data:"):
                    continue  # blank separators
                yield from mapper.feed(_event(self.provider.name, line[5:]))
                if mapper.done:
                    return
            mapper.close()  # raises: the stream ended without a finishReason
        except requests.ConnectionError as exc:
            raise _broken_stream(self.provider.name, exc) from None
        except requests.exceptions.ChunkedEncodingError:
            raise UpstreamUnavailable(f"{self.provider.name} broke the stream off") from None
        finally:
            response.close()

    def _post(self, url: str, body: dict[str, Any], *, stream: bool) -> requests.Response:
        try:
            response = self.session.post(url, json=body, headers=self.headers, stream=stream,
                                         timeout=(self.provider.connect_timeout, self.provider.timeout))
        except requests.Timeout:
            raise UpstreamTimeout(f"{self.provider.name} did not answer within "
                                  f"{self.provider.timeout:g}s") from None
        except requests.ConnectionError:
            raise UpstreamUnavailable(f"cannot reach {self.provider.name}") from None
        except requests.RequestException:  # the body broke off while being read (stream=False)
            raise UpstreamUnavailable(f"{self.provider.name} broke its answer off") from None
        if response.status_code >= 400:
            try:
                raise error_for(self.provider.name, response.status_code, response.headers, _json(response))
            finally:
                response.close()
        return response


def error_for(provider: str, status: int, headers: Mapping[str, str], data: Any) -> UpstreamError:
    """Our error for a Google API error response."""
    error = _error_object(data)
    if status in (401, 403) or any(reason.startswith("API_KEY_") for reason in _reasons(error)):
        return UpstreamUnavailable(f"{provider} rejected the gateway's credentials (HTTP {status}); "
                                   "the operator must fix its API key", code="upstream_auth_failed")
    message = (protocol.upstream_error_message(data) or f"HTTP {status}")[:2000]
    if status == 429 or error.get("status") == "RESOURCE_EXHAUSTED":
        retry_after = retry_after_seconds(headers)
        if retry_after is None:
            retry_after = retry_delay(error)
        return UpstreamRateLimited(f"{provider} is rate limiting: {message}", retry_after=retry_after)
    if status in (408, 504):
        return UpstreamTimeout(f"{provider} timed out: {message}")
    if status >= 500:
        return UpstreamUnavailable(f"{provider} failed (HTTP {status}): {message}")
    return UpstreamRejected(message, status=status)


def retry_delay(error: dict[str, Any]) -> float | None:
    """Seconds of the ``google.rpc.RetryInfo`` detail (``"retryDelay": "36s"``, ``"0.5s"``), if any."""
    for detail in _details(error):
        if detail.get("@type") == RETRY_INFO:
            match = _SECONDS.match(str(detail.get("retryDelay", "")).strip())
            if match:
                return float(match[1])
    return None


def _error_object(data: Any) -> dict[str, Any]:
    if isinstance(data, list) and data:  # streamGenerateContent without alt=sse answers in an array
        data = data[0]
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, dict) else {}


def _details(error: dict[str, Any]) -> list[dict[str, Any]]:
    details = error.get("details")
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _reasons(error: dict[str, Any]) -> list[str]:
    return [str(d.get("reason", "")) for d in _details(error) if d.get("@type") == ERROR_INFO]


def _event(provider: str, data: bytes) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise UpstreamUnavailable(f"{provider} sent a malformed stream event")
    return event


def _broken_stream(provider: str, exc: requests.ConnectionError) -> UpstreamError:
    # requests reports a read timeout inside a streamed body as a ConnectionError wrapping urllib3's
    if exc.args and isinstance(exc.args[0], ReadTimeoutError):
        return UpstreamTimeout(f"{provider} stalled mid-stream")
    return UpstreamUnavailable(f"{provider} broke the stream off")


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
