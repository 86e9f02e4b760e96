"""The HTTP plumbing every adapter shares: one POST with our timeouts and transport-error mapping,
the status → error mapping all providers agree on, and reading JSON bodies and stream events."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import requests
from urllib3.exceptions import ReadTimeoutError

from common.errors import (
    UpstreamCredentialsRejected,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from common.registry import Provider

ErrorFor = Callable[[str, int, Mapping[str, str], Any], UpstreamError]


def post(session: requests.Session, provider: Provider, url: str, body: dict[str, Any], headers: Mapping[str, str],
         *, stream: bool, error_for: ErrorFor) -> requests.Response:
    """POST ``body``; transport failures and error statuses become our ``Upstream*`` errors."""
    try:
        response = session.post(url, json=body, headers=headers, stream=stream,
                                timeout=(provider.connect_timeout, provider.timeout))
    except requests.Timeout:
        raise UpstreamTimeout(f"{provider.name} did not answer within {provider.timeout:g}s") from None
    except requests.ConnectionError:
        raise UpstreamUnavailable(f"cannot reach {provider.name}") from None
    except requests.RequestException:  # the body broke off while being read (stream=False)
        raise UpstreamUnavailable(f"{provider.name} broke its answer off") from None
    raise_for_status(provider.name, response, error_for)
    return response


def raise_for_status(provider: str, response: requests.Response, error_for: ErrorFor) -> None:
    if response.status_code >= 400:
        try:
            raise error_for(provider, response.status_code, response.headers, response_json(response))
        finally:
            response.close()


def status_error(provider: str, status: int, message: str, *, retry_after: float | None = None) -> UpstreamError:
    """What an error status means whoever sent it. Credential errors are the gateway operator's
    problem, not the caller's, and their messages are not passed on (they can quote key material)."""
    if status == 429:
        return UpstreamRateLimited(f"{provider} is rate limiting: {message}", retry_after=retry_after)
    if status in (401, 403):
        return credential_error(provider, status)
    if status in (408, 504):
        return UpstreamTimeout(f"{provider} timed out: {message}")
    if status >= 500:
        return UpstreamUnavailable(f"{provider} failed (HTTP {status}): {message}")
    return UpstreamRejected(message[:2000], status=status)


def credential_error(provider: str, status: int) -> UpstreamError:
    return UpstreamCredentialsRejected(f"{provider} rejected the gateway's credentials (HTTP {status}); "
                                       "the operator must fix its API key")


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait per ``retry-after-ms`` / ``Retry-After`` (OpenAI sends both)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) / scale)
            except ValueError:
                continue
    return None


def broken_stream(provider: str, exc: requests.RequestException) -> UpstreamError:
    """A streamed body that failed mid-way. requests reports a read timeout inside a streamed body as
    a ConnectionError wrapping urllib3's ReadTimeoutError: that one is a stall, not a break."""
    if isinstance(exc, requests.Timeout) or (exc.args and isinstance(exc.args[0], ReadTimeoutError)):
        return UpstreamTimeout(f"{provider} stalled mid-stream")
    return UpstreamUnavailable(f"{provider} broke the stream off")


def json_event(provider: str, data: bytes, what: str = "stream event") -> dict[str, Any]:
    """One JSON object from a stream (an SSE ``data:`` payload or an NDJSON line)."""
    try:
        event = json.loads(data)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise UpstreamUnavailable(f"{provider} sent a malformed {what}")
    return event


def response_json(response: requests.Response) -> Any:
    """The body as JSON, or None (error bodies are not always JSON)."""
    try:
        return response.json()
    except ValueError:
        return None
