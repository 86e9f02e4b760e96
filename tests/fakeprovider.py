"""A fake OpenAI upstream that speaks OpenAI's real wire format — for integration tests and benchmarks.

Run it::

    python -m tests.fakeprovider --port 0 [--host 127.0.0.1] [--latency-ms 0] [--api-key SECRET]
                                 [--rpm N] [--tpm N] [--concurrency N] [--model-limits JSON]

It prints exactly one line ``READY <port>`` on stdout once it listens (``--port 0`` picks a free port).
It is a plain WSGI app served by ``gevent.pywsgi`` (monkey-patched), so thousands of slow calls can be
held open at once and a fast call costs well under a millisecond of CPU.

From Python (tests)::

    from tests.fakeprovider import FakeProvider
    with FakeProvider(latency_ms=0) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="x")
        fake.configure(fail_next={"count": 2, "status": 429, "retry_after": 1})
        fake.stats()["calls"]; fake.reset(); fake.requests()
    with FakeProvider(limits={"rpm": 60, "tpm": 10_000}) as fake:   # a provider that enforces its limits
        ...; fake.stats()["rate_limited"]; fake.timeline()

Endpoints (all answers carry ``x-request-id``, ``openai-version``, ``openai-processing-ms`` and the
``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers, as OpenAI sends them — generous
constants unless limits are enforced, see "Enforced limits")
----------------------------------------------------------------------------------------------------
``POST /v1/chat/completions``
    Needs ``Authorization: Bearer <key>`` (401, OpenAI error shape, otherwise; with ``--api-key`` the
    key must also match: 401 ``invalid_api_key``). Non-streaming: a ``chat.completion`` object whose
    ``choices[0].message.content`` is ``"echo: " + <text of the last user message>`` (text parts of a
    content list are joined with a space). If the last message is a ``tool`` result instead, the
    content is ``"echo: " + <that tool result>``.
    ``"stream": true``: ``text/event-stream`` of ``data: {chat.completion.chunk}\\n\\n`` events — first a
    chunk with ``delta.role`` (and ``content: ""``), then one chunk per word of the content (words keep
    their leading space, so joining the deltas gives the exact content), then a chunk with an empty
    delta and ``finish_reason``; with ``stream_options.include_usage`` every chunk has ``"usage": null``
    and one more chunk with ``"choices": []`` and the usage follows; then ``data: [DONE]\\n\\n``.
    Tool calls: when the request has ``tools`` (and ``tool_choice`` is not ``"none"``) and the LAST
    message is a user message containing the word "weather", the answer is one tool call
    (``id`` "call_…", ``type`` "function", ``function.name`` = the first tool whose name contains
    "weather", else the first tool; ``function.arguments`` a JSON string filling the tool's required
    parameters — ``location``/``city`` get the word after "in" in the message, default "Paris"),
    ``content`` null and ``finish_reason`` "tool_calls". Streamed as ``delta.tool_calls`` with
    ``index`` 0: the first carries id/type/name and ``arguments: ""``, the next ones pieces of the
    arguments string.
    ``max_tokens`` / ``max_completion_tokens`` smaller than the answer's word count truncate the
    answer to that many words with ``finish_reason`` "length".
``POST /v1/embeddings``
    ``input`` a string or a list of strings (token arrays are accepted and hashed as text); each gets
    a deterministic unit vector of ``dimensions`` floats (default 8) derived from SHA-256 of the text.
    ``encoding_format: "base64"`` (the openai SDK's default) returns little-endian float32 in base64.
``GET /v1/models``, ``GET /v1/models/<id>``
    OpenAI list / model objects; the list holds ``fake-model`` and ``fake-embedding`` plus every model
    name requested so far.

Token counting (deterministic, documented so tests can predict it)
------------------------------------------------------------------
A text's token count is ``max(1, len(text.split()))`` — whitespace-separated words.
``prompt_tokens`` = sum over all messages of the words of their text content (tool-call arguments of
assistant messages included), at least 1. ``completion_tokens`` = words of the answer content, or for a
tool call the words of ``name + " " + arguments``, at least 1. ``total_tokens`` is their sum. For
embeddings ``prompt_tokens`` = ``total_tokens`` = sum of the inputs' word counts.

Behaviour on command
--------------------
Magic contents (the last user message's text, checked with ``startswith``; whitespace-separated
prefixes can be combined, e.g. ``"sleep:0.5 status:503 hi"``):

``sleep:<seconds>``   sleep that long before answering (the answer is still the echo of the full text).
``status:<code>``     answer with that HTTP error in OpenAI's error shape (429 gets Retry-After: 1 and
                      rate-limit headers; 5xx a ``server_error``; other 4xx ``invalid_request_error``).
``drop:``             send the response headers and part of the body, then cut the connection (for a
                      stream: after the first content chunk) — a broken upstream.
``drip:<seconds>``    send the headers at once, then the body one byte every <seconds> (a stream: its
                      whole SSE text so) — an upstream that never trips a per-read timeout.
``bad200:<what>``     answer 200 with a body that is no answer: ``error`` (OpenAI's error object,
                      ``{"error": {"message", "type": "server_error", …}}``), ``empty`` (``choices: []``)
                      or ``missing`` (no ``choices`` at all); streamed: one ``data: {"error": …}``
                      event (``error``) or ``data: [DONE]`` with no chunk before it.
``tokens:<p>,<c>``    report ``prompt_tokens`` <p> and ``completion_tokens`` <c> (any integers, negative
                      or huge: an upstream whose accounting is broken) instead of the counted ones.

Enforced limits (real 429s)
---------------------------
Off unless configured (``--rpm/--tpm/--concurrency``, ``FakeProvider(limits=..., model_limits=...)`` or
``POST /_control/config``). ``limits`` = ``{"rpm": N, "tpm": N, "concurrency": N}`` (a missing or null
kind is unlimited) counts every chat/embeddings call; ``model_limits`` = ``{"<model>": {...}}`` adds a
separate set per model name (as OpenAI limits per model); a call must fit every set that applies.

* rpm: calls *started* (accepted) in any sliding 60 s window; tpm: tokens in any sliding 60 s window,
  a call's tokens (prompt + completion, by the token rule below, computed when it arrives) counted at
  its start, as real providers reserve; concurrency: calls being answered (a stream until its end).
  The clock is the fake's own (monotonic): a call counts from the moment the fake receives it.
  Use is counted only while a set has limits; changing a limit keeps the use counted so far.
* The check comes after authentication, body validation, ``hang_next`` and ``fail_next``, and before
  the magic contents and the latency. A refused call is not counted (it uses no quota) and gets a 429
  ``{"error": {"message": "Rate limit reached for <model> in organization org-fake on requests per min
  (RPM): Limit L, Used U, Requested 1. Please try again in 1.234s.", "type": "requests", "code":
  "rate_limit_exceeded"}}`` (``type`` "tokens" for TPM; "Request too large …" when one call exceeds the
  whole TPM; "Too many concurrent requests …" for concurrency) with ``Retry-After`` (whole seconds,
  rounded up), ``retry-after-ms`` (exact: when this call would fit; for concurrency
  ``concurrency_retry_after``, default 1 s, as nobody knows when a call ends) and the headers below.
* Every answer to a model call reports the tightest applicable set as of the moment it is sent:
  ``x-ratelimit-limit-requests`` = rpm, ``-remaining-requests`` = rpm − calls in the window (this one
  included), ``-reset-requests`` = time until that use goes down, i.e. until the oldest counted call
  leaves the window (with 0 remaining: until one more call fits) — ``reset_mode: "full"`` reports instead
  the time until the window is empty (OpenAI's documented "until the limit resets to its initial
  state"); the same for tokens with tpm. "0s" when nothing is counted. Without an rpm (tpm) limit the
  request (token) headers keep the constants 10000/9999/"6ms" (30000000/29999999/"0s").
* ``stats()["rate_limited"]`` counts the 429s by the limit that refused them (the first of rpm, tpm,
  concurrency that failed); ``stats()["limits"]`` shows each set's current use; ``GET
  /_control/timeline?since=<unix time>`` lists ``[start, tokens, "ok" | "rpm" | "tpm" | "concurrency"]``
  of the last 500,000 calls that reached the check (wall clock), for benchmarks.

Control API (JSON in, JSON out; not authenticated — the fake listens on loopback):

``POST /_control/config``  partial update of any of
    ``latency_ms``      delay before every /v1 answer (``null`` restores ``--latency-ms``).
    ``chunk_delay_ms``  delay between streamed chunks (default 0).
    ``fail_next``       ``{"count": N, "status": S, "retry_after": seconds, "message": optional}``: the
                        next N POSTs to /v1/* fail with S (default 429, retry_after 1).
                        429 → ``{"error": {"message": "Rate limit reached for requests", "type":
                        "requests", "param": null, "code": "rate_limit_exceeded"}}`` plus
                        ``Retry-After``, ``retry-after-ms`` and ``x-ratelimit-remaining-requests: 0``
                        (``type`` "requests" is what OpenAI sends for an RPM limit); 500/502/503 →
                        ``type`` "server_error"; ``{"count": 0}`` clears it.
    ``hang_next``       ``{"count": N, "seconds": X}``: the next N POSTs to /v1/* wait X seconds first.
    ``api_key``         required bearer key (``null``: any key).
    ``limits``          ``{"rpm", "tpm", "concurrency"}`` enforced on every call (``null``: none).
    ``model_limits``    ``{"<model>": limits or null}`` per model (merged; ``null`` instead of the object
                        removes them all).
    ``reset_mode``      ``"next"`` (default) or ``"full"``: what ``x-ratelimit-reset-*`` means (above).
    ``concurrency_retry_after``  seconds in the Retry-After of a concurrency 429 (default 1).
    Answers with the whole config; a bad value is a 400 and changes nothing.
``GET /_control/config``   the config.
``GET /_control/stats``    ``{"calls": chat calls received, "embeddings_calls", "models_calls",
                           "in_flight": chat+embeddings requests being answered now, "concurrent_max":
                           the most in flight at once, "by_status": {"200": n, ...}, "by_content":
                           {last user message text: n} (first 10,000 distinct texts), "by_model",
                           "rate_limited": {"rpm": n, "tpm": n, "concurrency": n}, "admitted_tokens":
                           tokens of the calls the limits let through, "limits": {"*" or model:
                           {"limits", "requests", "tokens", "in_flight"}} (use in the last 60 s)}``.
``GET /_control/requests`` the last 100 /v1 POSTs as ``[{"path", "headers": {lower-case name: value},
                           "body": parsed JSON}]`` (``Authorization`` included), oldest first.
``GET /_control/timeline`` ``{"now", "events"}``, see "Enforced limits".
``POST /_control/reset``   zero the stats, request log and timeline, clear fail_next/hang_next, restore
                           the latency to ``--latency-ms``, the chunk delay to 0 and the limits to the
                           command line's (forgetting the use counted so far).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import math
import re
import socket
import struct
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from tests.serverproc import ServerProcess, announce_and_serve

BASE_MODELS = ("fake-model", "fake-embedding")
SYSTEM_FINGERPRINT = "fp_fake0001"
_MAX_BY_CONTENT = 10_000
_REQUEST_LOG = 100
_RATE_LIMIT_REQUESTS = 10_000
_RATE_LIMIT_TOKENS = 30_000_000

_JSON_HEADERS = [("Content-Type", "application/json")]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def count_tokens(text: str) -> int:
    """The fake's tokenizer: whitespace-separated words, at least 1."""
    return max(1, len(text.split()))


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return ""


