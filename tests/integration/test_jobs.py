"""Async jobs: accepted durably, observable, cancellable, surviving API restarts and worker crashes."""

from __future__ import annotations

import pytest
import requests

from tests.integration.conftest import VISIBILITY_TIMEOUT, wait_until

pytestmark = pytest.mark.integration


def submit(api, content: str, model: str = "fake-model", **extra) -> dict:
    r = requests.post(f"{api.url}/v1/jobs",
                      json={"model": model, "messages": [{"role": "user", "content": content}], **extra})
    assert r.status_code == 202, r.text
    return r.json()


def get(api, job_id: str) -> dict:
    r = requests.get(f"{api.url}/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_for_status(api, job_id: str, status: str, timeout: float = 20) -> dict:
    wait_until(lambda: get(api, job_id)["status"] == status, timeout)
    return get(api, job_id)


def test_job_lifecycle_from_202_to_result(api, fake, db):
    accepted = submit(api, "async hello")
    assert accepted["status"] == "queued" and accepted["id"].startswith("job_")
    assert accepted["urls"]["self"] == f"/v1/jobs/{accepted['id']}"
    job = wait_for_status(api, accepted["id"], "succeeded")
    assert job["result"]["object"] == "chat.completion"
    assert job["result"]["choices"][0]["message"]["content"] == "echo: async hello"
    assert job["usage"]["prompt_tokens"] == 2 and job["usage"]["completion_tokens"] == 3
    assert list(job["timestamps"]) == ["queued", "running", "succeeded"]
    assert job["timestamps"]["queued"] <= job["timestamps"]["running"] <= job["timestamps"]["succeeded"]
    assert job["attempts"] == 1 and job["error"] is None
    rows = db.execute("SELECT outcome FROM usage WHERE job_id = %s", (accepted["id"],)).fetchall()
    assert rows == [("success",)]


def test_failed_job_carries_the_error(api, fake):
    accepted = submit(api, "status:400 bad")
    job = wait_for_status(api, accepted["id"], "failed")
    assert job["error"]["status"] == 400 and job["result"] is None


def test_unknown_job_is_404_and_bad_jobs_are_400(api):
    r = requests.get(f"{api.url}/v1/jobs/job_doesnotexist")
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    r = requests.post(f"{api.url}/v1/jobs", json={"model": "fake-model"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = requests.post(f"{api.url}/v1/jobs", json={"model": "fake-model", "stream": True,
                                                   "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_cancelled_job_never_runs(api, fake, start_worker):
    accepted = submit(api, "cancel me", model="stalled-model")
    r = requests.delete(f"{api.url}/v1/jobs/{accepted['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert "cancelled" in r.json()["timestamps"]
    again = requests.delete(f"{api.url}/v1/jobs/{accepted['id']}")
    assert again.status_code == 409
    worker = start_worker("stalled")
    wait_until(lambda: accepted["id"] in worker.finished_tasks(), 15)  # its message was taken and dropped
    assert get(api, accepted["id"])["status"] == "cancelled"
    assert fake.stats()["by_content"].get("cancel me") is None


def test_running_job_cannot_be_cancelled(api, fake):
    accepted = submit(api, "sleep:2 busy")
    wait_until(lambda: fake.stats()["in_flight"] == 1, 10)
    r = requests.delete(f"{api.url}/v1/jobs/{accepted['id']}")
    assert r.status_code == 409 and "running" in r.json()["error"]["message"]
    wait_for_status(api, accepted["id"], "succeeded")


def test_job_survives_an_api_restart(api, fake):
    accepted = submit(api, "sleep:1.5 outlive the api")
    api.restart()
    job = wait_for_status(api, accepted["id"], "succeeded")
    assert job["result"]["choices"][0]["message"]["content"] == "echo: sleep:1.5 outlive the api"


def test_worker_killed_mid_call_job_completes_once_with_one_usage_row(api, fake, start_worker, db):
    first = start_worker("crashy", "crash1")
    accepted = submit(api, "sleep:3 survive a crash", model="crashy-model")
    wait_until(lambda: fake.stats()["in_flight"] == 1, 15)
    first.kill()  # SIGKILL mid-call: the message is unacked, the job's lease stops being renewed

    second = start_worker("crashy", "crash2")
    # redelivered after the visibility timeout, taken over once the dead worker's lease lapsed
    job = wait_for_status(api, accepted["id"], "succeeded", timeout=VISIBILITY_TIMEOUT * 4)
    assert job["attempts"] == 2
    assert job["result"]["choices"][0]["message"]["content"] == "echo: sleep:3 survive a crash"
    # the killed call + the one that finished
    assert fake.stats()["by_content"]["sleep:3 survive a crash"] == 2
    wait_until(lambda: accepted["id"] in second.finished_tasks(), 10)  # nothing will write for it any more
    # the answer billed once; the killed attempt recorded (its call may have cost money) but not billed
    def rows() -> list[tuple[str, str]]:
        return db.execute("SELECT call_id, outcome FROM usage WHERE job_id = %s ORDER BY call_id",
                          (accepted["id"],)).fetchall()
    wait_until(lambda: len(rows()) == 2, 15)
    assert rows() == [(f"{accepted['id']}:1:lost", "attempt_lost"), (f"{accepted['id']}:2:1", "success")]
