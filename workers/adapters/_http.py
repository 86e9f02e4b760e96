"""The HTTP plumbing every adapter shares: the pooled client (:class:`HttpClient`, urllib3 underneath),
one POST under the call's deadlines with transport-error mapping (:func:`post`, giving an
:class:`UpstreamCall`), the status → error mapping all providers agree on, and reading JSON answers and
stream events.

Every body is read after the headers, under the :class:`CallClock` (a body read inside the request
could not be cut off at the call's deadline). The client is urllib3's pool manager, called directly:
requests' per-call request preparation, hooks, cookie jar and Response building cost the worker more
CPU than the rest of the call (bench/upstream_client.py, docs/benchmarks.md "httpclient")."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import certifi
import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError
from urllib3.util import make_headers

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
from workers.adapters._deadline import CURRENT_CLOCK, CallClock, guarded_pool_classes

ErrorFor = Callable[[str, int, Mapping[str, str], Any], UpstreamError]
Response = urllib3.BaseHTTPResponse
# what every call sends besides its adapter's headers (gzip'd answers are decoded as they are read)
DEFAULT_HEADERS = {"User-Agent": "llm-gateway", **make_headers(accept_encoding=True)}
READ_SIZE = 512  # bytes per read of a streamed body, as requests' iter_lines reads
# how long, and how much, the rest of a stream whose last event is in may take to come (see finish())
FINISH_S = 0.05
FINISH_BYTES = 65536


class HttpClient:
    """One pooled, keep-alive client per worker process and provider: ``pool_size`` connections per
    host, no retries, no redirects, no proxy or netrc lookups from the environment, TLS verified
    against certifi's CA bundle (as requests did; slim images have no system CAs). Its connections
    hand their socket to the call's clock (:mod:`workers.adapters._deadline`), so a drip-fed answer is
    cut before its headers are in too."""

    def __init__(self, pool_size: int) -> None:
        self.pools = urllib3.PoolManager(num_pools=4, maxsize=pool_size, block=False, retries=False,
                                         ca_certs=certifi.where())
        self.pools.pool_classes_by_scheme = guarded_pool_classes()

    def post(self, url: str, body: bytes, headers: Mapping[str, str], clock: CallClock) -> Response:
        """POST ``body``, returning once the answer's headers are in (its body unread)."""
        connect, read = clock.request_timeout
        return self.pools.urlopen("POST", url, body=body, headers={**DEFAULT_HEADERS, **headers},
                                  redirect=False, preload_content=False, decode_content=True,
                                  timeout=urllib3.Timeout(connect=connect, read=read))


class NotConnected(Exception):
    """No answer can come: the connection was refused, reset, or not made within the connect timeout
    (``timed_out``), or the request could not be sent."""

    def __init__(self, *, timed_out: bool = False) -> None:
        super().__init__("timed out connecting" if timed_out else "not connected")
        self.timed_out = timed_out


class NoAnswer(Exception):
    """Connected, but no answer's headers within the first-byte timeout or the call's deadline."""


class UpstreamCall:
    """An answer whose headers are in (status 2xx), with the rest to be read under its deadlines."""

    def __init__(self, provider: str, response: Response, clock: CallClock) -> None:
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
            content = self.response.read()
        except (HTTPError, OSError):
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
            for line in split_lines(self.response.stream(READ_SIZE, decode_content=True)):
                self.clock.progress()
                yield line
        except (HTTPError, OSError) as exc:
            raise self._expired() or broken_stream(self.provider, exc) from None
        expired = self._expired()
        if expired:  # the cut socket read as a clean end of the body
            raise expired

    def finish(self) -> None:
        """The protocol's last event is in: read the rest of the body — normally only the end of its
        chunked encoding, already on its way — so the connection goes back to the pool; :meth:`close`
        drops it if that takes longer than ``FINISH_S`` or runs past ``FINISH_BYTES``. A stream that
        just stopped being read would be closed, and the next one would connect again (for a TLS
        upstream: a handshake per streamed call)."""
        sock = getattr(self.response.connection, "sock", None)
        if sock is None:
            return
        sock.settimeout(FINISH_S)  # the connection's next request sets its own timeouts again
        left = 0
        try:
            for piece in self.response.stream(READ_SIZE, decode_content=True):
                left += len(piece)
                if left > FINISH_BYTES:
                    return
        except (HTTPError, OSError):
            return

    def close(self) -> None:
        """Stop the clock; a body not read to its end closes its connection (a whole one went back to
        the pool as its last byte was read)."""
        self.clock.stop()
        if self.response.connection is not None:
            self.response.close()
            self.response.release_conn()

    def _expired(self) -> UpstreamTimeout | None:
        return self.clock.timeout_error() if self.clock.expired else None


