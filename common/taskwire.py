"""The one message the API puts on a provider queue: "run job <id>", in Celery's own wire format.

Both sides need it: the API enqueues it (inside the Lua script that records the job, so enqueueing
costs no extra round trip — Celery's ``send_task`` took ~2 ms of Python per call here), and the
workers' Celery consumes it.
"""

from __future__ import annotations

import base64
import json
import socket
import uuid

TASK_NAME = "gateway.run_job"


_ORIGIN = f"gateway@{socket.gethostname()}"
_EMBED = json.dumps({"callbacks": None, "errbacks": None, "chain": None, "chord": None})

def task_message(job_id: str, queue: str) -> str:
    """The broker message ``send_task(TASK_NAME, args=[job_id], queue=queue)`` would push, built here
    so the API can enqueue it in the same Redis round trip that records the job.

    It is Celery's task protocol v2 inside kombu's Redis envelope (kombu.transport.redis: the list
    named after the queue holds these JSON documents); ``tests/unit/test_celery_wire.py`` checks it
    against what ``send_task`` itself produces, so a Celery upgrade that changes it fails loudly."""
    body = base64.b64encode(f'[["{job_id}"], {{}}, {_EMBED}]'.encode()).decode()
    return json.dumps({
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": TASK_NAME, "id": job_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": job_id,
            "parent_id": None, "argsrepr": f"['{job_id}']", "kwargsrepr": "{}", "origin": _ORIGIN,
            "ignore_result": True, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        },
        "properties": {
            "correlation_id": job_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    })
