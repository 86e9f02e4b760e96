"""What the reconciler tells the operator after a pass (workers/reconciler.py ``summary``)."""

from __future__ import annotations

import pytest

from common.redeliver import waits_for_first_claim
from workers.reconciler import summary

NOTHING = {"requeued": 0, "expired": 0, "repaired": 0}


@pytest.mark.parametrize(("done", "at_start", "expected"), [
    (NOTHING, True, ["start-up check", "nothing to recover"]),
    ({**NOTHING, "requeued": 3}, True, ["start-up check", "3 accepted async job(s)", "queued again"]),
    ({**NOTHING, "requeued": 2, "expired": 1}, False,
     ["queue check", "2 accepted async job(s)", "1 lost job(s) had passed their max_wait"]),
    ({**NOTHING, "repaired": 4}, False, ["queue check", "4 job record(s)"]),
    ({**NOTHING, "redelivered": 1}, False,
     ["queue check", "1 accepted async job(s) had lost their queue message"]),
], ids=["start-nothing", "start-requeued", "periodic-requeued-and-expired", "periodic-repaired",
        "periodic-redelivered"])
def test_the_summary_says_what_was_recovered(done, at_start, expected):
    line = summary(done, at_start=at_start)
    assert line is not None
    for words in expected:
        assert words in line


def test_a_quiet_periodic_pass_says_nothing():
    assert summary(NOTHING, at_start=False) is None


@pytest.mark.parametrize(("live", "unclaimed"), [
    ([b"queued", None, None], True),
    ([b"queued", None, b"0"], True),
    ([b"queued", b"host:1:ab", None], False),
    ([b"running", None, b"1"], False),
    ([b"queued", None, b"1"], False),
    ([None, None, None], False),
], ids=["never-claimed", "zero-attempts", "stands-in-a-line", "running", "claimed-before", "lost-state"])
def test_which_live_jobs_wait_for_their_first_claim(live, unclaimed):
    assert waits_for_first_claim(live) is unclaimed
