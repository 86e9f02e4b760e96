"""What a worker does after an upstream call failed: a pure function of the error's class, how many
tries were made and how much time is left. Table-tested in ``tests/unit/test_policy.py``.

=====================================  ==========================================================
error                                  decision
=====================================  ==========================================================
UpstreamRateLimited (429)              ``WAIT_IN_LINE``: the provider cools down for every worker
                                       and the job goes back to the head of its line, while its
                                       deadline (the caller's max_wait) allows the wait
UpstreamCredentialsRejected (401/403)  ``FAIL`` at once: retrying cannot fix the operator's key
UpstreamStreamBroken                   ``FAIL``: chunks already went out, a retry would repeat them
UpstreamTimeout, UpstreamUnavailable   ``RETRY`` with exponential backoff, up to the provider's
(5xx, refused, a bad 200)              ``max_retries`` and while the run's time limit allows
anything else (UpstreamRejected 4xx,   ``FAIL``: the same request would fail the same way; the
ClientGone, ExceedsLimit, ...)         caller's own errors are never retried
=====================================  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from common.errors import (
    GatewayError,
    UpstreamBadResponse,
    UpstreamCredentialsRejected,
    UpstreamRateLimited,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)

MAX_BACKOFF_S = 5.0          # between retries of a 5xx / timeout
MAX_RATE_LIMIT_WAIT_S = 30.0  # the wait after a 429 that gave no Retry-After, at most


class Action(Enum):
    RETRY = "retry"                  # call again after ``delay_s``
    WAIT_IN_LINE = "wait_in_line"    # back to the head of the line (after ``delay_s``), then call again
    FAIL = "fail"                    # settle the job with this error


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float = 0.0


FAIL = Decision(Action.FAIL)


def decide(error: GatewayError, *, tries: int, max_retries: int, until_deadline_s: float,
           until_give_up_s: float) -> Decision:
    """The next step after try number ``tries`` (1-based) failed with ``error``.

    ``until_deadline_s``: time left before the job's deadline (what a 429 may wait for);
    ``until_give_up_s``: time left of the run's time limit (what retries of a failure may take).
    A wait that would not end before its limit is not started: the job fails now."""
    if isinstance(error, UpstreamRateLimited):
        backoff = min(2.0 ** tries, MAX_RATE_LIMIT_WAIT_S)
        wait = error.retry_after if error.retry_after is not None else backoff
        return Decision(Action.WAIT_IN_LINE, wait) if wait < until_deadline_s else FAIL
    if isinstance(error, UpstreamCredentialsRejected | UpstreamStreamBroken):
        return FAIL
    if isinstance(error, UpstreamTimeout | UpstreamUnavailable):
        if tries > max_retries:
            return FAIL
        wait = min(0.25 * 2 ** (tries - 1), MAX_BACKOFF_S)
        return Decision(Action.RETRY, wait) if wait < until_give_up_s else FAIL
    return FAIL


def reached_upstream(error: GatewayError) -> bool:
    """Whether the upstream answered the failed call (then it leaves a usage row): it did unless the
    call timed out or never got an answer (5xx, connection refused) — but a rejected credential, or a
    200 that was no answer, came from the upstream."""
    if isinstance(error, UpstreamCredentialsRejected | UpstreamBadResponse):
        return True
    return not isinstance(error, UpstreamTimeout | UpstreamUnavailable)
