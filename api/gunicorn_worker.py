"""The gunicorn worker the API runs in (``--worker-class api.gunicorn_worker.GatewayWorker``):
gunicorn's gevent worker with the two things it lacks in front of a public API.

* **A deadline for a new connection's request headers** (``GATEWAY_CLIENT_TIMEOUT``). gunicorn's
  gevent worker waits up to ``--keep-alive`` for every request's headers, the first one included, so
  idle or slowloris sockets hold the worker's ``--connections`` slots and new callers (``/health``
  included) wait in the listen backlog. Here a new connection must deliver its first request's
  headers within the client timeout (408, then closed). A kept-alive connection may idle up to
  ``--keep-alive`` between requests (then it is closed silently) — but once the next request's first
  byte arrives, its headers too must be in within the client timeout (:class:`_NextRequestDeadline`),
  so a client that drip-feeds the headers of its second request holds its slot no longer than one
  that drip-feeds its first.
* **One send per answer**: gunicorn sends an answer's status line and headers, then its body, in two
  ``send`` calls — two wake-ups of the client and two segments per call. Here they go together
  (:class:`_HeadWithBody`).
* **Errors in JSON**: a request gunicorn cannot parse (bad request line, header, chunk framing,
  limits) is answered in OpenAI's error shape, not gunicorn's HTML page.

* **A graceful stop** (SIGTERM, and Ctrl-C — :func:`on_starting` makes gunicorn's master treat
  SIGINT as SIGTERM, and the worker does too): the app is told (``app.extensions["begin_stop"]``:
  held callers get up to ``GATEWAY_DRAIN_TIMEOUT`` more seconds, then a 503 in their protocol), idle
  kept-alive connections are closed at once, and gunicorn waits for the rest up to its
  ``--graceful-timeout`` (the drain time + 2 s, ``launcher/cli.py``).

The body deadline is the app's (:func:`api.requests.read_body`); when it or a chunked body over the
size limit leaves unread bytes on the connection, the app sets :data:`CLOSE_CONNECTION` in the WSGI
environ and the connection is closed after the answer instead of draining what is left.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import gevent.local
from gunicorn.http import errors as http_errors
from gunicorn.http.wsgi import Response as HTTP1Response
from gunicorn.workers.ggevent import GeventWorker

# Nothing of the app may be imported here: gunicorn imports this module before the worker
# monkey-patches the standard library, and the app's imports (redis, ssl, …) must come after that.

DEFAULT_CLIENT_TIMEOUT = 10.0
#: set in the WSGI environ by the app when it left a body half-read: close the connection after answering
CLOSE_CONNECTION = "gateway.close_connection"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# what gunicorn's parser raises, as (status, reason, our error code); anything else it raises is ours: 500
_CLIENT_ERRORS: tuple[tuple[Any, int, str, str], ...] = (
    (http_errors.LimitRequestLine, 414, "URI Too Long", "request_line_too_long"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large", "headers_too_large"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented", "unsupported_transfer_coding"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed", "expectation_failed"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden", "forbidden"),
    # the app's fault, not the client's
    (http_errors.InvalidResponseHeader | http_errors.InvalidResponseHeaderName
     | http_errors.ConfigurationProblem, 500, "Internal Server Error", "internal_error"),
    (http_errors.ParseException, 400, "Bad Request", "malformed_request"),
    (gevent.Timeout, 408, "Request Timeout", "request_timeout"),
)


class GatewayWorker(GeventWorker):
    """gunicorn's ``gevent`` worker with a header deadline and JSON errors (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connection = gevent.local.local()  # per connection greenlet: requests read so far
        self.client_timeout = DEFAULT_CLIENT_TIMEOUT
        self._app: Any = None
        self._between_requests: set[_NextRequestDeadline] = set()  # kept-alive connections waiting

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app: WSGIApp = getattr(self, "wsgi")  # noqa: B009  (set by gunicorn, untyped)
        config = getattr(app, "config", {})
        self.client_timeout = float(config.get("GATEWAY_CLIENT_TIMEOUT", DEFAULT_CLIENT_TIMEOUT))
        self._app = app
        self.wsgi = _closing(app)

    def init_signals(self) -> None:
        super().init_signals()
        signal.signal(signal.SIGINT, self.handle_exit)  # Ctrl-C in a terminal stops gracefully too

    def handle_exit(self, sig: Any, frame: Any) -> None:
        """SIGTERM/SIGINT: stop accepting (gunicorn), tell the app, close idle kept-alive connections."""
        if self.alive:
            gevent.spawn(self._begin_stop)
        super().handle_exit(sig, frame)

    def _begin_stop(self) -> None:
        begin_stop = getattr(self._app, "extensions", {}).get("begin_stop")
        if begin_stop is not None:
            begin_stop()
        for waiting in list(self._between_requests):
            waiting.close_if_idle()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        self._connection.fileno = client.fileno()
        super().handle(listener, client, addr)

    def timeout_ctx(self) -> gevent.Timeout | _NextRequestDeadline:
        """The deadline for reading the next request's headers on this connection: the client
        timeout (raising, so the caller gets a 408) for the first; for a kept-alive connection's next,
        the keep-alive idle time until its first byte (silent close), then the client timeout."""
        served = getattr(self._connection, "requests", 0)
        self._connection.requests = served + 1
        if served == 0:
            return gevent.Timeout(self.client_timeout)
        if not self.alive:  # stopping: no next request on this connection
            return gevent.Timeout(0, False)
        return _NextRequestDeadline(self._connection.fileno, self.cfg.keepalive, self.client_timeout,
                                    self._between_requests)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        status, reason, code = _classify(exc)
        if status >= 500:
            self.log.error("error handling request: %s: %s", type(exc).__name__, exc)
        else:
            self.log.warning("invalid request from %s: %s", (addr or ("",))[0],
                             str(exc) or type(exc).__name__)
        message = _message(exc, reason)
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                     else "api_error", "param": None, "code": code}}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        try:
            client.sendall(head + body)
        except OSError as send_error:  # the client is gone: nothing left to tell it
            self.log.debug("could not send the error answer: %s", send_error)