def _go_duration(seconds: float) -> str:
    """Format a duration like OpenAI's x-ratelimit-reset-* headers: "120ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    secs_text = f"{secs:g}s" if secs != int(secs) else f"{int(secs)}s"
    if minutes >= 1:
        return f"{int(minutes)}m{secs_text}"
    return secs_text


_ERROR_DEFAULTS = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Request not allowed."),
    404: ("invalid_request_error", "model_not_found",
          "The model does not exist or you do not have access to it."),
    408: ("server_error", None, "Request timed out."),
    409: ("invalid_request_error", None, "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable request."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests"),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    504: ("server_error", None, "Gateway timeout."),
}

_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large",
    422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


def _status_line(status: int) -> str:
    return f"{status} {_REASONS.get(status, 'Error')}"


_UNSET: Any = object()


def error_body(status: int, message: str | None = None, code: Any = _UNSET,
               type_: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}} (``code`` may be null)."""
    d_type, d_code, d_message = _ERROR_DEFAULTS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, f"HTTP {status}"))
    return {"error": {"message": message or d_message, "type": type_ or d_type, "param": None,
                      "code": d_code if code is _UNSET else code}}


WINDOW_S = 60.0
LIMIT_KINDS = ("rpm", "tpm", "concurrency")
_TIMELINE = 500_000


def _ceil_ms(seconds: float) -> float:
    """Round up to whole milliseconds (a reset of 0.4 ms is reported as 1 ms, never as 0)."""
    return math.ceil(max(0.0, seconds) * 1000 - 1e-6) / 1000


def parse_limits(raw: Any) -> dict[str, int | None]:
    """``{"rpm": N, "tpm": N, "concurrency": N}`` → the same with every kind present (None = unlimited)."""
    if raw is None:
        return dict.fromkeys(LIMIT_KINDS)
    if not isinstance(raw, dict):
        raise TypeError('limits must be an object like {"rpm": 60, "tpm": 10000, "concurrency": 4} or null')
    unknown = set(raw) - set(LIMIT_KINDS)
    if unknown:
        raise TypeError(f"unknown limit(s) {sorted(unknown)}; known: {', '.join(LIMIT_KINDS)}")
    out: dict[str, int | None] = {}
    for kind in LIMIT_KINDS:
        value = raw.get(kind)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise TypeError(f"limit {kind!r} must be a positive integer or null, got {value!r}")
        out[kind] = value
    return out


