"""Crashes (issue 9.1/9.2): a dead worker's jobs come back in seconds, and a job whose caller can no
longer use it never runs (again).

This module runs with a visibility timeout of an hour, as production does: every redelivery seen
here is the lease sweeper's (workers/leases.py), not the broker's last resort.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from common.contract import JobSpec, Kind, Mode, Start
from common.jobs import JobStore, new_job_id
from common.taskwire import task_message
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import Api, Process, WorkerFactory, stop_all, wait_until
from workers.usage import ATTEMPT_LOST

pytestmark = pytest.mark.integration

RECOVERY_S = 30   # issue 9: a SIGKILLed worker's jobs are served again within this


@pytest.fixture(scope="module")
def gateway_env(gateway_env: dict[str, str]) -> dict[str, str]:
    return {**gateway_env, "GATEWAY_VISIBILITY_TIMEOUT": "3600"}


@pytest.fixture(scope="module")
def client() -> redis.Redis:
    return redis.Redis.from_url(TEST_REDIS_URL)


def chat(model: str, content: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def submit(api, model: str, content: str) -> str:
    r = requests.post(f"{api.url}/v1/jobs", json=chat(model, content))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def status(api, job_id: str) -> str:
    return requests.get(f"{api.url}/v1/jobs/{job_id}").json()["status"]


def usage(db, job_id: str) -> list[tuple[str, str]]:
    return db.execute("SELECT call_id, outcome FROM usage WHERE job_id = %s ORDER BY call_id",
                      (job_id,)).fetchall()


def jobs_with(client: redis.Redis, prefix: str, marker: str) -> dict[str, dict[bytes, bytes]]:
    """Job id → job hash of the live jobs whose request holds ``marker``."""
    found = {}
    for key in client.scan_iter(f"{prefix}:job:*", count=1000):
        if key.count(b":") == 2:
            job = client.hgetall(key)
            if marker.encode() in job.get(b"spec", b""):
                found[key.decode().rsplit(":", 1)[1]] = job
    return found


def start(factory: WorkerFactory, *specs: tuple[str, str]):
    return factory.start_many(list(specs))


def test_a_killed_workers_jobs_are_served_again_within_seconds(api, fake, worker_factory, db):
    """Async and sync jobs mid-call, and a job waiting in a limited provider's line: after a SIGKILL,
    a second worker serves them all; each upstream answer is billed once and each lost attempt has
    its ``attempt_lost`` row."""
    first = start(worker_factory, ("crashy", "doomed"), ("leasy", "doomed-line"))
    second: list = []
    try:
        async_ids = [submit(api, "crashy-model", f"sleep:2 async {n}") for n in range(4)]
        # leasy allows one call at a time: the second job waits in its worker's line (queued)
        line_ids = [submit(api, "leasy-model", f"sleep:2 line {n}") for n in range(2)]
        with ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(requests.post, f"{api.url}/v1/chat/completions", timeout=90,
                                 headers={"x-gateway-max-wait": "60"},
                                 json=chat("crashy-model", f"sleep:2 sync {n}")) for n in range(4)]
            wait_until(lambda: fake.stats()["in_flight"] == 9, 20)   # 4 async + 4 sync + the line's head
            killed_at = time.monotonic()
            for proc in first:
                proc.kill(signal.SIGKILL)
            second = start(worker_factory, ("crashy", "heir"), ("leasy", "heir-line"))
            wait_until(lambda: all(status(api, j) == "succeeded" for j in async_ids + line_ids), RECOVERY_S)
            recovered_s = time.monotonic() - killed_at
            answers = [call.result() for call in calls]
        assert recovered_s <= RECOVERY_S
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        sync_ids = [r.headers["x-gateway-job-id"] for r in answers]
        assert [r.json()["choices"][0]["message"]["content"] for r in answers] == [
            f"echo: sleep:2 sync {n}" for n in range(4)]
        by_content = fake.stats()["by_content"]
        for n in range(4):   # the killed call and the one that answered
            assert by_content[f"sleep:2 async {n}"] == by_content[f"sleep:2 sync {n}"] == 2
        assert sorted(by_content[f"sleep:2 line {n}"] for n in range(2)) == [1, 2]

        def billed() -> bool:
            return (all(len(usage(db, j)) == 2 for j in async_ids + sync_ids)
                    and sum(len(usage(db, j)) for j in line_ids) == 3)
        wait_until(billed, 15)
        for job_id in async_ids + sync_ids:
            assert usage(db, job_id) == [(f"{job_id}:1:lost", ATTEMPT_LOST), (f"{job_id}:2:1", "success")]
        rows = sorted(usage(db, line_ids[0]) + usage(db, line_ids[1]))
        outcomes = sorted(outcome for _, outcome in rows)
        # the line's head lost an attempt; the job waiting behind it had none to lose
        assert outcomes == [ATTEMPT_LOST, "success", "success"], rows
    finally:
        stop_all(first + second)


def test_a_caller_that_left_is_never_run_again_after_its_worker_dies(api, fake, worker_factory, db,
                                                                     client, prefix):
    """A streamed caller disconnects while its call runs upstream; then the worker dies. The job's
    message comes back, and the next worker settles it ``cancelled`` instead of calling again."""
    first = start(worker_factory, ("crashy", "doomed-stream"))
    second: list = []
    try:
        response = requests.post(f"{api.url}/v1/chat/completions", stream=True, timeout=30,
                                 json=chat("crashy-model", "sleep:40 caller leaves", stream=True))
        job_id = response.headers["x-gateway-job-id"]   # the stream committed (HOLD_S): the call runs
        wait_until(lambda: fake.stats()["in_flight"] == 1, 10)
        response.close()   # the caller leaves; the API notices at its next keep-alive write
        wait_until(lambda: client.hget(f"{prefix}:job:{job_id}", "abandoned") == b"1", 30)
        first[0].kill(signal.SIGKILL)
        second = start(worker_factory, ("crashy", "heir-stream"))
        wait_until(lambda: client.hget(f"{prefix}:job:{job_id}", "state") == b"cancelled", RECOVERY_S)
        wait_until(lambda: job_id in second[0].finished_tasks(), 10)
        assert fake.stats()["by_content"]["sleep:40 caller leaves"] == 1   # never called again
        wait_until(lambda: usage(db, job_id) == [(f"{job_id}:1:lost", ATTEMPT_LOST)], 15)
    finally:
        stop_all(first + second)


def test_a_queued_call_withdrawn_at_its_max_wait_never_runs(api, fake, worker_factory, client, prefix):
    r = requests.post(f"{api.url}/v1/chat/completions", headers={"x-gateway-max-wait": "1"},
                      json=chat("stalled-model", "too late to run"))
    assert r.status_code == 429, r.text
    [job_id] = jobs_with(client, prefix, "too late to run")
    workers = start(worker_factory, ("stalled", "late"))
    try:
        wait_until(lambda: job_id in workers[0].finished_tasks(), 15)
    finally:
        stop_all(workers)
    assert client.hget(f"{prefix}:job:{job_id}", "state") == b"expired"
    assert "too late to run" not in fake.stats()["by_content"]


def test_sync_jobs_of_a_dead_api_process_are_cancelled_not_run(gateway_env, fake, worker_factory, client,
                                                              prefix, tmp_path_factory):
    """The API is SIGKILLed while its callers' jobs wait for the (stalled) provider: their callers are
    gone with it, so the worker that finally takes them settles them ``cancelled`` and never calls."""
    doomed = Api(gateway_env, tmp_path_factory.mktemp("doomed-api") / "api.log").start()
    with ThreadPoolExecutor(5) as pool:
        for n in range(5):
            pool.submit(requests.post, f"{doomed.url}/v1/chat/completions", timeout=60,
                        headers={"x-gateway-max-wait": "60"}, json=chat("stalled-model", f"orphan {n}"))
        wait_until(lambda: len(jobs_with(client, prefix, "orphan ")) == 5, 10)
        doomed.kill()
    jobs = jobs_with(client, prefix, "orphan ")
    [alive_key] = {job[b"reply_to"] + b":alive" for job in jobs.values()}
    wait_until(lambda: not client.exists(alive_key), 30)   # the dead process's heartbeat lapsed
    workers = start(worker_factory, ("stalled", "after-api"))
    try:
        wait_until(lambda: all(client.hget(f"{prefix}:job:{j}", "state") == b"cancelled" for j in jobs), 20)
    finally:
        stop_all(workers)
    assert not any(content.startswith("orphan ") for content in fake.stats()["by_content"])



def test_a_delivery_that_finds_the_lease_alive_waits_it_out(fake, worker_factory, db, client, prefix):
    """A message can come back while its job's lease still lives (a worker's cold shutdown restores its
    messages at once). The worker that takes it must not ack it as ``busy`` — that would leave the job
    ``running`` for ever — but wait the dead holder's lease out and run the job as the next attempt."""
    store = JobStore(client, prefix)
    job_id = new_job_id()
    request = {"model": "crashy-model", "messages": [{"role": "user", "content": "outlive the lease"}]}
    store.create(job_id, JobSpec(Mode.SYNC, Kind.CHAT, "crashy-model", "crashy", request), max_wait=30,
                 reply_to="", ttl=120)
    workers = start(worker_factory, ("crashy", "patient"))
    try:
        assert store.claim(job_id, "dead-holder", 4.0).outcome is Start.RUN   # a holder that then died
        client.lpush(f"{prefix}:llm.crashy", task_message(job_id, "llm.crashy"))
        wait_until(lambda: client.hget(store.job_key(job_id), "state") == b"succeeded", 20)
    finally:
        stop_all(workers)
    assert client.hget(store.job_key(job_id), "attempts") == b"2"
    assert fake.stats()["by_content"]["outlive the lease"] == 1
    billed = [(f"{job_id}:1:lost", ATTEMPT_LOST), (f"{job_id}:2:1", "success")]
    wait_until(lambda: usage(db, job_id) == billed, 15)


