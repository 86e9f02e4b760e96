"""Stopping gracefully (issue 10.3): SIGTERM or Ctrl-C stops admitting, lets running calls finish up
to the drain time (``GATEWAY_DRAIN_TIMEOUT``, 4 s in this module), hands jobs waiting in a line back
to the queue, and answers held callers — nothing lost, nothing run twice, no dropped connection.

Real processes throughout: ``celery worker`` processes and the API under gunicorn, signalled as an
operator's terminal, docker or Kubernetes would.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from launcher.supervisor import STOP_MARGIN_S
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import Api, stop_all, wait_until
from tests.integration.test_crashes import jobs_with, usage
from tests.integration.uprun import Up
from workers.usage import ATTEMPT_LOST

pytestmark = pytest.mark.integration

DRAIN_S = 4.0


@pytest.fixture(scope="module")
def gateway_env(gateway_env: dict[str, str]) -> dict[str, str]:
    return {**gateway_env, "GATEWAY_DRAIN_TIMEOUT": str(DRAIN_S), "GATEWAY_VISIBILITY_TIMEOUT": "3600"}


@pytest.fixture(scope="module")
def client() -> redis.Redis:
    return redis.Redis.from_url(TEST_REDIS_URL)


def call(api: Api, model: str, content: str, path: str = "/v1/chat/completions") -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    if path == "/v1/messages":
        body["max_tokens"] = 50
    if path == "/api/chat":
        body["stream"] = False
    return requests.post(f"{api.url}{path}", json=body, headers={"x-gateway-max-wait": "60"}, timeout=90)


def test_a_stopping_worker_finishes_its_call_and_hands_its_line_back(api, fake, worker_factory, client,
                                                                      prefix):
    """``leasy`` runs one call at a time: one job runs, three wait in the worker's line. SIGTERM: the
    running call finishes and is answered; the three go back on the queue at once and the next
    worker serves them; every call reaches the upstream once; the worker exits within the drain."""
    first = worker_factory.start("leasy", "leaving")
    heirs: list = []
    try:
        with ThreadPoolExecutor(4) as pool:
            head = pool.submit(call, api, "leasy-model", "sleep:2 runs while the worker stops")
            wait_until(lambda: fake.stats()["in_flight"] == 1, 10)
            line = [pool.submit(call, api, "leasy-model", f"waits in line {n}") for n in range(3)]
            def all_in_line() -> bool:   # all three stand in the first worker's line
                waiting = jobs_with(client, prefix, "waits in line").values()
                return sum(b"holder" in job for job in waiting) == 3
            wait_until(all_in_line, 10)
            stopped_at = time.monotonic()
            first.terminate()
            heirs = [worker_factory.start("leasy", "heir")]
            first.proc.wait(timeout=DRAIN_S + 10)
            exited_s = time.monotonic() - stopped_at
            answers = [head.result(), *(c.result() for c in line)]
            # a caller has its answer before the worker's task ends (its bookkeeping, then the ack and
            # Celery's "succeeded" line): wait for the heir's lines before stopping it
            line_ids = {r.headers.get("x-gateway-job-id") for r in answers[1:]}
            if all(r.status_code == 200 for r in answers):   # else the asserts below say what failed
                wait_until(lambda: line_ids <= set(heirs[0].finished_tasks()), 10)
    finally:
        stop_all([first, *heirs])
    assert exited_s < DRAIN_S + STOP_MARGIN_S, (exited_s, first.output()[-4000:])   # `up` SIGKILLs after this
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    texts = ["sleep:2 runs while the worker stops", *(f"waits in line {n}" for n in range(3))]
    assert [r.json()["choices"][0]["message"]["content"] for r in answers] == [f"echo: {t}" for t in texts]
    by_content = fake.stats()["by_content"]
    assert [by_content[t] for t in texts] == [1] * 4
    assert answers[0].headers["x-gateway-job-id"] in first.finished_tasks()
    assert line_ids <= set(heirs[0].finished_tasks())
    assert "3 job(s) waiting in line go back on the queue" in first.output()
    # each by the stopping worker itself (Reject + requeue), not later by a lease sweeper; and once it
    # stopped consuming (at most a BRPOP already in flight brings one back to it): no ping-pong
    assert first.output().count("left the line: this worker is stopping; its message goes back") == 3
    assert first.output().count("not started: this worker is stopping; its message goes back") <= 2


def test_a_call_that_outlives_the_drain_runs_again_on_another_worker(api, fake, worker_factory, db):
    """A call still running when the drain time is up: the worker lets it go and exits; the next
    worker runs it again as attempt 2 (the lost attempt recorded) and its caller gets the answer."""
    first = worker_factory.start("crashy", "draining")
    heirs: list = []
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(call, api, "crashy-model", "sleep:7 outlives the drain")
            wait_until(lambda: fake.stats()["in_flight"] == 1, 10)
            stopped_at = time.monotonic()
            first.terminate()
            heirs = [worker_factory.start("crashy", "after-drain")]
            first.proc.wait(timeout=DRAIN_S + 10)
            exited_s = time.monotonic() - stopped_at
            answer = held.result()
    finally:
        stop_all([first, *heirs])
    assert DRAIN_S - 0.5 < exited_s < DRAIN_S + STOP_MARGIN_S, exited_s
    assert answer.status_code == 200, answer.text
    assert fake.stats()["by_content"]["sleep:7 outlives the drain"] == 2
    job_id = answer.headers["x-gateway-job-id"]
    billed = [(f"{job_id}:1:lost", ATTEMPT_LOST), (f"{job_id}:2:1", "success")]
    wait_until(lambda: usage(db, job_id) == billed, 15)
    assert "still running" in first.output()


# path, how its error body names the code
PROTOCOLS = [
    ("/v1/chat/completions", lambda body: body["error"]["code"] == "gateway_stopping"),
    ("/v1/messages", lambda body: body["type"] == "error" and body["error"]["type"]),
    ("/api/chat", lambda body: body["error"]),
]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_stopping_api_answers_its_held_callers(gateway_env, fake, workers, worker_factory, client, prefix,
                                                 tmp_path_factory, sig):
    """Held callers whose job can still be served within the drain time get their answer; those whose
    job waits in a line nobody serves get a 503 in their own protocol, with Retry-After, when the
    drain time is up — not a dropped connection — and their jobs never run."""
    stopping = Api(gateway_env, tmp_path_factory.mktemp("stopping-api") / "api.log").start()
    marker = f"held at {sig.name}"
    with ThreadPoolExecutor(4) as pool:
        served = pool.submit(call, stopping, "fake-model", f"sleep:2 {marker}, served")
        held = [pool.submit(call, stopping, "stalled-model", f"{marker} via {path}", path)
                for path, _ in PROTOCOLS]
        wait_until(lambda: len(jobs_with(client, prefix, marker)) == 4, 10)
        stopped_at = time.monotonic()
        assert stopping.process is not None
        stopping.process.kill(sig)   # the whole group, as a terminal's Ctrl-C does; waits for the exit
        exited_s = time.monotonic() - stopped_at
        answers = [h.result() for h in held]
    assert served.result().status_code == 200, served.result().text
    assert exited_s < DRAIN_S + 4, exited_s
    for (path, code_of), answer in zip(PROTOCOLS, answers, strict=True):
        assert answer.status_code == 503, (path, answer.text)
        assert float(answer.headers["Retry-After"]) > 0
        body = answer.json()
        assert code_of(body), (path, body)
        assert "restarting" in answer.text and answer.headers["x-gateway-job-id"]
    # withdrawn: a worker that comes for them later never calls the upstream
    jobs = {j for j, job in jobs_with(client, prefix, marker).items() if b"stalled" in job[b"spec"]}
    assert all(client.hget(f"{prefix}:job:{j}", "state") == b"cancelled" for j in jobs)
    late = worker_factory.start("stalled", f"late-{sig.name}")
    try:
        wait_until(lambda: jobs <= set(late.finished_tasks()), 15)
    finally:
        stop_all([late])
    assert not any(marker in text and "via" in text for text in fake.stats()["by_content"])


def test_up_ctrl_c_answers_held_callers_and_finishes_within_the_drain_bound(fake, tmp_path_factory):
    """``llm-gateway up`` with one call running past the drain time and one waiting in line: Ctrl-C
    answers both callers with a 503 (no dropped connection) and everything has stopped within the
    drain time + the documented margin (+ the embedded servers' own stop), with no SIGKILL needed."""
    state_dir = Path(tempfile.mkdtemp(prefix="gw-stop-"))
    state_dir.chmod(0o755)   # embedded PostgreSQL runs as an account that must enter it
    config = tmp_path_factory.mktemp("up-config") / "registry.yaml"
    config.write_text(f"providers:\n  slow:\n    kind: openai\n    base_url: {fake.base_url}\n"
                      "    api_key_env: FAKE_API_KEY\n    limits: {concurrency: 1}\n"
                      "models:\n  slow-model:\n    provider: slow\n    model: fake-model\n")
    up = Up(state_dir, env={"GATEWAY_CONFIG": str(config), "FAKE_API_KEY": "sk-fake-upstream",
                            "GATEWAY_DRAIN_TIMEOUT": str(DRAIN_S)})
    try:
        up.wait_ready()
        api = Api({}, state_dir / "unused.log")
        api.port = up.api_port
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(call, api, "slow-model", "sleep:30 running at Ctrl-C")
            wait_until(lambda: fake.stats()["in_flight"] == 1, 20)
            waiting = pool.submit(call, api, "slow-model", "waiting at Ctrl-C")
            time.sleep(1)   # it reaches the worker's line (nothing to prove: both outcomes are 503s)
            stopped_at = time.monotonic()
            up.proc.send_signal(signal.SIGINT)
            answers = [running.result(), waiting.result()]
            assert up.proc.wait(timeout=DRAIN_S + STOP_MARGIN_S + 30) == 0
            stopped_s = time.monotonic() - stopped_at
        out = up.output()
        up.assert_all_gone()
    finally:
        up.kill()
        shutil.rmtree(state_dir, ignore_errors=True)
    codes = [r.json()["error"]["code"] for r in answers]
    assert [r.status_code for r in answers] == [503, 503], [r.text for r in answers]
    assert codes == ["outcome_unknown", "gateway_stopping"], codes
    assert "Retry-After" in answers[1].headers
    assert "still running after" not in out, out   # nobody needed a SIGKILL
    assert stopped_s < DRAIN_S + STOP_MARGIN_S + 15, stopped_s   # + stopping embedded Redis/PostgreSQL
    assert fake.stats()["by_content"].get("waiting at Ctrl-C") is None
