"""The message the API enqueues itself must be the one Celery's own send_task would have sent."""

import base64
import json

from kombu import Connection

from common.taskwire import TASK_NAME, task_message


def _sent_by_celery(job_id: str, queue: str) -> dict:
    from celery import Celery

    app = Celery("wire", set_as_current=False)
    app.conf.update(broker_url="memory://", task_ignore_result=True)
    with Connection("memory://") as conn:
        app.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=queue, connection=conn)
        raw = conn.default_channel._get(queue)  # type: ignore[attr-defined]
    return raw if isinstance(raw, dict) else json.loads(raw)


def test_task_message_matches_send_task():
    ours = json.loads(task_message("job_abc", "llm.fake"))
    theirs = _sent_by_celery("job_abc", "llm.fake")
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(base64.b64decode(theirs["body"]))
    assert set(ours["headers"]) == set(theirs["headers"])
    for key in ("task", "id", "root_id", "argsrepr", "kwargsrepr", "retries", "timelimit", "lang"):
        assert ours["headers"][key] == theirs["headers"][key], key
    assert ours["properties"]["delivery_info"]["routing_key"] == "llm.fake"
    assert set(ours["properties"]) >= {"correlation_id", "delivery_info", "delivery_tag", "body_encoding"}
