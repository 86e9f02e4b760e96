"""Ollama's native chat API (``kind: ollama``): ``POST {host}/api/chat``, NDJSON when streaming.

Translation lives in :mod:`common.protocols.ollama`; this module makes the call, fails over between
hosts and maps errors (bodies are ``{"error": "<text>"}``):

    a host refuses the connection, or     the next of ``provider.fallback_base_urls`` is tried, in order;
    sends nothing before the timeout      when none answers: UpstreamUnavailable / UpstreamTimeout
    404 (model not pulled)                UpstreamRejected 404 with Ollama's message
    429                                   UpstreamRateLimited (Ollama behind a proxy, ollama.com)
    401, 403                              UpstreamUnavailable ``upstream_auth_failed``
    408, 504                              UpstreamTimeout
    5xx (503: its queue is full)          UpstreamUnavailable
    other 4xx                             UpstreamRejected with Ollama's status and message

Failover happens only before the first byte of an answer: a host that answered, even with an error,
is the one that counts, and a stream that breaks later is not replayed elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import requests

from common.errors import (
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from common.protocols import ollama as protocol
from common.registry import Model, Provider
from common.types import ChatRequest, ChatResponse
from workers.adapters import _http as http
from workers.adapters.base import register

log = logging.getLogger(__name__)


@register("ollama")
class OllamaAdapter:
    def __init__(self, provider: Provider, session: requests.Session) -> None:
        self.provider = provider
        self.session = session
        self.hosts = tuple(h for h in (provider.base_url, *provider.fallback_base_urls) if h)
        self.headers = {"Content-Type": "application/json"}
        if provider.api_key:  # plain Ollama has no auth; a proxy in front of it, or ollama.com, has
            self.headers["Authorization"] = f"Bearer {provider.api_key}"

    def complete(self, request: ChatRequest, model: Model) -> ChatResponse:
        body = protocol.to_upstream(request, model.model)
        body["stream"] = False  # Ollama streams unless told not to
        response = self._post(body, stream=False)
        try:
            return protocol.from_upstream(response.json())
        except (ValueError, AttributeError, TypeError):
            raise UpstreamUnavailable(f"{self.provider.name} sent a malformed response") from None
        finally:
            response.close()

    def stream(self, request: ChatRequest, model: Model) -> Iterator[dict[str, Any]]:
        body = protocol.to_upstream(request, model.model)
        body["stream"] = True
        response = self._post(body, stream=True)
        mapper = protocol.UpstreamStreamMapper()
        try:
            for line in response.iter_lines():
                if not line.strip():
                    continue
                yield from mapper.feed(http.json_event(self.provider.name, line))
                if mapper.done:
                    return
            mapper.close()  # raises: the stream ended before its "done": true object
        except requests.ConnectionError as exc:
            raise http.broken_stream(self.provider.name, exc) from None
        except requests.exceptions.ChunkedEncodingError:
            raise UpstreamUnavailable(f"{self.provider.name} broke the stream off") from None
        finally:
            response.close()

    def _post(self, body: dict[str, Any], *, stream: bool) -> requests.Response:
        """POST to the first host that answers; see the module docstring for what counts as not answering."""
        if not self.hosts:
            raise UpstreamUnavailable(f"{self.provider.name} has no host configured")
        timed_out = False
        for number, host in enumerate(self.hosts, start=1):
            try:
                response = self.session.post(f"{host}/api/chat", json=body, headers=self.headers,
                                             stream=stream, timeout=(self.provider.connect_timeout,
                                                                     self.provider.timeout))
            except requests.ConnectionError:  # refused, reset, or no connection within connect_timeout
                timed_out = False
            except requests.Timeout:  # connected, but no answer within the read timeout
                timed_out = True
            except requests.RequestException:  # it answered, then broke off (stream=False): no failover
                raise UpstreamUnavailable(f"{self.provider.name} broke its answer off") from None
            else:
                http.raise_for_status(self.provider.name, response, error_for)
                return response
            if number < len(self.hosts):
                log.warning("%s: host %d of %d (%s) did not answer; trying the next", self.provider.name,
                            number, len(self.hosts), host)
        which = f" (none of its {len(self.hosts)} hosts answered)" if len(self.hosts) > 1 else ""
        if timed_out:
            raise UpstreamTimeout(f"{self.provider.name} did not answer within "
                                  f"{self.provider.timeout:g}s{which}")
        raise UpstreamUnavailable(f"cannot reach {self.provider.name}{which}")


def error_for(provider: str, status: int, headers: Mapping[str, str], data: Any) -> UpstreamError:
    """Our error for an Ollama error response (``{"error": "model 'x' not found"}``)."""
    message = (protocol.upstream_error_message(data) or f"HTTP {status}")[:2000]
    return http.status_error(provider, status, message, retry_after=http.retry_after_seconds(headers))



