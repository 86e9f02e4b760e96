"""Anthropic Messages API (``kind: anthropic``): ``POST {base_url}/v1/messages``.

Translation lives in :mod:`common.protocols.anthropic`; this module makes the call and maps errors:

    429 rate_limit_error          UpstreamRateLimited; retry_after from ``retry-after``, else the reset
                                  of the spent ``anthropic-ratelimit-*`` limit
    401, 403                      UpstreamCredentialsRejected (the operator's key; the upstream
                                  message is not passed on)
    408, 504                      UpstreamTimeout
    529 overloaded_error, 5xx     UpstreamUnavailable
    other 4xx                     UpstreamRejected with Anthropic's status and message

A 200 that is an error body or a message without ``content`` is UpstreamBadResponse. A successful
answer whose ``anthropic-ratelimit-*-remaining`` reads 0 reports ``quota_reset_s`` so
the workers hold back before the 429s come.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from common.errors import (
    UpstreamBadResponse,
    UpstreamError,
    UpstreamUnavailable,
)
from common.protocols import anthropic as protocol
from common.registry import Model, Provider
from common.types import ChatRequest, ChatResponse
from workers.adapters import _http as http
from workers.adapters._http import HttpClient

API_VERSION = "2023-06-01"
# the limits Anthropic reports in anthropic-ratelimit-<limit>-{limit,remaining,reset}
RATE_LIMITS = ("requests", "tokens", "input-tokens", "output-tokens")


class AnthropicAdapter:
    def __init__(self, provider: Provider, session: HttpClient) -> None:
        self.provider = provider
        self.session = session
        self.url = f"{provider.base_url}/v1/messages"
        self.headers = {"content-type": "application/json", "anthropic-version": API_VERSION}
        if provider.api_key:
            self.headers["x-api-key"] = provider.api_key

    def map_error(self, status: int, headers: Mapping[str, str], data: Any) -> UpstreamError:
        return error_for(self.provider.name, status, headers, data)

    def complete(self, request: ChatRequest, model: Model) -> ChatResponse:
        body = self._body(request, model)
        body.pop("stream", None)
        call = self._post(body, stream=False)
        data = call.answer(protocol.upstream_error_message)
        try:
            answer = protocol.from_upstream(data)
        except (AttributeError, TypeError, ValueError):
            raise UpstreamBadResponse(f"{self.provider.name} sent a malformed response") from None
        return answer.model_copy(update={"quota_reset_s": quota_exhausted_for(call.headers)})

    def stream(self, request: ChatRequest, model: Model) -> Iterator[dict[str, Any]]:
        body = self._body(request, model)
        body["stream"] = True
        call = self._post(body, stream=True)
        mapper = protocol.UpstreamStreamMapper()
        try:
            for line in call.lines():
                if not line.startswith(b"data:"):
                    continue  # "event:" names repeat the data's "type"; blank separators
                yield from mapper.feed(http.json_event(self.provider.name, line[5:]))
                if mapper.done:
                    call.finish()
                    return
            mapper.close()  # raises: the stream ended before message_stop
        finally:
            call.close()

    def _body(self, request: ChatRequest, model: Model) -> dict[str, Any]:
        # Anthropic requires max_tokens; a caller who set none gets the model's ceiling, as OpenAI would
        default = model.max_output_tokens or protocol.DEFAULT_MAX_TOKENS
        return protocol.to_upstream(request, model.model, default_max_tokens=default)

    def _post(self, body: dict[str, Any], *, stream: bool) -> http.UpstreamCall:
        return http.post(self.session, self.provider, self.url, body, self.headers, stream=stream,
                         error_for=error_for)


def error_for(provider: str, status: int, headers: Mapping[str, str], data: Any) -> UpstreamError:
    """Our error for an Anthropic error response (``{"type": "error", "error": {"type", "message"}}``)."""
    message = (protocol.upstream_error_message(data) or f"HTTP {status}")[:2000]
    if status == 529:
        return UpstreamUnavailable(f"{provider} is overloaded: {message}")
    retry_after = http.retry_after_seconds(headers)
    if status == 429 and retry_after is None:
        retry_after = quota_exhausted_for(headers) or None
    return http.status_error(provider, status, message, retry_after=retry_after)


def quota_exhausted_for(headers: Mapping[str, str], *, now: datetime | None = None) -> float:
    """Seconds until Anthropic's spent limit refills: for every ``anthropic-ratelimit-<limit>-remaining``
    that reads 0, the time to its ``-reset`` (an RFC 3339 timestamp); at least 1 s for a spent limit
    whose reset is unreadable or past; 0 when nothing is spent."""
    now = now or datetime.now(UTC)
    wait = 0.0
    for limit in RATE_LIMITS:
        remaining = headers.get(f"anthropic-ratelimit-{limit}-remaining")
        if remaining is None or remaining.strip() != "0":
            continue
        reset = parse_timestamp(headers.get(f"anthropic-ratelimit-{limit}-reset") or "")
        seconds = (reset - now).total_seconds() if reset else 0.0
        wait = max(wait, seconds if seconds > 0 else 1.0)
    return wait


def parse_timestamp(text: str) -> datetime | None:
    """An RFC 3339 timestamp (``2025-01-01T00:00:30Z``) as an aware datetime; None if unreadable."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)