def start_reserving(factory: WorkerFactory, name: str) -> Process:
    """A real ``celery worker`` on ``llm.crashy`` with one pool slot that reserves two messages
    (``--prefetch-multiplier 2``): while its slot runs a call, the next job is delivered to it (in
    kombu's ``unacked``) but not started — not claimed, no ``holder`` in its job hash. That is the
    window a worker can die in between reserving a job and claiming it, held open on purpose."""
    argv = ["-A", "workers.worker:app", "worker", "--queues", "llm.crashy", "--pool", "gevent",
            "--concurrency", "1", "--prefetch-multiplier", "2", "--hostname", f"crashy-{name}@%h",
            "--without-mingle", "--without-gossip", "--loglevel", "info"]
    log = factory.logs / f"worker-{name}.log"
    return factory.wait_ready(Process(argv, factory.env, log, module="celery"))


def reserve_two(api, fake, client: redis.Redis, prefix: str, first: str, second: str) -> tuple[str, str]:
    """Submit ``first`` (it runs) then ``second`` (it is only reserved); return both job ids once the
    reserving worker holds ``second``'s message unclaimed."""
    running = submit(api, "crashy-model", first)
    wait_until(lambda: fake.stats()["in_flight"] == 1, 10)
    reserved = submit(api, "crashy-model", second)

    def held_unclaimed() -> bool:
        unacked = client.hvals(f"{prefix}:unacked")
        job = client.hgetall(f"{prefix}:job:{reserved}")
        return (any(reserved.encode() in entry for entry in unacked)
                and job.get(b"state") == b"queued" and b"holder" not in job)
    wait_until(held_unclaimed, 10)
    return running, reserved


