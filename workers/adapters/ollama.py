"""Ollama's native chat API (``kind: ollama``): ``POST {host}/api/chat``, NDJSON when streaming.

Translation lives in :mod:`common.protocols.ollama`; this module makes the call, fails over between
hosts and maps errors (bodies are ``{"error": "<text>"}``):

    a host refuses the connection, or     the next of ``provider.fallback_base_urls`` is tried, in order;
    sends nothing before the timeout      when none answers: UpstreamUnavailable / UpstreamTimeout
    404 (model not pulled)                UpstreamRejected 404 with Ollama's message
    429                                   UpstreamRateLimited (Ollama behind a proxy, ollama.com)
    401, 403                              UpstreamCredentialsRejected
    408, 504                              UpstreamTimeout
    5xx (503: its queue is full)          UpstreamUnavailable
    other 4xx                             UpstreamRejected with Ollama's status and message
    200 with ``{"error"}`` or no message  UpstreamBadResponse

Failover happens only before the first byte of an answer: a host that answered, even with an error,
is the one that counts, and a stream that breaks later is not replayed elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from common.errors import (
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from common.protocols import ollama as protocol
from common.registry import Model, Provider
from common.types import ChatRequest, ChatResponse
from workers.adapters import _http as http
from workers.adapters._deadline import CallClock
from workers.adapters._http import HttpClient

log = logging.getLogger(__name__)


class OllamaAdapter:
    def __init__(self, provider: Provider, session: HttpClient) -> None:
        self.provider = provider
        self.session = session
        self.hosts = tuple(h for h in (provider.base_url, *provider.fallback_base_urls) if h)
        self.headers = {"Content-Type": "application/json"}
        if provider.api_key:  # plain Ollama has no auth; a proxy in front of it, or ollama.com, has
            self.headers["Authorization"] = f"Bearer {provider.api_key}"

    def map_error(self, status: int, headers: Mapping[str, str], data: Any) -> UpstreamError:
        return error_for(self.provider.name, status, headers, data)

    def complete(self, request: ChatRequest, model: Model) -> ChatResponse:
        body = protocol.to_upstream(request, model.model)
        body["stream"] = False  # Ollama streams unless told not to
        call = self._post(body, stream=False)
        data = call.answer(protocol.upstream_error_message)
        try:
            return protocol.from_upstream(data)
        except (ValueError, AttributeError, TypeError):
            raise UpstreamBadResponse(f"{self.provider.name} sent a malformed response") from None

    def stream(self, request: ChatRequest, model: Model) -> Iterator[dict[str, Any]]:
        body = protocol.to_upstream(request, model.model)
        body["stream"] = True
        call = self._post(body, stream=True)
        mapper = protocol.UpstreamStreamMapper()
        try:
            for line in call.lines():
                if not line.strip():
                    continue
                yield from mapper.feed(http.json_event(self.provider.name, line))
                if mapper.done:
                    call.finish()
                    return
            mapper.close()  # raises: the stream ended before its "done": true object
        finally:
            call.close()

    def _post(self, body: dict[str, Any], *, stream: bool) -> http.UpstreamCall:
        """POST to the first host that answers; see the module docstring for what counts as not answering.
        Each host tried gets the provider's deadlines afresh (a host that timed out answered nothing)."""
        if not self.hosts:
            raise UpstreamUnavailable(f"{self.provider.name} has no host configured")
        timed_out = False
        for number, host in enumerate(self.hosts, start=1):
            clock = CallClock(self.provider.name, self.provider.deadlines, stream=stream)
            try:
                response = http.send(self.session, f"{host}/api/chat", body, self.headers, clock)
            except http.NotConnected:  # refused, reset, or no connection within connect_timeout
                timed_out = False
            except http.NoAnswer:  # connected, but no answer within the first-byte timeout
                timed_out = True
            else:
                return http.answered(self.provider.name, response, clock, error_for)
            if number < len(self.hosts):
                log.warning("%s: host %d of %d (%s) did not answer; trying the next", self.provider.name,
                            number, len(self.hosts), host)
        which = f" (none of its {len(self.hosts)} hosts answered)" if len(self.hosts) > 1 else ""
        if timed_out:
            raise UpstreamTimeout(f"{self.provider.name} did not answer within "
                                  f"{self.provider.deadlines.first_byte:g}s{which}")
        raise UpstreamUnavailable(f"cannot reach {self.provider.name}{which}")


def error_for(provider: str, status: int, headers: Mapping[str, str], data: Any) -> UpstreamError:
    """Our error for an Ollama error response (``{"error": "model 'x' not found"}``)."""
    message = (protocol.upstream_error_message(data) or f"HTTP {status}")[:2000]
    return http.status_error(provider, status, message, retry_after=http.retry_after_seconds(headers))



