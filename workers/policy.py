"""What a worker does after an upstream call failed: a pure function of the error's class, how many
tries were made, how much time is left and whether another deployment could take the job
(``elsewhere_s``: when a job moved there would likely start; None: no usable alternative — the
alias's other deployments, then its fallbacks, ``common/routing``). Table-tested in
``tests/unit/test_policy.py``.

=====================================  ==========================================================
error                                  decision
=====================================  ==========================================================
UpstreamRateLimited (429)              ``MOVE`` if another deployment would start the job sooner
                                       than this one's Retry-After; else ``WAIT_IN_LINE`` (the
                                       provider cools down for every worker, the job goes back to
                                       the head of its line) while its deadline (the caller's
                                       max_wait) allows; else ``MOVE`` if it can; else ``FAIL``.
                                       Never a client 429 before max_wait.
UpstreamCredentialsRejected (401/403)  ``MOVE`` (the deployment is marked misconfigured: its breaker
                                       opens for ``misconfigured_open_s``); ``FAIL`` if nowhere to go
UpstreamStreamBroken                   ``FAIL``: chunks already went out, a retry would repeat them
UpstreamTimeout, UpstreamUnavailable   ``RETRY`` with jittered exponential backoff, up to the
(connect error, 5xx, a bad 200)        provider's ``max_retries`` and while the run's time limit
                                       allows; then ``MOVE`` to the next deployment / fallback;
                                       then ``FAIL``
anything else (UpstreamRejected        ``FAIL``: the same request would fail the same way anywhere;
400/404/422, ClientGone, ExceedsLimit) returned to the caller as is
=====================================  ==========================================================

A request too large for a deployment's context window never gets here: routing leaves that
deployment out before anything is called (``common/routing.candidates``).
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
    MOVE = "move"                    # re-queue the job on the next deployment (keeps id, caller, deadline)
    FAIL = "fail"                    # settle the job with this error


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float = 0.0


FAIL = Decision(Action.FAIL)
MOVE = Decision(Action.MOVE)


def decide(error: GatewayError, *, tries: int, max_retries: int, until_deadline_s: float,
           until_give_up_s: float, elsewhere_s: float | None = None, jitter: float = 1.0) -> Decision:
    """The next step after try number ``tries`` (1-based) on this deployment failed with ``error``.

    ``until_deadline_s``: time left before the job's deadline (what a 429 may wait for);
    ``until_give_up_s``: time left of the run's time limit (what retries of a failure may take);
    ``elsewhere_s``: when the job would start on the best other deployment (None: there is none;
    ``inf``: there is one, with no estimate); ``jitter`` in [0, 1]: scales a retry's backoff
    between half and all of it (the caller draws it; 1 = no jitter). A wait that would not end
    before its limit is not started."""
    can_move = elsewhere_s is not None
    if isinstance(error, UpstreamRateLimited):
        backoff = min(2.0 ** tries, MAX_RATE_LIMIT_WAIT_S)
        wait = error.retry_after if error.retry_after is not None else backoff
        if elsewhere_s is not None and elsewhere_s < wait:
            return MOVE
        if wait < until_deadline_s:
            return Decision(Action.WAIT_IN_LINE, wait)
        return MOVE if can_move else FAIL
    if isinstance(error, UpstreamCredentialsRejected):
        return MOVE if can_move else FAIL
    if isinstance(error, UpstreamStreamBroken):
        return FAIL
    if isinstance(error, UpstreamTimeout | UpstreamUnavailable):
        wait = min(0.25 * 2 ** (tries - 1), MAX_BACKOFF_S) * (0.5 + 0.5 * jitter)
        if tries <= max_retries and wait < until_give_up_s:
            return Decision(Action.RETRY, wait)
        return MOVE if can_move else FAIL
    return FAIL


def may_move(error: GatewayError, *, tries: int, max_retries: int) -> bool:
    """Whether :func:`decide` could answer ``MOVE`` for this failure (only then is it worth asking
    routing for an alternative: that reads Redis)."""
    if isinstance(error, UpstreamRateLimited | UpstreamCredentialsRejected):
        return True
    return isinstance(error, UpstreamTimeout | UpstreamUnavailable) and not isinstance(
        error, UpstreamStreamBroken) and tries > max_retries


def reached_upstream(error: GatewayError) -> bool:
    """Whether the upstream answered the failed call (then it leaves a usage row): it did unless the
    call timed out or never got an answer (5xx, connection refused) — but a rejected credential, or a
    200 that was no answer, came from the upstream."""
    if isinstance(error, UpstreamCredentialsRejected | UpstreamBadResponse):
        return True
    return not isinstance(error, UpstreamTimeout | UpstreamUnavailable)
