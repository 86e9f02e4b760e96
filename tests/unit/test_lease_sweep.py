"""The lease sweeper's per-delivery decision (workers/leases.py): which unacked messages go back on
their queue at once, which are leftovers, which are left to their live holder."""

from __future__ import annotations

import json

import pytest

from common.contract import JobState
from common.taskwire import TASK_NAME, task_message
from workers.leases import Delivery, Verdict, job_id_of, verdict

KEEP, RESTORE, REMOVE = Verdict.KEEP, Verdict.RESTORE, Verdict.REMOVE
Q, R = JobState.QUEUED, JobState.RUNNING

CASES = [
    # (id, job state, lease alive, holder alive (None: none recorded), verdict)
    ("running, lease alive", R, True, True, KEEP),
    ("running, lease alive, holder's heartbeat late", R, True, False, KEEP),
    ("running, lease lapsed, holder dead", R, False, False, RESTORE),
    ("running, lease lapsed, no holder recorded", R, False, None, RESTORE),
    ("running, lease lapsed, holder alive (redelivered, waiting in line)", R, False, True, KEEP),
    ("queued in a line, holder alive", Q, False, True, KEEP),
    ("queued in a line, holder dead", Q, False, False, RESTORE),
    ("queued, its worker died before claiming it", Q, False, None, RESTORE),
    ("succeeded: a leftover (died between settle and ack)", JobState.SUCCEEDED, False, True, REMOVE),
    ("failed: a leftover", JobState.FAILED, False, False, REMOVE),
    ("cancelled: a leftover", JobState.CANCELLED, False, None, REMOVE),
    ("expired: a leftover", JobState.EXPIRED, False, None, REMOVE),
    ("unknown job (a sync job's state expired)", None, False, None, REMOVE),
]


@pytest.mark.parametrize(("state", "lease", "holder_alive", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_verdict(state, lease, holder_alive, expected):
    assert verdict(Delivery(state, lease, holder_alive)) is expected


def _unacked(message: dict | str) -> str:
    """An ``unacked`` hash entry as kombu writes it: [message, exchange, routing_key]."""
    return json.dumps([message, "", "llm.fake"])


OUR_MESSAGE = json.loads(task_message("job_abc", "llm.fake"))
ENTRIES = [
    ("our task message", _unacked(OUR_MESSAGE), "job_abc"),
    ("bytes", _unacked(OUR_MESSAGE).encode(), "job_abc"),
    ("another task", _unacked({**OUR_MESSAGE, "headers": {**OUR_MESSAGE["headers"], "task": "other"}}), None),
    ("no id", _unacked({**OUR_MESSAGE, "headers": {"task": TASK_NAME}}), None),
    ("no headers", _unacked({"body": "x"}), None),
    ("not JSON", "{not json", None),
    ("not a list", json.dumps({"a": 1}), None),
    ("gone (acked meanwhile)", None, None),
]


@pytest.mark.parametrize(("raw", "expected"), [e[1:] for e in ENTRIES], ids=[e[0] for e in ENTRIES])
def test_job_id_of_unacked_entry(raw, expected):
    assert job_id_of(raw) == expected
