"""The runner's retry policy (workers/policy.py): what happens after an upstream call failed."""

from __future__ import annotations

import pytest

from common.errors import (
    ClientGone,
    ExceedsLimit,
    UpstreamBadResponse,
    UpstreamCredentialsRejected,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from workers.policy import Action, Decision, decide, reached_upstream

RETRY, WAIT, FAIL = Action.RETRY, Action.WAIT_IN_LINE, Action.FAIL

CASES = [
    # (id, error, tries, max_retries, until deadline s, until give-up s, decision)
    ("5xx first try: backoff 0.25 s", UpstreamUnavailable("500"), 1, 2, 30, 600, Decision(RETRY, 0.25)),
    ("5xx second try: backoff doubles", UpstreamUnavailable("500"), 2, 2, 30, 600, Decision(RETRY, 0.5)),
    ("5xx past max_retries fails", UpstreamUnavailable("500"), 3, 2, 30, 600, Decision(FAIL)),
    ("backoff is capped", UpstreamTimeout("slow"), 9, 20, 30, 600, Decision(RETRY, 5.0)),
    ("timeout retried like a 5xx", UpstreamTimeout("slow"), 1, 1, 30, 600, Decision(RETRY, 0.25)),
    ("no retry past the run's time limit", UpstreamTimeout("slow"), 1, 3, 30, 0.1, Decision(FAIL)),
    ("a 5xx ignores the caller's deadline", UpstreamUnavailable("500"), 1, 3, 0, 600, Decision(RETRY, 0.25)),
    ("bad 200 retried like a 5xx", UpstreamBadResponse("no choices"), 1, 1, 30, 600, Decision(RETRY, 0.25)),
    ("credentials fail at once", UpstreamCredentialsRejected("401"), 1, 5, 30, 600, Decision(FAIL)),
    ("a broken stream is never retried", UpstreamStreamBroken("cut"), 1, 5, 30, 600, Decision(FAIL)),
    ("429 waits in line its Retry-After", UpstreamRateLimited("429", retry_after=3), 1, 0, 30, 600,
     Decision(WAIT, 3)),
    ("429 ignores max_retries", UpstreamRateLimited("429", retry_after=1), 50, 0, 30, 600, Decision(WAIT, 1)),
    ("429 without Retry-After: 2^tries", UpstreamRateLimited("429"), 2, 0, 30, 600, Decision(WAIT, 4.0)),
    ("429 without Retry-After: capped", UpstreamRateLimited("429"), 8, 0, 60, 600, Decision(WAIT, 30.0)),
    ("429 past the caller's deadline fails", UpstreamRateLimited("429", retry_after=5), 1, 0, 4, 600,
     Decision(FAIL)),
    ("upstream 4xx fails", UpstreamRejected("bad param", status=422), 1, 5, 30, 600, Decision(FAIL)),
    ("the caller left", ClientGone("gone"), 1, 5, 30, 600, Decision(FAIL)),
    ("larger than a limit", ExceedsLimit("too big"), 1, 5, 30, 600, Decision(FAIL)),
]


@pytest.mark.parametrize(("error", "tries", "max_retries", "until_deadline", "until_give_up", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(error, tries, max_retries, until_deadline, until_give_up, expected):
    assert decide(error, tries=tries, max_retries=max_retries, until_deadline_s=until_deadline,
                  until_give_up_s=until_give_up) == expected


REACHED = [
    ("429 answered", UpstreamRateLimited("429"), True),
    ("4xx answered", UpstreamRejected("bad"), True),
    ("credentials answered", UpstreamCredentialsRejected("401"), True),
    ("bad 200 answered", UpstreamBadResponse("empty"), True),
    ("5xx / refused: no answer", UpstreamUnavailable("500"), False),
    ("timeout: no answer", UpstreamTimeout("slow"), False),
]


@pytest.mark.parametrize(("error", "expected"), [c[1:] for c in REACHED], ids=[c[0] for c in REACHED])
def test_which_failed_calls_leave_a_usage_row(error, expected):
    assert reached_upstream(error) is expected