def test_a_job_reserved_by_a_worker_that_died_before_claiming_it_is_served_promptly(
        api, fake, worker_factory, client, prefix, db):
    """The worker dies between reserving a job and claiming it (no ``holder`` names it yet): the lease
    sweeper of another worker puts it back once it is older than its grace, and it runs once — not
    after the broker's visibility timeout (an hour here)."""
    reserver = start_reserving(worker_factory, "dies-reserving")
    heirs: list = []
    try:
        running, reserved = reserve_two(api, fake, client, prefix, "sleep:4 held by the slot",
                                        "reserved, never claimed")
        reserver.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        heirs = start(worker_factory, ("crashy", "heir-reserved"))
        wait_until(lambda: status(api, reserved) == "succeeded", RECOVERY_S)
        served_s = time.monotonic() - killed_at
        wait_until(lambda: status(api, running) == "succeeded", RECOVERY_S)   # it lost an attempt: runs again
    finally:
        stop_all([reserver, *heirs])
    # the heir's start-up (~5 s) + the sweeper's grace (5 s) and interval (2 s), with slack
    assert served_s < 20, served_s
    assert fake.stats()["by_content"]["reserved, never claimed"] == 1
    assert client.hget(f"{prefix}:job:{reserved}", "attempts") == b"1"
    wait_until(lambda: usage(db, reserved) == [(f"{reserved}:1:1", "success")], 15)


def test_a_slow_but_alive_worker_never_runs_a_job_it_reserved_after_another_served_it(
        api, fake, worker_factory, client, prefix):
    """A live worker that holds a reserved job unclaimed past the sweeper's grace loses it to a worker
    with a free slot; when the slow worker finally reaches its old delivery, the claim tells it the job
    is done and it never calls the upstream for it."""
    reserver = start_reserving(worker_factory, "slow-reserving")
    heirs: list = []
    try:
        running, reserved = reserve_two(api, fake, client, prefix, "sleep:20 keeps the slot busy",
                                        "reserved by a slow worker")
        heirs = start(worker_factory, ("crashy", "free-slot"))
        wait_until(lambda: status(api, reserved) == "succeeded", 15)
        assert status(api, running) == "running"   # served while the slow worker was still busy
        wait_until(lambda: reserved in reserver.finished_tasks(), 30)   # it reached its old delivery
        assert status(api, running) == "succeeded"
    finally:
        stop_all([reserver, *heirs])
    assert fake.stats()["by_content"]["reserved by a slow worker"] == 1
    assert client.hget(f"{prefix}:job:{reserved}", "attempts") == b"1"