class _IdleClose(Exception):
    """A kept-alive connection idled past keep-alive: close it without an answer."""


class _NextRequestDeadline:
    """The wait for a kept-alive connection's next request: up to ``idle`` s for its first byte
    (then :class:`_IdleClose`, swallowed here: the connection closes silently, as gunicorn's own
    keep-alive does), then up to ``headers`` s for the rest of its headers (then a ``gevent.Timeout``
    the worker answers with a 408). Two libev watchers on the socket, no greenlet: the socket being
    readable moves the timer from the idle bound to the headers bound. Bytes the parser buffered
    already (a pipelined request) need no wait: the ``with`` block ends before either fires."""

    def __init__(self, fileno: int, idle: float, headers: float, registry: set[_NextRequestDeadline]) -> None:
        self._fileno = fileno
        self._idle = idle
        self._headers = headers
        self._idle_close = _IdleClose()
        self._registry = registry   # the worker's: it closes the idle ones when it stops
        self._idling = True

    def close_if_idle(self) -> None:
        """Close the connection now if its next request has not begun (the worker is stopping)."""
        gevent.get_hub().loop.run_callback(self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self._idling and self in self._registry:
            self._readable.stop()
            self._timer.stop()
            self._target.throw(self._idle_close)

    def __enter__(self) -> _NextRequestDeadline:
        loop = gevent.get_hub().loop
        self._registry.add(self)
        self._target = gevent.getcurrent()
        self._timer = loop.timer(self._idle)
        self._timer.start(self._target.throw, self._idle_close)
        self._readable = loop.io(self._fileno, 1)  # 1: READ
        self._readable.start(self._first_byte)
        return self

    def _first_byte(self) -> None:
        self._idling = False
        self._readable.stop()
        self._timer.stop()
        self._timer.close()
        self._timer = gevent.get_hub().loop.timer(self._headers)
        self._timer.start(self._target.throw, gevent.Timeout(self._headers))

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self._registry.discard(self)
        self._readable.stop()
        self._timer.stop()
        self._readable.close()
        self._timer.close()
        return exc is self._idle_close


def on_starting(server: Any) -> None:
    """gunicorn's master hook (``-c python:api.gunicorn_worker``): Ctrl-C (SIGINT) stops it as
    gracefully as SIGTERM does, not with gunicorn's quick stop that drops every held caller."""
    server.handle_int = server.handle_term


def _classify(exc: BaseException) -> tuple[int, str, str]:
    for cls, status, reason, code in _CLIENT_ERRORS:
        if isinstance(exc, cls):
            return status, reason, code
    return 500, "Internal Server Error", "internal_error"


def _message(exc: BaseException, reason: str) -> str:
    if isinstance(exc, gevent.Timeout):
        return "the request headers did not arrive in time"
    if isinstance(exc, http_errors.ParseException):
        return f"{reason}: {str(exc)[:200]}".encode("ascii", "backslashreplace").decode("ascii")
    return reason


class _HeadWithBody:
    """The connection's socket as gunicorn's HTTP/1 response writes to it: its first ``sendall`` —
    always the status line and headers (``Response.send_headers``, called by the first ``write``) — is
    held and sent with the body's first bytes, in one ``send``. :meth:`release` (run after the response
    is closed) sends the headers of an answer that had no body; any other use of the socket
    (``sendfile`` asks for its ``fileno``) releases them first, so nothing overtakes them."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._head: bytes | None = None
        self._started = False

    def sendall(self, data: bytes) -> None:
        if not self._started:
            self._started, self._head = True, data
            return
        head, self._head = self._head, None
        self._sock.sendall(head + data if head else data)

    def release(self) -> None:
        head, self._head = self._head, None
        if head:
            self._sock.sendall(head)

    def __getattr__(self, name: str) -> Any:
        self.release()
        return getattr(self._sock, name)


def _send_head_with_body(response: Any) -> None:
    """``response`` (gunicorn's, for one request) sends its headers with its body (:class:`_HeadWithBody`)."""
    if type(response) is not HTTP1Response:  # HTTP/2 frames its own
        return
    sock = response.sock = _HeadWithBody(response.sock)
    close = response.close

    def close_and_release() -> None:
        try:
            close()
        finally:
            sock.release()

    response.close = close_and_release


def _closing(app: WSGIApp) -> WSGIApp:
    """``app``, its answers' headers sent with their bodies (:func:`_send_head_with_body`), closing the
    connection after any answer whose request set :data:`CLOSE_CONNECTION`."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # start_response is a method of gunicorn's Response, which can close the connection
        response = getattr(start_response, "__self__")  # noqa: B009
        _send_head_with_body(response)
        result = app(environ, start_response)
        if environ.get(CLOSE_CONNECTION):
            response.force_close()
        return result

    return wsgi
