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
from typing import Any

from common.settings import ObservabilitySettings

#: the loggers whose level GATEWAY_LOG_LEVEL sets (everything of ours); others keep their own
OUR_LOGGERS = ("api", "workers", "common", "launcher", "gateway")
ACCESS = "gateway.access"
UPSTREAM = "gateway.upstream"
_MARK = "_gateway_handler"


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


def configure_logging(settings: ObservabilitySettings) -> None:
    """Our loggers at ``settings.log_level``; every root handler formats as ``settings.log_format``
    (a handler on stderr is added if the root has none). Idempotent."""
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(settings.log_level)
    root = logging.getLogger()
    if not root.handlers:
        ours = logging.StreamHandler(sys.stderr)
        setattr(ours, _MARK, True)
        root.addHandler(ours)
    for handler in root.handlers:
        current = handler.formatter
        if isinstance(current, JsonFormatter | TextFormatter):
            continue
        handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter(current))
