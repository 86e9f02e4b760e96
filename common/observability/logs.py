"""Log lines: JSON (one object per line, the default) or text, level from settings.

The gateway's own lines carry structured fields (``extra={"fields": {...}}``): request id, job id,
key id, model, provider, status, timings, tokens — never a secret, and prompts or answers only when the
operator turned ``GATEWAY_LOG_CONTENT`` on. Two of them are the operator's record of traffic:

* ``gateway.access`` — one line per HTTP request at the API (``api/observe.py``);
* ``gateway.upstream`` — one line per upstream attempt at a worker (``workers/observe.py``).

:func:`configure_logging` is called once per process: the API's ``create_app`` (gunicorn leaves the
root logger to the app) and the worker's Celery ``after_setup_logger`` (Celery owns the handler; we
only give it our format). gunicorn's own lines (``Listening at``…) keep gunicorn's format.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from common.settings import ObservabilitySettings

#: the loggers whose level GATEWAY_LOG_LEVEL sets (everything of ours); others keep their own
OUR_LOGGERS = ("api", "workers", "common", "launcher", "gateway")
ACCESS = "gateway.access"
UPSTREAM = "gateway.upstream"
_MARK = "_gateway_handler"
BATCH_DELAY_S = 0.05     # how long an INFO line may wait to be written with the lines that follow it
BATCH_MAX_CHARS = 16_384  # written at once past this much

#: ``schedule(delay_s, fn)``: call ``fn`` once, ``delay_s`` from now, in this process's event loop
Schedule = Callable[[float, Callable[[], None]], object]


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    value = getattr(record, "fields", None)
    return value if isinstance(value, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for key, value in fields_of(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"), ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``base``'s line (Celery's, or ours) with the record's fields appended as ``key=value``."""

    def __init__(self, base: logging.Formatter | None = None) -> None:
        super().__init__()
        self.base = base or logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = self.base.format(record)
        extra = " ".join(f"{k}={_text(v)}" for k, v in fields_of(record).items() if v is not None)
        return f"{text} {extra}" if extra else text


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (" " in text or not text) else text


class BatchingStreamHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes lines below WARNING together: each waits at most ``delay`` s
    (or until ``max_chars`` are held) for the lines after it, then all go in one write. The API logs a
    line per request; written one by one each is a system call and a wake-up of whatever reads the
    stream (``up``'s console) — per request, for nothing. A WARNING or worse is written at once, with
    everything held before it (order kept); :meth:`flush` (also run at interpreter exit by logging's
    shutdown) writes what is held."""

    def __init__(self, stream: TextIO, schedule: Schedule, delay: float = BATCH_DELAY_S,
                 max_chars: int = BATCH_MAX_CHARS) -> None:
        super().__init__(stream)
        self.schedule = schedule
        self.delay = delay
        self.max_chars = max_chars
        self._held: list[str] = []
        self._chars = 0
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:  # noqa: BLE001 - logging's contract: a bad record is reported, never raised
            self.handleError(record)
            return
        self._held.append(line)
        self._chars += len(line)
        if record.levelno >= logging.WARNING or self._chars >= self.max_chars:
            try:
                self._write()
            except Exception:  # noqa: BLE001 - as StreamHandler.emit: reported on stderr, never raised
                self.handleError(record)
        elif not self._scheduled:
            self._scheduled = True
            self.schedule(self.delay, self._flush_held)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # (set by logging.Handler.__init__)
            self._write()

    def _flush_held(self) -> None:
        """The scheduled write: what went wrong is reported as for any line, never raised in the loop."""
        try:
            self.flush()
        except Exception:  # noqa: BLE001
            self.handleError(logging.makeLogRecord({"msg": "(lines held for a batched write)"}))

    def _write(self) -> None:
        held, self._held, self._chars, self._scheduled = self._held, [], 0, False
        if held:
            self.stream.write("".join(held))
        self.stream.flush()


def configure_logging(settings: ObservabilitySettings, schedule: Schedule | None = None) -> None:
    """Our loggers at ``settings.log_level``; every root handler formats as ``settings.log_format``
    (a handler on stderr is added if the root has none). With ``schedule``, lines go to a stream in
    batches (:class:`BatchingStreamHandler`): the added handler, or the plain stream handler the root
    already has (the Celery worker's, on stderr). Idempotent."""
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(settings.log_level)
    root = logging.getLogger()
    if not root.handlers:
        ours = (logging.StreamHandler(sys.stderr) if schedule is None
                else BatchingStreamHandler(sys.stderr, schedule))
        setattr(ours, _MARK, True)
        root.addHandler(ours)
    elif schedule is not None:
        _batch_stream_handlers(root, schedule)
    for handler in root.handlers:
        current = handler.formatter
        if isinstance(current, JsonFormatter | TextFormatter):
            continue
        handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter(current))


def _batch_stream_handlers(root: logging.Logger, schedule: Schedule) -> None:
    """Each plain :class:`logging.StreamHandler` of ``root`` (not a file's: its subclass) replaced by a
    :class:`BatchingStreamHandler` on the same stream, with its level, formatter and filters."""
    for index, handler in enumerate(root.handlers):
        if type(handler) is not logging.StreamHandler:
            continue
        batching = BatchingStreamHandler(handler.stream, schedule)
        batching.setLevel(handler.level)
        batching.setFormatter(handler.formatter)
        batching.filters = list(handler.filters)
        root.handlers[index] = batching
        handler.flush()


def write_through() -> None:
    """Every batching handler of the root writes what it holds now and each line at once from now
    on: the process is stopping, and whatever ends it (an ``os._exit``, a cold shutdown) may not
    wait for a scheduled write."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BatchingStreamHandler):
            handler.max_chars = 0
            handler.flush()