class LimitScope:
    """One set of enforced limits and its use: the starts and token counts of the last 60 s (sliding
    window, monotonic clock) and the calls in flight. The fake's clock is the truth, as a real
    provider's is: a call counts from the moment the fake receives it."""

    def __init__(self, name: str, limits: dict[str, int | None]) -> None:
        self.name = name
        self.limits = limits
        self.starts: deque[float] = deque()                 # start time of each call in the window
        self.tokens: deque[tuple[float, int]] = deque()     # (start time, tokens) of each call in the window
        self.token_sum = 0
        self.in_flight = 0

    @property
    def any(self) -> bool:
        return any(v is not None for v in self.limits.values())

    def prune(self, now: float) -> None:
        edge = now - WINDOW_S                               # a call started at ``edge`` or before has left
        while self.starts and self.starts[0] <= edge:
            self.starts.popleft()
        while self.tokens and self.tokens[0][0] <= edge:
            self.token_sum -= self.tokens.popleft()[1]

    def refusals(self, now: float, tokens: int, concurrency_retry_after: float) -> list[tuple[str, float]]:
        """Why a call of ``tokens`` may not start now, with the seconds until it could: [(kind, wait)]."""
        out = []
        rpm, tpm, conc = self.limits["rpm"], self.limits["tpm"], self.limits["concurrency"]
        if rpm is not None and len(self.starts) >= rpm:
            out.append(("rpm", self.starts[len(self.starts) - rpm] + WINDOW_S - now))
        if tpm is not None and self.token_sum + tokens > tpm:
            if tokens > tpm:
                out.append(("tpm", WINDOW_S))               # never fits; OpenAI says "Request too large"
            else:
                freed = 0
                for t, n in self.tokens:
                    freed += n
                    if self.token_sum - freed + tokens <= tpm:
                        out.append(("tpm", t + WINDOW_S - now))
                        break
        if conc is not None and self.in_flight >= conc:
            out.append(("concurrency", concurrency_retry_after))
        return out

    def admit(self, now: float, tokens: int) -> None:
        self.starts.append(now)
        self.tokens.append((now, tokens))
        self.token_sum += tokens
        self.in_flight += 1

    def reset_in(self, kind: str, now: float, mode: str) -> float:
        """Seconds until this window's use of ``kind`` ('requests' / 'tokens') goes down — "next": until
        the oldest counted call leaves the window (for a spent request quota: until one more call fits) —
        or ("full") is back to nothing; 0 when nothing is counted."""
        if kind == "requests":
            if not self.starts:
                return 0.0
            rpm = self.limits["rpm"]
            over = len(self.starts) - rpm if rpm is not None and len(self.starts) >= rpm else 0
            t = self.starts[over] if mode == "next" else self.starts[-1]
        else:
            if not self.tokens:
                return 0.0
            t = self.tokens[0][0] if mode == "next" else self.tokens[-1][0]
        return max(0.0, t + WINDOW_S - now)

    def usage(self, now: float) -> dict[str, Any]:
        self.prune(now)
        return {"limits": dict(self.limits), "requests": len(self.starts), "tokens": self.token_sum,
                "in_flight": self.in_flight}


class _Drop(Exception):
    """Raised inside a response iterator to cut the connection (pywsgi closes the socket)."""


