"""The outbox entry (``common/outbox.py``) and the outcome a settled live job implies
(``workers/reconciler.live_outcome``): pure encode/decode, table-tested."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from common.contract import Cancelled, Chunk, Expired, Failed, JobState, Result
from common.jobs import StreamEvent
from common.outbox import RowOutcome, outcome_of
from workers.reconciler import live_outcome

AT = datetime(2026, 11, 30, 2, 31, 37, 123456, tzinfo=UTC)
WHEN = b"2026-11-30T02:31:37+00:00"
USAGE_ROW = {"call_id": "job_1:1:1", "job_id": "job_1", "api_key_id": "anonymous", "cost_usd": "0.000012",
             "prompt_tokens": 3, "completion_tokens": 4, "outcome": "success"}

ROUND_TRIPS = [
    pytest.param(RowOutcome("job_1", JobState.SUCCEEDED, AT, result={"choices": [{"index": 0}]},
                            usage={"prompt_tokens": 3, "cost_usd": "0.000012"}, usage_row=USAGE_ROW),
                 id="succeeded-with-result-and-usage-row"),
    pytest.param(RowOutcome("job_2", JobState.FAILED, AT, error={"code": "upstream_unavailable"}),
                 id="failed-with-error-no-call"),
    pytest.param(RowOutcome("job_3", JobState.EXPIRED, AT), id="expired-bare"),
    pytest.param(RowOutcome("job_4", JobState.CANCELLED, AT.astimezone(timezone(timedelta(hours=5)))),
                 id="another-time-zone"),
    pytest.param(RowOutcome("job_5", JobState.SUCCEEDED, AT, result={"text": "\u0000 \u00e9 \U0001f600"}),
                 id="unicode-kept"),
]


@pytest.mark.parametrize("outcome", ROUND_TRIPS)
def test_an_outcome_survives_the_stream(outcome: RowOutcome) -> None:
    parsed = RowOutcome.parse(outcome.to_json())
    assert parsed == outcome
    assert parsed.finished_at == outcome.finished_at  # the same instant, zone and all
    assert outcome_of({b"j": outcome.to_json().encode()}) == outcome


def test_an_entry_without_an_outcome_carries_none() -> None:
    assert outcome_of({b"u": b"{}"}) is None


BAD = [
    pytest.param(b"{not json", ValueError, id="not-json"),
    pytest.param(b"[1, 2]", ValueError, id="not-an-object"),
    pytest.param(b'{"state": "succeeded", "finished_at": "' + WHEN + b'"}', KeyError, id="no-job-id"),
    pytest.param(b'{"job_id": "j", "state": "succeeded"}', KeyError, id="no-finished-at"),
    pytest.param(b'{"job_id": "j", "state": "done", "finished_at": "' + WHEN + b'"}', ValueError,
                 id="unknown-state"),
    pytest.param(b'{"job_id": "j", "state": "running", "finished_at": "' + WHEN + b'"}', ValueError,
                 id="state-not-terminal"),
    pytest.param(b'{"job_id": "j", "state": "failed", "finished_at": "2026-11-30T02:31:37"}', ValueError,
                 id="naive-time"),
    pytest.param(b'{"job_id": "j", "state": "failed", "finished_at": "' + WHEN + b'", "error": "x"}',
                 ValueError, id="error-not-an-object"),
    pytest.param(b'{"job_id": "j", "state": "succeeded", "finished_at": "' + WHEN + b'", '
                 b'"usage_row": [1]}', ValueError, id="usage-row-not-an-object"),
]


@pytest.mark.parametrize(("raw", "error"), BAD)
def test_what_is_no_outcome_is_refused(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        outcome_of({b"j": raw})


def test_only_what_is_set_is_written() -> None:
    assert set(json.loads(RowOutcome("job_3", JobState.EXPIRED, AT).to_json())) == {"job_id", "state",
                                                                                   "finished_at"}


def _events(*events: object) -> list[StreamEvent]:
    return [StreamEvent(f"{i + 1}-0", event) for i, event in enumerate(events)]  # type: ignore[arg-type]


LIVE = [
    pytest.param(JobState.SUCCEEDED, _events(Result({"id": "r"}, {"provider": "fake"})), {"id": "r"}, None,
                 id="succeeded-takes-the-result"),
    pytest.param(JobState.FAILED, _events(Failed({"code": "timeout"})), None, {"code": "timeout"},
                 id="failed-takes-the-error"),
    pytest.param(JobState.SUCCEEDED, _events(Chunk({"c": 1}), Result({"id": "r"})), {"id": "r"}, None,
                 id="the-final-event-after-chunks"),
    pytest.param(JobState.EXPIRED, _events(Expired("waited too long")), None, None, id="expired-event"),
    pytest.param(JobState.CANCELLED, _events(Cancelled()), None, None, id="cancelled-event"),
    pytest.param(JobState.EXPIRED, [], None, None, id="no-event-at-all"),
]


@pytest.mark.parametrize(("state", "events", "result", "error"), LIVE)
def test_a_settled_live_job_implies_its_rows_outcome(state, events, result, error) -> None:
    outcome = live_outcome("job_9", state, str(AT.timestamp()).encode(), events)
    assert (outcome.job_id, outcome.state, outcome.result, outcome.error) == ("job_9", state, result, error)
    assert outcome.finished_at == AT and outcome.usage_row is None


def test_a_live_job_without_a_finish_time_finished_now() -> None:
    before = datetime.now(UTC)
    assert live_outcome("job_9", JobState.EXPIRED, None, []).finished_at >= before
