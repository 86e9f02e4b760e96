"""The HTTP plumbing every adapter shares: one POST under the call's deadlines with transport-error
mapping (:func:`post`, giving an :class:`UpstreamCall`), the status → error mapping all providers agree
on, and reading JSON answers and stream events.

Every call is made with ``stream=True`` so that its body is read under the :class:`CallClock` (a
non-streamed body read inside ``session.post`` could not be cut off at the call's deadline)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import requests
from urllib3.exceptions import ReadTimeoutError

from common.errors import (
    UpstreamBadResponse,
    UpstreamCredentialsRejected,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from common.registry import Provider
from workers.adapters._deadline import CURRENT_CLOCK, CallClock

ErrorFor = Callable[[str, int, Mapping[str, str], Any], UpstreamError]


class UpstreamCall:
    """An answer whose headers are in (status 2xx), with the rest to be read under its deadlines."""

    def __init__(self, provider: str, response: requests.Response, clock: CallClock) -> None:
        self.provider = provider
        self.response = response
        self.clock = clock
        clock.watch(response)

    @property
    def headers(self) -> Mapping[str, str]:
        return self.response.headers

    def json(self) -> Any:
        """The whole body as JSON. A body the deadline cut off is an ``UpstreamTimeout``; one that broke
        off an ``UpstreamUnavailable``; one that is not JSON an ``UpstreamBadResponse``."""
        try:
            content = self.response.content
        except requests.RequestException:
            raise self._expired() or UpstreamUnavailable(f"{self.provider} broke its answer off") from None
        expired = self._expired()
        if expired:
            raise expired
        try:
            return json.loads(content)
        except ValueError:
            raise UpstreamBadResponse(f"{self.provider} sent an answer that is not JSON") from None

    def answer(self, error_message: Callable[[Any], str | None]) -> dict[str, Any]:
        """The whole body as a JSON object that is not an error body (:func:`answer_object`); closes
        the call."""
        try:
            return answer_object(self.provider, self.json(), error_message)
        finally:
            self.close()

    def lines(self) -> Iterator[bytes]:
        """The body's lines as they arrive (SSE or NDJSON); each one resets the idle deadline."""
        try:
            for line in self.response.iter_lines():
                self.clock.progress()
                yield line
        except requests.RequestException as exc:
            raise self._expired() or broken_stream(self.provider, exc) from None
        expired = self._expired()
        if expired:  # the cut socket read as a clean end of the body
            raise expired

    def close(self) -> None:
        self.clock.stop()
        self.response.close()

    def _expired(self) -> UpstreamTimeout | None:
        return self.clock.timeout_error() if self.clock.expired else None


def send(session: requests.Session, url: str, body: dict[str, Any], headers: Mapping[str, str],
         clock: CallClock) -> requests.Response:
    """The POST itself, up to the answer's headers, under ``clock`` (started here; stopped if the POST
    fails); requests' exceptions pass through (callers that fail over between hosts tell a refused
    connection from a silent one) — a connection the clock cut as a ``requests.Timeout``."""
    token = CURRENT_CLOCK.set(clock)
    clock.start()
    try:
        return session.post(url, json=body, headers=headers, stream=True, timeout=clock.request_timeout)
    except requests.RequestException as exc:
        clock.stop()
        if clock.expired and not isinstance(exc, requests.Timeout):
            raise requests.ReadTimeout(clock.timeout_error().message) from None
        raise
    finally:
        CURRENT_CLOCK.reset(token)


def post(session: requests.Session, provider: Provider, url: str, body: dict[str, Any],
         headers: Mapping[str, str], *, stream: bool, error_for: ErrorFor) -> UpstreamCall:
    """POST ``body``; transport failures and error statuses become our ``Upstream*`` errors."""
    clock = CallClock(provider.name, provider.deadlines, stream=stream)
    try:
        response = send(session, url, body, headers, clock)
    except requests.Timeout as exc:
        raise (clock.timeout_error() if clock.expired else first_byte_timeout(provider, exc)) from None
    except requests.ConnectionError:
        raise UpstreamUnavailable(f"cannot reach {provider.name}") from None
    except requests.RequestException:
        raise UpstreamUnavailable(f"{provider.name} broke its answer off") from None
    return answered(provider.name, response, clock, error_for)


def answered(provider: str, response: requests.Response, clock: CallClock,
             error_for: ErrorFor) -> UpstreamCall:
    """The call whose headers are in; an error status raised as our error (its body read under the
    call's deadlines too)."""
    call = UpstreamCall(provider, response, clock)
    if response.status_code >= 400:
        try:
            raise error_for(provider, response.status_code, response.headers, response_json(response))
        finally:
            call.close()
    return call


def first_byte_timeout(provider: Provider, exc: requests.Timeout) -> UpstreamTimeout:
    deadlines = provider.deadlines
    if isinstance(exc, requests.ConnectTimeout):
        return UpstreamTimeout(f"cannot connect to {provider.name} within {deadlines.connect:g}s")
    return UpstreamTimeout(f"{provider.name} did not answer within {deadlines.first_byte:g}s")


def status_error(provider: str, status: int, message: str, *,
                 retry_after: float | None = None) -> UpstreamError:
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
        raise UpstreamBadResponse(f"{provider} sent a malformed {what}")
    return event


def answer_object(provider: str, data: Any, error_message: Callable[[Any], str | None]) -> dict[str, Any]:
    """A 200 answer that is a JSON object and not an error: some upstreams (and proxies in front of
    them) answer 200 with an error body, which must not pass for an empty success."""
    if not isinstance(data, dict):
        raise UpstreamBadResponse(f"{provider} sent an answer that is not a JSON object")
    if data.get("error") or data.get("type") == "error":
        message = error_message(data) or "no message"
        raise UpstreamBadResponse(f"{provider} answered 200 with an error: {message[:500]}")
    return data


def response_json(response: requests.Response) -> Any:
    """The body as JSON, or None (error bodies are not always JSON, nor always whole)."""
    try:
        return response.json()
    except (ValueError, requests.RequestException):
        return None
