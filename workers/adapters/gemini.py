"""Google Gemini API (``kind: gemini``): ``POST {base_url}/v1beta/models/{model}:generateContent``, and
``:streamGenerateContent?alt=sse`` when streaming. The key travels in the ``x-goog-api-key`` header,
never in the URL (where it would end up in logs and exception texts).

Translation lives in :mod:`common.protocols.gemini`; this module makes the call and maps Google's
errors (``{"error": {"code", "message", "status", "details": [...]}}``):

    429 RESOURCE_EXHAUSTED          UpstreamRateLimited; retry_after from ``Retry-After``, else the
                                    ``google.rpc.RetryInfo`` detail's ``retryDelay``
    401, 403, and 400 with an       UpstreamCredentialsRejected (Google answers a bad
    ErrorInfo reason API_KEY_*      key with 400 API_KEY_INVALID; its details can quote the key, so the
                                    upstream message is not passed on)
    408, 504 DEADLINE_EXCEEDED      UpstreamTimeout
    5xx (500 INTERNAL, 503 UNAVAILABLE)  UpstreamUnavailable
    other 4xx                       UpstreamRejected with Google's status and message
    200 with an error body, or      UpstreamBadResponse (a blocked prompt — ``promptFeedback.blockReason``
    without candidates              — is an answer: ``finish_reason`` "content_filter")
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from common.errors import (
    UpstreamBadResponse,
    UpstreamError,
)
from common.protocols import gemini as protocol
from common.registry import Model, Provider
from common.types import ChatRequest, ChatResponse
from workers.adapters import _http as http
from workers.adapters._http import HttpClient

API_VERSION = "v1beta"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_SECONDS = re.compile(r"^(\d+(?:\.\d+)?)s$")


class GeminiAdapter:
    def __init__(self, provider: Provider, session: HttpClient) -> None:
        self.provider = provider
        self.session = session
        self.headers = {"Content-Type": "application/json"}
        if provider.api_key:
            self.headers["x-goog-api-key"] = provider.api_key

    def url(self, model: Model, *, stream: bool) -> str:
        return f"{self.provider.base_url}/{API_VERSION}/{protocol.upstream_path(model.model, stream=stream)}"

    def map_error(self, status: int, headers: Mapping[str, str], data: Any) -> UpstreamError:
        return error_for(self.provider.name, status, headers, data)

    def complete(self, request: ChatRequest, model: Model) -> ChatResponse:
        call = self._post(self.url(model, stream=False), protocol.to_upstream(request), stream=False)
        data = call.answer(protocol.upstream_error_message)
        try:
            return protocol.from_upstream(data)
        except (ValueError, AttributeError, TypeError):
            raise UpstreamBadResponse(f"{self.provider.name} sent a malformed response") from None

    def stream(self, request: ChatRequest, model: Model) -> Iterator[dict[str, Any]]:
        call = self._post(self.url(model, stream=True), protocol.to_upstream(request), stream=True)
        mapper = protocol.UpstreamStreamMapper()
        try:
            for line in call.lines():
                if not line.startswith(b"data:"):
                    continue  # blank separators
                yield from mapper.feed(http.json_event(self.provider.name, line[5:]))
                if mapper.done:
                    call.finish()
                    return
            mapper.close()  # raises: the stream ended without a finishReason
        finally:
            call.close()

    def _post(self, url: str, body: dict[str, Any], *, stream: bool) -> http.UpstreamCall:
        return http.post(self.session, self.provider, url, body, self.headers, stream=stream,
                         error_for=error_for)


def error_for(provider: str, status: int, headers: Mapping[str, str], data: Any) -> UpstreamError:
    """Our error for a Google API error response."""
    error = _error_object(data)
    if any(reason.startswith("API_KEY_") for reason in _reasons(error)):  # Google says 400 for a bad key
        return http.credential_error(provider, status)
    message = (protocol.upstream_error_message(data) or f"HTTP {status}")[:2000]
    if error.get("status") == "RESOURCE_EXHAUSTED":
        status = 429
    retry_after = http.retry_after_seconds(headers)
    if status == 429 and retry_after is None:
        retry_after = retry_delay(error)
    return http.status_error(provider, status, message, retry_after=retry_after)


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



