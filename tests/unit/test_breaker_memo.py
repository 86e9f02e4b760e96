"""The worker's memory of a closed breaker (common/routing/breaker.py ClosedMemo): what it remembers,
for how long, and what makes it forget."""

from __future__ import annotations

import pytest

from common.routing.breaker import CLOSED_FRESH_S, ClosedMemo, Verdict


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("outcome,state,after_s,closed", [
    (Verdict.OK, "closed", 0.0, True),
    (Verdict.OK, "closed", 0.249, True),
    (Verdict.OK, "closed", 0.25, False),          # the bound: then it asks Redis again
    (Verdict.OK, "open", 0.0, False),             # a straggler's success on an open breaker
    (Verdict.OK, "", 0.0, False),                 # the report failed: nothing heard
    (Verdict.FAIL, "closed", 0.0, False),         # a failure it saw: ask Redis before the next call
    (Verdict.MISCONFIGURED, "open", 0.0, False),
    (Verdict.NEUTRAL, "closed", 0.0, False),      # a 429: nothing remembered either
], ids=["just-heard", "inside-bound", "bound-passed", "open", "no-reply", "fail", "misconfigured", "neutral"])
def test_it_remembers_only_a_success_that_left_it_closed_and_only_briefly(outcome, state, after_s, closed):
    clock = Clock()
    memo = ClosedMemo(0.25, clock)
    memo.heard("p/m", outcome, state, asked=clock.now)
    clock.now += after_s
    assert memo.closed("p/m") is closed
    assert memo.closed("q/m") is False   # per deployment


@pytest.mark.parametrize("then", [Verdict.FAIL, Verdict.MISCONFIGURED, Verdict.NEUTRAL])
def test_any_other_outcome_forgets_at_once(then):
    clock = Clock()
    memo = ClosedMemo(0.25, clock)
    memo.heard("p/m", Verdict.OK, "closed", asked=clock.now)
    clock.now += 0.01
    memo.heard("p/m", then, "closed", asked=clock.now)
    assert memo.closed("p/m") is False


def test_the_staleness_counts_from_when_the_report_was_sent():
    clock = Clock()
    memo = ClosedMemo(0.25, clock)
    sent = clock.now
    clock.now += 0.2   # the reply took this long
    memo.heard("p/m", Verdict.OK, "closed", asked=sent)
    clock.now += 0.05
    assert memo.closed("p/m") is False


def test_a_reply_to_a_report_sent_before_a_failure_here_does_not_bring_closed_back():
    clock = Clock()
    memo = ClosedMemo(0.25, clock)
    sent = clock.now                     # greenlet A sends its success's report ...
    clock.now += 0.01
    memo.heard("p/m", Verdict.FAIL, "open", asked=clock.now)   # ... B's failure is heard first ...
    clock.now += 0.01
    memo.heard("p/m", Verdict.OK, "closed", asked=sent)        # ... then A's older reply
    assert memo.closed("p/m") is False
    memo.heard("p/m", Verdict.OK, "closed", asked=clock.now)   # a report sent after the failure counts
    assert memo.closed("p/m") is True


def test_without_a_bound_it_never_remembers():
    clock = Clock()
    memo = ClosedMemo(0.0, clock)
    memo.heard("p/m", Verdict.OK, "closed", asked=clock.now)
    assert memo.closed("p/m") is False


def test_the_workers_bound_is_short():
    # the documented staleness: another process's opening is seen here within this (ClosedMemo)
    assert 0 < CLOSED_FRESH_S <= 0.25