class FakeUpstream:
    """The WSGI application. One instance per process; greenlets share its state."""

    def __init__(self, latency_ms: float = 0.0, api_key: str | None = None,
                 limits: dict[str, Any] | None = None, model_limits: dict[str, Any] | None = None) -> None:
        self.default_latency_ms = float(latency_ms)
        self.default_api_key = api_key
        self.default_limits = parse_limits(limits)
        self.default_model_limits = {m: parse_limits(v) for m, v in (model_limits or {}).items()}
        self._local = threading.local()   # per greenlet (the server is monkey-patched): its call's generation
        self.reset()

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        # a call still running from before the reset (e.g. a killed worker's sleeping call) answers later;
        # its answer must not count in the next test's stats: counts are kept per generation
        self.generation = getattr(self, "generation", 0) + 1
        self.latency_ms = self.default_latency_ms
        self.chunk_delay_ms = 0.0
        self.api_key = self.default_api_key
        self.fail_next: dict[str, Any] = {"count": 0}
        self.hang_next: dict[str, Any] = {"count": 0}
        self.calls = 0
        self.embeddings_calls = 0
        self.models_calls = 0
        self.in_flight = 0
        self.concurrent_max = 0
        self.by_status: dict[str, int] = {}
        self.by_content: dict[str, int] = {}
        self.by_model: dict[str, int] = {}
        self.seen_models: dict[str, None] = {}
        self.request_log: deque[dict[str, Any]] = deque(maxlen=_REQUEST_LOG)
        # enforced limits: "*" counts every model call, any other key the calls to that model
        self.scopes: dict[str, LimitScope] = {}
        self._set_limits("*", self.default_limits)
        for model, lim in self.default_model_limits.items():
            self._set_limits(model, lim)
        self.reset_mode = "next"
        self.concurrency_retry_after = 1.0
        self.rate_limited = dict.fromkeys(LIMIT_KINDS, 0)
        self.admitted_tokens = 0
        # (wall-clock start, tokens, "ok" | the limit that refused it) of every chat/embeddings call
        self.timeline: deque[tuple[float, int, str]] = deque(maxlen=_TIMELINE)

    def _set_limits(self, name: str, limits: dict[str, int | None]) -> None:
        """Enforce ``limits`` on scope ``name``; a scope that already exists keeps the use it has counted
        (so changing a limit mid-run stays truthful); all-None removes it. Use is only counted while a
        scope has limits."""
        if not any(v is not None for v in limits.values()):
            self.scopes.pop(name, None)
        elif name in self.scopes:
            self.scopes[name].limits = dict(limits)
        else:
            self.scopes[name] = LimitScope(name, dict(limits))

    def config(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_ms, "chunk_delay_ms": self.chunk_delay_ms,
                "fail_next": dict(self.fail_next), "hang_next": dict(self.hang_next),
                "api_key": self.api_key,
                "limits": dict(self.scopes["*"].limits) if "*" in self.scopes else parse_limits(None),
                "model_limits": {n: dict(sc.limits) for n, sc in self.scopes.items() if n != "*"},
                "reset_mode": self.reset_mode, "concurrency_retry_after": self.concurrency_retry_after}

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "embeddings_calls": self.embeddings_calls,
                "models_calls": self.models_calls, "in_flight": self.in_flight,
                "concurrent_max": self.concurrent_max, "by_status": dict(self.by_status),
                "by_content": dict(self.by_content), "by_model": dict(self.by_model),
                "rate_limited": dict(self.rate_limited), "admitted_tokens": self.admitted_tokens,
                "limits": {n: sc.usage(time.monotonic()) for n, sc in self.scopes.items()}}

    def apply_config(self, cfg: dict[str, Any]) -> None:
        # limits: validate everything first, so a bad config changes nothing
        limits = parse_limits(cfg["limits"]) if "limits" in cfg else None
        model_limits: dict[str, dict[str, int | None]] | None = None
        if "model_limits" in cfg:
            raw = cfg["model_limits"]
            if raw is not None and not isinstance(raw, dict):
                raise TypeError("model_limits must be an object {model: limits or null} or null")
            model_limits = {str(m): parse_limits(v) for m, v in (raw or {}).items()}
        mode = cfg.get("reset_mode", self.reset_mode)
        if mode not in ("next", "full"):
            raise TypeError("reset_mode must be 'next' or 'full'")
        conc_retry = float(cfg.get("concurrency_retry_after", self.concurrency_retry_after))
        if "latency_ms" in cfg:
            latency = cfg["latency_ms"]
            self.latency_ms = self.default_latency_ms if latency is None else float(latency)
        if "chunk_delay_ms" in cfg:
            self.chunk_delay_ms = float(cfg["chunk_delay_ms"] or 0)
        if "fail_next" in cfg:
            f = dict(cfg["fail_next"] or {})
            self.fail_next = {"count": int(f.get("count", 1)), "status": int(f.get("status", 429)),
                              "retry_after": f.get("retry_after", 1), "message": f.get("message")}
        if "hang_next" in cfg:
            h = dict(cfg["hang_next"] or {})
            self.hang_next = {"count": int(h.get("count", 1)), "seconds": float(h.get("seconds", 30))}
        if "api_key" in cfg:
            self.api_key = cfg["api_key"]
        if limits is not None:
            self._set_limits("*", limits)
        if model_limits is not None:
            if cfg["model_limits"] is None:
                for name in [n for n in self.scopes if n != "*"]:
                    del self.scopes[name]
            for model, lim in model_limits.items():
                self._set_limits(model, lim)
        self.reset_mode = mode
        self.concurrency_retry_after = conc_retry

    # ---------------------------------------------------------------- plumbing
    @staticmethod
    def _sleep(seconds: float) -> None:
        if seconds > 0:
            import gevent
            gevent.sleep(seconds)

    def _headers(self, extra: Iterable[tuple[str, str]] = (), *, content_type: str = "application/json",
                 remaining: int | None = None, started: float | None = None, model: str | None = None
                 ) -> list[tuple[str, str]]:
        headers = [
            ("Content-Type", content_type),
            ("x-request-id", "req_" + uuid.uuid4().hex),
            ("openai-version", "2020-10-01"),
            ("openai-organization", "fake-org"),
            ("openai-processing-ms", str(int((time.monotonic() - started) * 1000) if started else 0)),
            *self._ratelimit_headers(model),
        ]
        if remaining is not None:
            headers = [(k, str(remaining)) if k == "x-ratelimit-remaining-requests" else (k, v)
                       for k, v in headers]
        headers.extend(extra)
        return headers

    def _ratelimit_headers(self, model: str | None) -> list[tuple[str, str]]:
        """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` as of now. With enforced limits they
        are the truth about the tightest scope that applies to ``model``: limit, limit − use in the last
        60 s (this call included), and the time until that use goes down (``reset_mode`` "next") or is
        back to nothing ("full"). Without enforced limits: generous constants."""
        now = time.monotonic()
        scopes = self._scopes_for(model) if model is not None else []
        for sc in scopes:
            sc.prune(now)
        out: list[tuple[str, str]] = []
        values: dict[str, tuple[int, int, str]] = {
            "requests": (_RATE_LIMIT_REQUESTS, _RATE_LIMIT_REQUESTS - 1, "6ms"),
            "tokens": (_RATE_LIMIT_TOKENS, _RATE_LIMIT_TOKENS - 1, "0s"),
        }
        for kind, limit_key in (("requests", "rpm"), ("tokens", "tpm")):
            candidates = []
            for sc in scopes:
                limit = sc.limits[limit_key]
                if limit is None:
                    continue
                used = len(sc.starts) if kind == "requests" else sc.token_sum
                reset = sc.reset_in(kind, now, self.reset_mode)
                candidates.append((max(0, limit - used), -reset, limit, reset))
            if candidates:
                left, _, limit, reset = min(candidates)
                values[kind] = (limit, left, _go_duration(_ceil_ms(reset)) if reset > 0 else "0s")
        for part in ("limit", "remaining"):
            for kind in ("requests", "tokens"):
                out.append((f"x-ratelimit-{part}-{kind}", str(values[kind][0 if part == "limit" else 1])))
        out += [("x-ratelimit-reset-requests", values["requests"][2]),
                ("x-ratelimit-reset-tokens", values["tokens"][2])]
        return out

    # ---------------------------------------------------------------- enforced limits
    def _scopes_for(self, model: str) -> list[LimitScope]:
        return [sc for sc in (self.scopes.get("*"), self.scopes.get(model)) if sc is not None]

    def _enforce(self, model: str,
                 tokens: int) -> tuple[list[LimitScope], tuple[LimitScope, str, float] | None]:
        """Admit a call of ``tokens`` to every scope that applies to ``model`` (all or none), or refuse
        it: (None, (scope, limit kind, seconds until it could start)). Runs without yielding, so it is
        atomic among the greenlets."""
        now = time.monotonic()
        scopes = self._scopes_for(model)
        refusals: list[tuple[LimitScope, str, float]] = []
        for sc in scopes:
            sc.prune(now)
            refusals += [(sc, kind, wait)
                         for kind, wait in sc.refusals(now, tokens, self.concurrency_retry_after)]
        if refusals:
            sc, kind, _ = min(refusals, key=lambda r: LIMIT_KINDS.index(r[1]))
            self.rate_limited[kind] += 1
            self.timeline.append((time.time(), tokens, kind))
            return [], (sc, kind, max(w for _, _, w in refusals))
        for sc in scopes:
            sc.admit(now, tokens)
        self.admitted_tokens += tokens
        self.timeline.append((time.time(), tokens, "ok"))
        return scopes, None

    @staticmethod
    def _release(held: list[LimitScope]) -> None:
        for sc in held:
            sc.in_flight -= 1

    def _rate_limited(self, start_response: Any, model: str, tokens: int,
                      refusal: tuple[LimitScope, str, float], started: float) -> list[bytes]:
        """A real 429 for an enforced limit, in OpenAI's words and headers."""
        sc, kind, wait = refusal
        wait = max(0.001, _ceil_ms(wait))
        lim = sc.limits
        again = f"Please try again in {_go_duration(wait)}."
        if kind == "rpm":
            type_ = "requests"
            message = (f"Rate limit reached for {model} in organization org-fake on requests per min (RPM): "
                       f"Limit {lim['rpm']}, Used {len(sc.starts)}, Requested 1. {again}")
        elif kind == "tpm":
            type_ = "tokens"
            if lim["tpm"] is not None and tokens > lim["tpm"]:
                message = (f"Request too large for {model} in organization org-fake on tokens per min "
                           f"(TPM): Limit {lim['tpm']}, Requested {tokens}. The input or output tokens "
                           "must be reduced in order to run successfully.")
            else:
                message = (f"Rate limit reached for {model} in organization org-fake on tokens per min "
                           f"(TPM): Limit {lim['tpm']}, Used {sc.token_sum}, Requested {tokens}. {again}")
        else:
            type_ = "requests"
            message = (f"Too many concurrent requests for {model} in organization org-fake: Limit "
                       f"{lim['concurrency']}, In flight {sc.in_flight}. {again}")
        self._count_status(429)
        headers = self._headers([("Retry-After", str(max(1, math.ceil(wait)))),
                                 ("retry-after-ms", str(max(1, round(wait * 1000))))],
                                started=started, model=model)
        body = error_body(429, message, "rate_limit_exceeded", type_)
        return self._json(start_response, 429, body, headers)

    def _current(self) -> bool:
        """Whether the call this thread answers began after the last :meth:`reset`."""
        return getattr(self._local, "generation", self.generation) == self.generation

    def _call_ended(self) -> None:
        if self._current():
            self.in_flight -= 1

    def _count_status(self, status: int) -> None:
        if not self._current():
            return
        key = str(status)
        self.by_status[key] = self.by_status.get(key, 0) + 1

    def _json(self, start_response: Any, status: int, obj: Any, headers: list[tuple[str, str]] | None = None
              ) -> list[bytes]:
        body = _dumps(obj)
        hdrs = headers if headers is not None else self._headers()
        hdrs.append(("Content-Length", str(len(body))))
        start_response(_status_line(status), hdrs)
        return [body]

    def _error(self, start_response: Any, status: int, message: str | None = None, *,
               code: Any = _UNSET, type_: str | None = None, retry_after: float | None = None,
               started: float | None = None, model: str | None = None) -> list[bytes]:
        self._count_status(status)
        extra: list[tuple[str, str]] = []
        remaining = None
        if status == 429:
            ra = 1.0 if retry_after is None else float(retry_after)
            extra += [("Retry-After", f"{ra:g}"), ("retry-after-ms", str(int(ra * 1000)))]
            remaining = 0
            if message is None:
                message = (f"Rate limit reached for requests on requests per min (RPM): Limit "
                           f"{_RATE_LIMIT_REQUESTS}, Used {_RATE_LIMIT_REQUESTS}, Requested 1. "
                           f"Please try again in {_go_duration(ra)}.")
        elif retry_after is not None:
            extra.append(("Retry-After", f"{float(retry_after):g}"))
        headers = self._headers(extra, remaining=remaining, started=started, model=model)
        if status == 429 and remaining == 0:
            ra = 1.0 if retry_after is None else float(retry_after)
            headers = [(k, _go_duration(ra)) if k == "x-ratelimit-reset-requests" else (k, v)
                       for k, v in headers]
        return self._json(start_response, status, error_body(status, message, code, type_), headers)

    # ---------------------------------------------------------------- WSGI entry
    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            if path.startswith("/_control/"):
                return self._control(environ, start_response, path, method)
            if path in ("/v1/chat/completions", "/chat/completions") and method == "POST":
                return self._model_call(environ, start_response, "chat")
            if path in ("/v1/embeddings", "/embeddings") and method == "POST":
                return self._model_call(environ, start_response, "embeddings")
            if path.startswith("/v1/models") and method == "GET":
                return self._models(environ, start_response, path)
            if path == "/healthz":
                return self._json(start_response, 200, {"ok": True})
            return self._error(start_response, 404, f"Invalid URL ({method} {path})", code="unknown_url")
        except _Drop:
            raise
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - a bug in the fake: answer in OpenAI's shape
            return self._error(start_response, 500, f"fakeprovider bug: {type(exc).__name__}: {exc}")

    def _read_body(self, environ: dict[str, Any]) -> bytes:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        stream = environ["wsgi.input"]
        return stream.read(length) if length > 0 else stream.read()

    # ---------------------------------------------------------------- control API
    def _control(self, environ: dict[str, Any], start_response: Any, path: str, method: str) -> list[bytes]:
        name = path[len("/_control/"):].strip("/")
        if name == "config" and method == "POST":
            raw = self._read_body(environ)
            try:
                cfg = json.loads(raw or b"{}")
                if not isinstance(cfg, dict):
                    raise TypeError("config must be a JSON object")
                self.apply_config(cfg)
            except (ValueError, TypeError) as exc:
                return self._json(start_response, 400, {"error": str(exc)}, list(_JSON_HEADERS))
            return self._json(start_response, 200, self.config(), list(_JSON_HEADERS))
        if name == "config":
            return self._json(start_response, 200, self.config(), list(_JSON_HEADERS))
        if name == "stats":
            return self._json(start_response, 200, self.stats(), list(_JSON_HEADERS))
        if name == "requests":
            return self._json(start_response, 200, list(self.request_log), list(_JSON_HEADERS))
        if name == "timeline":
            since = 0.0
            for part in (environ.get("QUERY_STRING") or "").split("&"):
                key, _, value = part.partition("=")
                if key == "since" and value:
                    with contextlib.suppress(ValueError):
                        since = float(value)
            events = [list(e) for e in self.timeline if e[0] > since]
            return self._json(start_response, 200, {"now": time.time(), "events": events},
                              list(_JSON_HEADERS))
        if name == "reset" and method == "POST":
            self.reset()
            return self._json(start_response, 200, {"ok": True}, list(_JSON_HEADERS))
        return self._json(start_response, 404, {"error": f"no control endpoint {method} {path}"},
                          list(_JSON_HEADERS))

    # ---------------------------------------------------------------- /v1/models
    def _models(self, environ: dict[str, Any], start_response: Any, path: str) -> list[bytes]:
        self.models_calls += 1
        if not self._bearer(environ):
            return self._auth_error(start_response, environ)
        names = list(BASE_MODELS) + [m for m in self.seen_models if m not in BASE_MODELS]
        rest = path[len("/v1/models"):].strip("/")
        if rest:
            if rest not in names:
                return self._error(start_response, 404, f"The model `{rest}` does not exist or you do not "
                                   "have access to it.", code="model_not_found")
            self._count_status(200)
            return self._json(start_response, 200, _model_object(rest))
        self._count_status(200)
        return self._json(start_response, 200, {"object": "list", "data": [_model_object(n) for n in names]})

    def _bearer(self, environ: dict[str, Any]) -> str | None:
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if not auth.startswith("Bearer "):
            return None
        key = auth[7:].strip()
        return key or None

    def _auth_error(self, start_response: Any, environ: dict[str, Any]) -> list[bytes]:
        if not environ.get("HTTP_AUTHORIZATION", "").startswith("Bearer ") or not self._bearer(environ):
            return self._error(start_response, 401, "You didn't provide an API key. You need to provide your "
                               "API key in an Authorization header using Bearer auth (i.e. Authorization: "
                               "Bearer YOUR_KEY).", code=None)
        return self._error(start_response, 401, "Incorrect API key provided.", code="invalid_api_key")

    # ---------------------------------------------------------------- model calls
    def _model_call(self, environ: dict[str, Any], start_response: Any, kind: str) -> Iterable[bytes]:
        started = time.monotonic()
        self._local.generation = self.generation
        if kind == "chat":
            self.calls += 1
        else:
            self.embeddings_calls += 1
        self.in_flight += 1
        self.concurrent_max = max(self.concurrent_max, self.in_flight)
        streaming = False
        held: list[LimitScope] = []  # the limit scopes this call counts against while it runs
        try:
            raw = self._read_body(environ)
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            if not isinstance(body, dict):
                body = None
            self.request_log.append({
                "path": environ.get("PATH_INFO"),
                "headers": {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
                            if k.startswith("HTTP_")} | ({"content-type": environ["CONTENT_TYPE"]}
                                                         if environ.get("CONTENT_TYPE") else {}),
                "body": body if body is not None else raw.decode("utf-8", "replace")[:10_000],
            })
            key = self._bearer(environ)
            if key is None or (self.api_key is not None and key != self.api_key):
                return self._auth_error(start_response, environ)
            if body is None:
                return self._error(start_response, 400, "We could not parse the JSON body of your request. "
                                   "(HINT: This likely means you aren't using your HTTP library correctly.)")
            model = body.get("model")
            if not isinstance(model, str) or not model:
                return self._error(start_response, 400, "you must provide a model parameter")
            self.by_model[model] = self.by_model.get(model, 0) + 1
            if model not in self.seen_models and len(self.seen_models) < 1000:
                self.seen_models[model] = None

            # commanded behaviour: hang, fail, latency
            if self.hang_next.get("count", 0) > 0:
                self.hang_next["count"] -= 1
                self._sleep(float(self.hang_next.get("seconds", 0)))
            if self.fail_next.get("count", 0) > 0:
                self.fail_next["count"] -= 1
                f = self.fail_next
                self._sleep(self.latency_ms / 1000.0)
                return self._error(start_response, int(f.get("status") or 429), f.get("message"),
                                   retry_after=f.get("retry_after"), started=started)

            if kind == "embeddings":
                tokens = _embedding_tokens(body.get("input"))
                held, refusal = self._enforce(model, tokens)
                if refusal is not None:
                    return self._rate_limited(start_response, model, tokens, refusal, started)
                self._sleep(self.latency_ms / 1000.0)
                return self._embeddings(start_response, body, model, started)

            messages = body.get("messages")
            if (not isinstance(messages, list) or not messages
                    or not all(isinstance(m, dict) for m in messages)):
                return self._error(start_response, 400, "'messages' must be a non-empty array of objects",
                                   type_="invalid_request_error")
            last_user = next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
            if len(self.by_content) < _MAX_BY_CONTENT or last_user in self.by_content:
                self.by_content[last_user] = self.by_content.get(last_user, 0) + 1

            # enforced limits: the call counts from now, with the tokens it will be billed
            answer = self._answer(body, messages)
            tokens = answer["prompt_tokens"] + answer["completion_tokens"]
            held, refusal = self._enforce(model, tokens)
            if refusal is not None:
                return self._rate_limited(start_response, model, tokens, refusal, started)

            # magic contents
            text = last_user
            drop = False
            drip = 0.0
            while True:
                text = text.lstrip()
                if text.startswith("sleep:"):
                    m = re.match(r"sleep:([0-9]*\.?[0-9]+)", text)
                    if not m:
                        break
                    self._sleep(float(m.group(1)))
                    text = text[m.end():]
                elif text.startswith("status:"):
                    m = re.match(r"status:([0-9]{3})", text)
                    if not m:
                        break
                    self._sleep(self.latency_ms / 1000.0)
                    return self._error(start_response, int(m.group(1)), started=started, model=model)
                elif text.startswith("drop:"):
                    drop = True
                    text = text[5:]
                elif text.startswith("drip:"):
                    m = re.match(r"drip:([0-9]*\.?[0-9]+)", text)
                    if not m:
                        break
                    drip = float(m.group(1))
                    text = text[m.end():]
                elif text.startswith("bad200:"):
                    m = re.match(r"bad200:(error|empty|missing)", text)
                    if not m:
                        break
                    self._count_status(200)
                    return self._bad_answer(start_response, m.group(1), bool(body.get("stream")), model,
                                            started)
                elif text.startswith("tokens:"):
                    m = re.match(r"tokens:(-?[0-9]+),(-?[0-9]+)", text)
                    if not m:
                        break
                    answer["prompt_tokens"], answer["completion_tokens"] = int(m.group(1)), int(m.group(2))
                    text = text[m.end():]
                else:
                    break

            if self.latency_ms > 0:
                self._sleep(self.latency_ms / 1000.0)
            else:
                # Yield once even with no latency: a keep-alive client that sends its next request at
                # once would otherwise keep this greenlet running and starve the other connections
                # (p99 of seconds when the fake is saturated).
                import gevent
                gevent.sleep(0)
            if body.get("stream"):
                streaming = True
                self._count_status(200)
                start_response("200 OK", self._headers(content_type="text/event-stream; charset=utf-8",
                                                       started=started, model=model))
                events = self._stream(body, model, answer, drop, held)
                return self._dripping(b"".join(events), drip) if drip else events
            self._count_status(200)
            payload = _dumps(self._completion(model, answer))
            headers = self._headers(started=started, model=model)
            headers.append(("Content-Length", str(len(payload))))
            start_response("200 OK", headers)
            if drop:
                return self._dropping([payload[: len(payload) // 2]])
            if drip:
                return self._dripping(payload, drip)
            return [payload]
        finally:
            if not streaming:
                self._call_ended()
                self._release(held)

    def _dripping(self, payload: bytes, interval: float) -> Iterator[bytes]:
        """One byte every ``interval`` seconds: each read sees data long before any read timeout."""
        for i in range(len(payload)):
            if i:
                self._sleep(interval)
            yield payload[i:i + 1]

    def _bad_answer(self, start_response: Any, what: str, stream: bool, model: str,
                    started: float) -> list[bytes]:
        """A 200 that is no answer (``bad200:``), as some upstreams and proxies send."""
        error = {"message": "The server had an error while processing your request.", "type": "server_error",
                 "param": None, "code": None}
        if stream:
            start_response("200 OK", self._headers(content_type="text/event-stream; charset=utf-8",
                                                   started=started, model=model))
            if what == "error":
                return [b"data: " + _dumps({"error": error}) + b"\n\n"]
            return [b"data: [DONE]\n\n"]  # a stream that ends before any choice
        if what == "error":
            obj: dict[str, Any] = {"error": error}
        else:
            obj = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion",
                   "created": int(time.time()), "model": model,
                   "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
            if what == "empty":
                obj["choices"] = []
        payload = _dumps(obj)
        headers = self._headers(started=started, model=model)
        headers.append(("Content-Length", str(len(payload))))
        start_response("200 OK", headers)
        return [payload]

    def _dropping(self, pieces: list[bytes]) -> Iterator[bytes]:
        yield from pieces
        raise _Drop("connection dropped on command")

    # ---------------------------------------------------------------- answers
    def _answer(self, body: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
        """Decide the reply: {"content": str|None, "tool_call": dict|None, "finish_reason": str, usage...}."""
        prompt_words = 0
        for m in messages:
            prompt_words += len(message_text(m).split())
            for tc in m.get("tool_calls") or []:
                if isinstance(tc, dict):
                    fn = tc.get("function") or {}
                    prompt_words += len(f"{fn.get('name', '')} {fn.get('arguments', '')}".split())
        prompt_tokens = max(1, prompt_words)
        last = messages[-1]
        tools = body.get("tools")
        last_text = message_text(last)
        if (last.get("role") == "user" and isinstance(tools, list) and tools
                and body.get("tool_choice") != "none"
                and re.search(r"\bweather\b", last_text, re.IGNORECASE)):
            tool = _pick_tool(tools)
            name = tool.get("name") or "get_weather"
            arguments = json.dumps(_tool_arguments(tool.get("parameters") or {}, last_text))
            call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                    "function": {"name": name, "arguments": arguments}}
            return {"content": None, "tool_call": call, "finish_reason": "tool_calls",
                    "prompt_tokens": prompt_tokens, "completion_tokens": count_tokens(f"{name} {arguments}")}
        if last.get("role") == "tool":
            content = "echo: " + last_text
        else:
            asked = next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
            content = "echo: " + asked
        finish = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and limit > 0:
            words = re.findall(r"\s*\S+", content)
            if len(words) > limit:
                content = "".join(words[:limit])
                finish = "length"
        return {"content": content, "tool_call": None, "finish_reason": finish,
                "prompt_tokens": prompt_tokens, "completion_tokens": count_tokens(content)}

    @staticmethod
    def _usage(answer: dict[str, Any]) -> dict[str, Any]:
        p, c = answer["prompt_tokens"], answer["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0}}

    def _completion(self, model: str, answer: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer["content"], "refusal": None,
                                   "annotations": []}
        if answer["tool_call"] is not None:
            message["tool_calls"] = [answer["tool_call"]]
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": answer["finish_reason"]}],
            "usage": self._usage(answer),
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def _stream(self, body: dict[str, Any], model: str, answer: dict[str, Any], drop: bool,
                held: list[LimitScope] | None = None) -> Iterator[bytes]:
        try:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            base = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk",
                    "created": int(time.time()), "model": model, "service_tier": "default",
                    "system_fingerprint": SYSTEM_FINGERPRINT}

            def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
                obj = dict(base)
                obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                if include_usage:
                    obj["usage"] = None
                return b"data: " + _dumps(obj) + b"\n\n"

            delay = self.chunk_delay_ms / 1000.0
            call = answer["tool_call"]
            if call is not None:
                yield chunk({"role": "assistant", "content": None, "tool_calls": [
                    {"index": 0, "id": call["id"], "type": "function",
                     "function": {"name": call["function"]["name"], "arguments": ""}}], "refusal": None})
                args = call["function"]["arguments"]
                pieces = [args[i:i + 8] for i in range(0, len(args), 8)] or [""]
                for n, piece in enumerate(pieces):
                    self._sleep(delay)
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                    if drop and n == 0:
                        raise _Drop("stream dropped on command")
            else:
                yield chunk({"role": "assistant", "content": "", "refusal": None})
                for n, piece in enumerate(re.findall(r"\s*\S+", answer["content"]) or [answer["content"]]):
                    self._sleep(delay)
                    yield chunk({"content": piece})
                    if drop and n == 0:
                        raise _Drop("stream dropped on command")
            self._sleep(delay)
            yield chunk({}, answer["finish_reason"])
            if include_usage:
                obj = dict(base)
                obj["choices"] = []
                obj["usage"] = self._usage(answer)
                yield b"data: " + _dumps(obj) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            self._call_ended()
            self._release(held or [])

    def _embeddings(self, start_response: Any, body: dict[str, Any], model: str,
                    started: float) -> list[bytes]:
        inp = body.get("input")
        if isinstance(inp, str):
            texts = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            texts = [" ".join(map(str, inp))]
        elif isinstance(inp, list) and inp:
            texts = [x if isinstance(x, str) else " ".join(map(str, x)) for x in inp]
        else:
            return self._error(start_response, 400, "'input' must be a string or a non-empty array")
        dims = body.get("dimensions") or 8
        if not isinstance(dims, int) or dims < 1 or dims > 4096:
            return self._error(start_response, 400, "'dimensions' must be an integer between 1 and 4096")
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(texts):
            vec = embedding_vector(text, dims)
            emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(count_tokens(t) for t in texts)
        self._count_status(200)
        return self._json(start_response, 200, {"object": "list", "data": data, "model": model,
                                                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                          self._headers(started=started, model=model))


def _embedding_tokens(inp: Any) -> int:
    """Tokens of an embeddings ``input`` as the fake bills them (0 for an input it will reject)."""
    if isinstance(inp, str):
        return count_tokens(inp)
    if isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
        return count_tokens(" ".join(map(str, inp)))
    if isinstance(inp, list):
        return sum(count_tokens(x if isinstance(x, str) else " ".join(map(str, x))) for x in inp
                   if isinstance(x, str | list))
    return 0


def embedding_vector(text: str, dims: int = 8) -> list[float]:
    """Deterministic unit vector for ``text`` (what the fake returns; float32-exact values)."""
    raw = b""
    counter = 0
    while len(raw) < dims * 2:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    vals = [(int.from_bytes(raw[2 * i:2 * i + 2], "little") / 65535.0) * 2 - 1 for i in range(dims)]
    norm = sum(v * v for v in vals) ** 0.5 or 1.0
    # round-trip through float32 so the float and base64 encodings give identical numbers
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *(v / norm for v in vals))))


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1700000000, "owned_by": "fakeprovider"}