def split_lines(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of a body read in ``pieces`` (any line break; a last line without one too)."""
    pending = b""
    for piece in pieces:
        lines = (pending + piece).splitlines()
        pending = lines.pop() if lines and not piece.endswith((b"\n", b"\r")) else b""
        yield from lines
    if pending:
        yield pending


def encode(body: dict[str, Any]) -> bytes:
    """The JSON body; NaN and infinities are not JSON, and no upstream would take them."""
    try:
        return json.dumps(body, allow_nan=False).encode()
    except ValueError:
        raise UpstreamRejected("the request holds a number that is not valid JSON (NaN or Infinity)",
                               status=400) from None


def send(client: HttpClient, url: str, body: dict[str, Any], headers: Mapping[str, str],
         clock: CallClock) -> Response:
    """The POST itself, up to the answer's headers, under ``clock`` (started here; stopped if the POST
    fails). Transport failures are :class:`NotConnected` or :class:`NoAnswer` (callers that fail over
    between hosts tell a refused connection from a silent one) — a connection the clock cut is the
    latter."""
    payload = encode(body)
    token = CURRENT_CLOCK.set(clock)
    clock.start()
    try:
        return client.post(url, payload, headers, clock)
    except (HTTPError, OSError, ValueError) as exc:  # ValueError: a header http.client refuses to send
        clock.stop()
        raise transport_error(exc, clock) from None
    finally:
        CURRENT_CLOCK.reset(token)


def transport_error(exc: Exception, clock: CallClock) -> NotConnected | NoAnswer:
    """What a failed POST means (never its text: a refused header's would quote the API key)."""
    if clock.expired or (isinstance(exc, ReadTimeoutError)):
        return NoAnswer()
    if isinstance(exc, ConnectTimeoutError) and not isinstance(exc, NewConnectionError):
        return NotConnected(timed_out=True)
    return NotConnected()


def post(client: HttpClient, provider: Provider, url: str, body: dict[str, Any],
         headers: Mapping[str, str], *, stream: bool, error_for: ErrorFor) -> UpstreamCall:
    """POST ``body``; transport failures and error statuses become our ``Upstream*`` errors."""
    clock = CallClock(provider.name, provider.deadlines, stream=stream)
    try:
        response = send(client, url, body, headers, clock)
    except NoAnswer:
        raise (clock.timeout_error() if clock.expired else UpstreamTimeout(
            f"{provider.name} did not answer within {clock.deadlines.first_byte:g}s")) from None
    except NotConnected as exc:
        if exc.timed_out:
            raise UpstreamTimeout(f"cannot connect to {provider.name} within "
                                  f"{clock.deadlines.connect:g}s") from None
        raise UpstreamUnavailable(f"cannot reach {provider.name}") from None
    return answered(provider.name, response, clock, error_for)


def answered(provider: str, response: Response, clock: CallClock, error_for: ErrorFor) -> UpstreamCall:
    """The call whose headers are in; an error status raised as our error (its body read under the
    call's deadlines too). Redirects are not followed (a POST's body would not survive most of them):
    one is an operator's wrong ``base_url``, said as such."""
    call = UpstreamCall(provider, response, clock)
    if 300 <= response.status < 400:
        call.close()
        raise UpstreamBadResponse(f"{provider} answered with a redirect (HTTP {response.status}), which is "
                                  "not followed: check its base_url")
    if response.status >= 400:
        try:
            raise error_for(provider, response.status, response.headers, response_json(response))
        finally:
            call.close()
    return call


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


def broken_stream(provider: str, exc: Exception) -> UpstreamError:
    """A streamed body that failed mid-way: a read timeout is a stall, not a break."""
    if isinstance(exc, ReadTimeoutError):
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


def response_json(response: Response) -> Any:
    """The body as JSON, or None (error bodies are not always JSON, nor always whole)."""
    try:
        return json.loads(response.read())
    except (ValueError, HTTPError, OSError):
        return None
