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
from common.routing.breaker import Verdict, verdict
from workers.policy import Action, Decision, decide, reached_upstream

RETRY, WAIT, FAIL, MOVE = Action.RETRY, Action.WAIT_IN_LINE, Action.FAIL, Action.MOVE

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
    ("credentials fail at once (nowhere to move)", UpstreamCredentialsRejected("401"), 1, 5, 30, 600,
     Decision(FAIL)),
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


INF = float("inf")
FAILOVER = [
    # (id, error, tries, max_retries, until deadline s, elsewhere_s (None: nowhere to go), jitter, decision)
    ("5xx retried here first even with somewhere to go", UpstreamUnavailable("500"), 1, 2, 30, 0.0, 1.0,
     Decision(RETRY, 0.25)),
    ("5xx jitter: half the backoff at 0", UpstreamUnavailable("500"), 2, 2, 30, None, 0.0,
     Decision(RETRY, 0.25)),
    ("5xx past max_retries moves", UpstreamUnavailable("500"), 3, 2, 30, INF, 1.0, Decision(MOVE)),
    ("timeout past max_retries moves", UpstreamTimeout("slow"), 2, 1, 30, 2.0, 1.0, Decision(MOVE)),
    ("bad 200 past max_retries moves", UpstreamBadResponse("empty"), 1, 0, 30, 0.0, 1.0, Decision(MOVE)),
    ("401 moves at once", UpstreamCredentialsRejected("401"), 1, 5, 30, 0.0, 1.0, Decision(MOVE)),
    ("401 with nowhere to go fails", UpstreamCredentialsRejected("401"), 1, 5, 30, None, 1.0, Decision(FAIL)),
    ("429: moves where it starts sooner", UpstreamRateLimited("429", retry_after=5), 1, 0, 30, 0.5, 1.0,
     Decision(MOVE)),
    ("429: waits when elsewhere is later", UpstreamRateLimited("429", retry_after=2), 1, 0, 30, 9.0, 1.0,
     Decision(WAIT, 2)),
    ("429: past max_wait moves rather than fail", UpstreamRateLimited("429", retry_after=50), 1, 0, 30, 60.0,
     1.0, Decision(MOVE)),
    ("422 is returned as is, never moved", UpstreamRejected("bad", status=422), 1, 5, 30, 0.0, 1.0,
     Decision(FAIL)),
    ("404 is returned as is", UpstreamRejected("no model", status=404), 1, 5, 30, 0.0, 1.0, Decision(FAIL)),
    ("a broken stream never moves", UpstreamStreamBroken("cut"), 1, 5, 30, 0.0, 1.0, Decision(FAIL)),
]


@pytest.mark.parametrize(
    ("error", "tries", "max_retries", "until_deadline", "elsewhere", "jitter", "expected"),
    [c[1:] for c in FAILOVER], ids=[c[0] for c in FAILOVER])
def test_failover_decisions(error, tries, max_retries, until_deadline, elsewhere, jitter, expected):
    assert decide(error, tries=tries, max_retries=max_retries, until_deadline_s=until_deadline,
                  until_give_up_s=600, elsewhere_s=elsewhere, jitter=jitter) == expected


VERDICTS = [
    ("success", None, Verdict.OK),
    ("5xx / refused is a failure", UpstreamUnavailable("500"), Verdict.FAIL),
    ("timeout is a failure", UpstreamTimeout("slow"), Verdict.FAIL),
    ("bad 200 is a failure", UpstreamBadResponse("empty"), Verdict.FAIL),
    ("401/403 marks it misconfigured", UpstreamCredentialsRejected("401"), Verdict.MISCONFIGURED),
    ("429 says nothing about health", UpstreamRateLimited("429"), Verdict.NEUTRAL),
    ("a 4xx about the request: it is alive", UpstreamRejected("bad", status=400), Verdict.OK),
    ("the caller left: not the upstream's fault", ClientGone("gone"), Verdict.NEUTRAL),
]


@pytest.mark.parametrize(("error", "expected"), [c[1:] for c in VERDICTS], ids=[c[0] for c in VERDICTS])
def test_what_a_call_says_about_its_deployment(error, expected):
    assert verdict(error) is expected


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
