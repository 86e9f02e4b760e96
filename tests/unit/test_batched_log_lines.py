"""The API's and the gevent worker's batched log writes (common/observability/logs.py,
BatchingStreamHandler): INFO lines wait for the scheduled write or for enough of them; a WARNING goes
at once with everything before it, in order; a flush (the scheduled one, or logging's at exit) writes
what is held; one schedule at a time; a worker that starts stopping writes every line at once."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import pytest

from common.observability.logs import BatchingStreamHandler, configure_logging, write_through
from common.settings import ObservabilitySettings


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _logger(max_chars: int = 10_000) -> tuple[logging.Logger, CountingStream, list[Callable[[], None]]]:
    stream, scheduled = CountingStream(), []
    handler = BatchingStreamHandler(stream, lambda delay, fn: scheduled.append(fn), max_chars=max_chars)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"test.batched.{id(stream)}")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)
    return logger, stream, scheduled


# (what is logged, then what the stream holds, how many writes, how many schedules pending)
CASES = [
    pytest.param([("info", "a"), ("info", "b")], "", 0, 1, id="info-lines-wait-for-the-schedule"),
    pytest.param([("info", "a"), ("warning", "w")], "a\nw\n", 1, 1, id="a-warning-writes-all-held-in-order"),
    pytest.param([("error", "e")], "e\n", 1, 0, id="an-error-alone-is-written-at-once"),
    pytest.param([("debug", "d"), ("info", "i")], "", 0, 1, id="debug-is-held-too"),
]


@pytest.mark.parametrize(("lines", "written", "writes", "pending"), CASES)
def test_what_is_written_when(lines, written, writes, pending):
    logger, stream, scheduled = _logger()
    for level, text in lines:
        getattr(logger, level)(text)
    assert (stream.getvalue(), stream.writes, len(scheduled)) == (written, writes, pending)


def test_the_scheduled_write_sends_every_held_line_in_one_write_and_schedules_again_after():
    logger, stream, scheduled = _logger()
    for text in ("a", "b", "c"):
        logger.info(text)
    assert len(scheduled) == 1
    scheduled.pop()()
    assert (stream.getvalue(), stream.writes) == ("a\nb\nc\n", 1)
    logger.info("d")
    assert len(scheduled) == 1  # the next line waits for a new write
    logging.getLogger(logger.name).handlers[0].flush()  # what logging's shutdown does at exit
    assert stream.getvalue().endswith("c\nd\n")


def test_enough_held_characters_are_written_without_waiting():
    logger, stream, scheduled = _logger(max_chars=6)
    logger.info("abc")
    logger.info("def")   # 8 characters with the newlines
    assert (stream.getvalue(), stream.writes) == ("abc\ndef\n", 1)


@pytest.fixture
def root_handlers():
    """The root logger's handlers put back after the test (configure_logging works on the root)."""
    root = logging.getLogger()
    saved = list(root.handlers)
    yield root
    root.handlers = saved


def _settings():
    return ObservabilitySettings(log_format="text")


def test_the_workers_plain_stream_handler_becomes_a_batching_one_on_the_same_stream(root_handlers, tmp_path):
    stream, scheduled = CountingStream(), []
    plain = logging.StreamHandler(stream)
    plain.setLevel(logging.INFO)
    to_file = logging.FileHandler(tmp_path / "log")   # a file's handler (Celery's --logfile) is left as it is
    root_handlers.handlers = [plain, to_file]
    configure_logging(_settings(), schedule=lambda delay, fn: scheduled.append(fn))
    batching, kept = root_handlers.handlers
    to_file.close()
    assert isinstance(batching, BatchingStreamHandler) and kept is to_file
    assert (batching.stream, batching.level) == (stream, logging.INFO)
    logging.getLogger("gateway.upstream").info("ok")
    assert (stream.writes, len(scheduled)) == (0, 1)
    scheduled.pop()()
    assert "gateway.upstream: ok" in stream.getvalue()


def test_without_a_schedule_the_root_handlers_stay(root_handlers):
    plain = logging.StreamHandler(CountingStream())
    root_handlers.handlers = [plain]
    configure_logging(_settings())
    assert root_handlers.handlers == [plain]


def test_once_stopping_held_lines_are_written_and_every_next_line_at_once(root_handlers):
    stream, scheduled = CountingStream(), []
    handler = BatchingStreamHandler(stream, lambda delay, fn: scheduled.append(fn))
    handler.setFormatter(logging.Formatter("%(message)s"))
    root_handlers.handlers = [handler]
    log = logging.getLogger("gateway.upstream")
    log.info("held")
    write_through()
    assert (stream.getvalue(), stream.writes) == ("held\n", 1)
    log.info("next")
    assert (stream.getvalue(), stream.writes) == ("held\nnext\n", 2)
