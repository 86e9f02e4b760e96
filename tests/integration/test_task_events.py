"""Task events with the worker's batching on (``workers/celery_tuning.py``): they still reach Celery's
event receivers — each task's in order, sent as ``task.multi`` batches — worker heartbeats are as
before, and a real Flower shows every task with its received/started/succeeded times.

Real processes throughout: the module's two ``celery worker`` processes, the API, ``llm-gateway
flower``; the test's own receiver is a kombu consumer bound to Celery's event exchange, as Flower's is.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from celery import Celery
from celery.events.event import get_exchange
from celery.events.state import State
from kombu import Queue

from common.settings import load_settings
from tests.integration.conftest import Api, Process, free_port, wait_until
from workers.celery_app import make_celery

pytestmark = pytest.mark.integration

JOBS = 8


@pytest.fixture(scope="module")
def events_app(gateway_env: dict[str, str]) -> Celery:
    """A Celery app on the module's broker (its key prefix included), to listen to the events."""
    return make_celery(load_settings(gateway_env))


def submit(api: Api, content: str) -> str:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": content}]}
    r = requests.post(f"{api.url}/v1/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def submit_all(api: Api) -> list[str]:
    return [submit(api, f"events {i}") for i in range(JOBS)]


def wait_succeeded(api: Api, job_ids: list[str]) -> None:
    def done() -> bool:
        return all(requests.get(f"{api.url}/v1/jobs/{job_id}", timeout=10).json()["status"] == "succeeded"
                   for job_id in job_ids)
    wait_until(done, 60, interval=0.2)


class Messages:
    """Every event message the broker fans out while listening: ``(routing key, body)``, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def on_message(self, body: Any, message: Any) -> None:
        self.seen.append((message.delivery_info["routing_key"], body))

    def events(self) -> list[dict[str, Any]]:
        """The events one by one, as Celery's receiver unpacks them (a list body is a batch)."""
        return [event for _, body in self.seen for event in (body if isinstance(body, list) else [body])]


def listen(app: Celery, until: Any, timeout: float = 60) -> Messages:
    """Bind a queue to the event exchange (kombu's Redis transport subscribes at the first drain), then
    call ``until(messages)`` between drains; stop when it returns true."""
    messages = Messages()
    with app.connection_for_read() as conn:
        exchange = get_exchange(conn, app.conf.event_exchange)
        queue = Queue(f"test-events-{secrets.token_hex(4)}", exchange=exchange, routing_key="#",
                      auto_delete=True, durable=False, exclusive=True)
        with conn.Consumer(queue, callbacks=[messages.on_message], accept=["json"], no_ack=True):
            deadline = time.monotonic() + timeout
            drain(conn)
            while not until(messages):
                assert time.monotonic() < deadline, f"events not seen in {timeout} s: {messages.seen}"
                drain(conn)
    return messages


def drain(conn: Any) -> None:
    try:
        conn.drain_events(timeout=0.5)
    except TimeoutError:
        pass


def test_each_tasks_events_arrive_in_order_in_batches_and_heartbeats_still_flow(api: Api,
                                                                                  events_app: Celery) -> None:
    job_ids: list[str] = []

    def all_seen(messages: Messages) -> bool:
        if not job_ids:   # listening already: submit
            job_ids.extend(submit_all(api))
        events = messages.events()
        succeeded = {e.get("uuid") for e in events if e["type"] == "task-succeeded"}
        beating = {e["hostname"] for e in events if e["type"] == "worker-heartbeat"}
        return succeeded >= set(job_ids) and len(beating) >= 2

    messages = listen(events_app, all_seen)
    events = messages.events()
    for job_id in job_ids:
        kinds = [e["type"] for e in events if e.get("uuid") == job_id]
        assert kinds == ["task-received", "task-started", "task-succeeded"], (job_id, kinds)
    task_messages = [(key, body) for key, body in messages.seen if key.startswith("task.")]
    assert {key for key, _ in task_messages} == {"task.multi"}
    assert all(isinstance(body, list) for _, body in task_messages)
    assert max(len(body) for _, body in task_messages) > 1, "no two events ever shared a message"
    assert {key for key, _ in messages.seen if not key.startswith("task.")} == {"worker.heartbeat"}

    state = State()   # Celery's own state machine, fed as its receiver (and Flower's) feeds it
    with events_app.connection_for_read() as conn:
        receiver = events_app.events.Receiver(conn, handlers={})
        for event in events:
            state.event(receiver.event_from_message(event)[1])
    for job_id in job_ids:
        task = state.tasks[job_id]
        assert task.state == "SUCCESS" and task.received and task.started and task.succeeded, job_id
    assert all(worker.alive for worker in state.workers.values()) and len(state.workers) == 2


@pytest.fixture(scope="module")
def flower(gateway_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``llm-gateway flower`` on a free port, its REST API open (only on loopback, for this test)."""
    port = free_port()
    env = {**gateway_env, "FLOWER_UNAUTHENTICATED_API": "true"}
    proc = Process(["flower", "--port", str(port)], env, tmp_path_factory.mktemp("flower") / "flower.log")
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.proc.poll() is None, proc.output()
        try:
            return requests.get(f"{url}/healthcheck", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False
    try:
        wait_until(up, 60, interval=0.2)
        yield url
    finally:
        proc.stop()


def flower_tasks(flower: str, job_ids: list[str]) -> dict[str, Any] | None:
    """Flower's view of the tasks (its REST API, fed by the same state as its task pages), once it shows
    every one of ``job_ids`` succeeded."""
    tasks = requests.get(f"{flower}/api/tasks", timeout=10).json()
    return tasks if all(tasks.get(job_id, {}).get("state") == "SUCCESS" for job_id in job_ids) else None


def test_flower_shows_every_task_received_started_and_succeeded(api: Api, flower: str) -> None:
    # Flower subscribes some time after it serves: a probe job every half second until it shows one
    # (a probe is seen a flush after it ran, so every probe sent so far counts, not just the last)
    probes = [submit(api, "is Flower listening yet?")]

    def listening() -> bool:
        tasks = requests.get(f"{flower}/api/tasks", timeout=10).json()
        if any(tasks.get(job_id, {}).get("state") == "SUCCESS" for job_id in probes):
            return True
        probes.append(submit(api, "and now?"))
        return False
    wait_until(listening, 60, interval=0.5)
    job_ids = submit_all(api)
    wait_succeeded(api, job_ids)
    wait_until(lambda: flower_tasks(flower, job_ids), 30, interval=0.3)
    tasks = flower_tasks(flower, job_ids)
    assert tasks is not None
    for job_id in job_ids:
        task = tasks[job_id]
        assert task["name"] == "gateway.run_job" and task["worker"], task
        assert task["received"] <= task["started"] <= task["succeeded"], task
    page = requests.get(f"{flower}/task/{job_ids[0]}", timeout=10)
    assert page.status_code == 200 and "SUCCESS" in page.text