def _pick_tool(tools: list[Any]) -> dict[str, Any]:
    fns = [t.get("function") or {} for t in tools if isinstance(t, dict)]
    for fn in fns:
        if "weather" in str(fn.get("name", "")).lower():
            return fn
    return fns[0] if fns else {}


def _tool_arguments(schema: dict[str, Any], text: str) -> dict[str, Any]:
    props = schema.get("properties") or {}
    wanted = schema.get("required") or list(props)
    m = re.search(r"\bin\s+([A-Z][\w-]*|\w+)", text)
    place = m.group(1).strip("?.!,") if m else "Paris"
    args: dict[str, Any] = {}
    for name in wanted:
        spec = props.get(name) or {}
        typ = spec.get("type", "string")
        if spec.get("enum"):
            args[name] = spec["enum"][0]
        elif name in ("location", "city", "place"):
            args[name] = place
        elif typ in ("integer", "number"):
            args[name] = 1
        elif typ == "boolean":
            args[name] = True
        elif typ == "array":
            args[name] = []
        elif typ == "object":
            args[name] = {}
        else:
            args[name] = "fake"
    if not args:
        args = {"location": place}
    return args


# ===================================================================================== server
def serve(host: str, port: int, latency_ms: float, api_key: str | None = None,
          limits: dict[str, Any] | None = None, model_limits: dict[str, Any] | None = None) -> None:
    from gevent import monkey

    monkey.patch_all()
    import logging
    import resource

    from gevent.pywsgi import WSGIHandler, WSGIServer

    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = hard if hard != resource.RLIM_INFINITY else 1 << 20
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))

    class QuietHandler(WSGIHandler):
        def handle(self) -> Any:
            # pywsgi sends the headers and the body in two writes: without TCP_NODELAY, Nagle +
            # the client's delayed ACK add ~40 ms to every response.
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return super().handle()

        def log_request(self) -> None:  # no access log: it costs CPU in benchmarks
            pass

        def handle_error(self, t: Any, v: Any, tb: Any) -> None:
            if isinstance(v, _Drop):  # commanded connection cut: close the socket without a 500
                self.close_connection = True
                self.response_use_chunked = False
                with contextlib.suppress(Exception):
                    self.socket.shutdown(2)
                return
            super().handle_error(t, v, tb)

    app = FakeUpstream(latency_ms=latency_ms, api_key=api_key, limits=limits, model_limits=model_limits)
    server = WSGIServer((host, port), app, handler_class=QuietHandler, log=None,
                        error_log=logging.getLogger("fakeprovider"), backlog=4096)
    server.init_socket()
    announce_and_serve(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakeprovider",
                                     description="Fake OpenAI upstream (see the module docstring).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed as READY <port>)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every /v1 answer")
    parser.add_argument("--api-key", default=None, help="require exactly this bearer key (default: any)")
    parser.add_argument("--rpm", type=int, default=None, help="enforce: calls started per sliding 60 s")
    parser.add_argument("--tpm", type=int, default=None,
                        help="enforce: tokens (prompt+completion) per sliding 60 s")
    parser.add_argument("--concurrency", type=int, default=None, help="enforce: calls in flight")
    parser.add_argument("--model-limits", default=None, metavar="JSON",
                        help='''enforce per model, e.g. '{"gpt-x": {"rpm": 20}}' '''
                             "(on top of the global limits)")
    args = parser.parse_args(argv)
    limits = {"rpm": args.rpm, "tpm": args.tpm, "concurrency": args.concurrency}
    model_limits = json.loads(args.model_limits) if args.model_limits else None
    try:  # fail fast on a bad limit, before printing READY
        parse_limits(limits)
        for value in (model_limits or {}).values():
            parse_limits(value)
    except TypeError as exc:
        parser.error(str(exc))
    serve(args.host, args.port, args.latency_ms, args.api_key, limits, model_limits)
    return 0


# ===================================================================================== test helper
class FakeProvider(ServerProcess):
    """Runs ``python -m tests.fakeprovider`` as a subprocess on a free port (a context manager).

    ``.base_url`` is ``http://127.0.0.1:<port>/v1`` — give it to ``openai.OpenAI(base_url=...)`` or put it
    in a registry YAML. ``.url`` is the root (for ``/_control``).
    """

    module = "tests.fakeprovider"

    def __init__(self, latency_ms: float = 0.0, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, startup_timeout: float = 20.0,
                 stderr: Any = None, env: dict[str, str] | None = None, limits: dict[str, Any] | None = None,
                 model_limits: dict[str, Any] | None = None) -> None:
        super().__init__(host=host, port=port, startup_timeout=startup_timeout, stderr=stderr, env=env)
        self.latency_ms, self.api_key = latency_ms, api_key
        # the --rpm/--tpm/--concurrency the process starts (and resets) with
        self.limits = parse_limits(limits)
        self.model_limits = {m: parse_limits(v) for m, v in (model_limits or {}).items()}

    def arguments(self) -> list[str]:
        args = ["--latency-ms", str(self.latency_ms)]
        if self.api_key:
            args += ["--api-key", self.api_key]
        for kind, value in self.limits.items():
            if value is not None:
                args += [f"--{kind}", str(value)]
        if self.model_limits:
            args += ["--model-limits", json.dumps(self.model_limits)]
        return args

    # addresses ---------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    # control API -------------------------------------------------------------
    def _control(self, method: str, name: str, payload: Any = None) -> Any:
        import urllib.request

        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(f"{self.url}/_control/{name}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return self._control("GET", "stats")

    def requests(self) -> list[dict[str, Any]]:
        """The last 100 /v1 POSTs the fake received: [{"path", "headers", "body"}], oldest first."""
        return self._control("GET", "requests")

    def configure(self, **config: Any) -> dict[str, Any]:
        """e.g. ``configure(latency_ms=50)``, ``configure(fail_next={"count": 2, "status": 429,
        "retry_after": 1})``, ``configure(hang_next={"count": 1, "seconds": 30})``."""
        return self._control("POST", "config", config)

    def config(self) -> dict[str, Any]:
        return self._control("GET", "config")

    def reset(self) -> None:
        self._control("POST", "reset", {})

    def timeline(self, since: float = 0.0) -> dict[str, Any]:
        """``{"now": wall time, "events": [[wall-clock start, tokens, "ok" | "rpm" | "tpm" | "concurrency"],
        ...]}`` of the chat/embeddings calls that reached the limit check after ``since`` (last 500,000)."""
        return self._control("GET", f"timeline?since={since!r}")


if __name__ == "__main__":
    sys.exit(main())
