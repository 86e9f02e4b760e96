"""Upstream answers the gateway must not take at face value, through the real API, a real worker and the
fake upstream: a 200 that is no answer, absurd token counts, and an upstream that drip-feeds its answer
one byte at a time (each read succeeds, so only a deadline on the whole call ends it).

The module runs its own registry (provider ``strict``: ``timeout: 3``, ``idle_timeout: 1``,
``max_retries: 1``) under its own Redis prefix, with its own worker and API process."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.fakeprovider import FakeProvider
from tests.integration.conftest import Api, Process, WorkerFactory, stop_all, wait_until

pytestmark = pytest.mark.integration

TIMEOUT, IDLE, MAX_RETRIES = 3.0, 1.0, 1
ATTEMPTS = MAX_RETRIES + 1
MARGIN = 2.5  # seconds: retry backoff (0.25 s), queueing, process hops


@pytest.fixture(scope="module")
def strict_api(
    gateway_env: dict[str, str], fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    config = tmp_path_factory.mktemp("strict") / "registry.yaml"
    config.write_text(
        f"providers:\n  strict:\n    kind: openai\n    base_url: {fake.base_url}\n"
        "    api_key_env: FAKE_API_KEY\n"
        f"    pool: 16\n    max_retries: {MAX_RETRIES}\n    timeout: {TIMEOUT}\n    idle_timeout: {IDLE}\n"
        "models:\n  strict-model:\n    provider: strict\n    model: fake-model\n"
        "    price: {input: 1.0, output: 2.0}\n"
    )
    env = {
        **gateway_env,
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_KEY_PREFIX": "gwstrict" + secrets.token_hex(4),
    }
    logs = tmp_path_factory.mktemp("strict-logs")
    worker: list[Process] = [WorkerFactory(env, logs).start("strict")]
    api = Api(env, logs / "api.log").start()
    yield api
    api.stop()
    stop_all(worker)


def chat(api: Api, content: str, **extra: Any) -> requests.Response:
    return requests.post(
        f"{api.url}/v1/chat/completions",
        timeout=60,
        json={"model": "strict-model", "messages": [{"role": "user", "content": content}], **extra},
    )


def usage_rows(db, job_id: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT outcome, prompt_tokens, completion_tokens, cost_usd FROM usage WHERE job_id = %s", (job_id,)
    ).fetchall()


BAD_ANSWERS = [("error-body", "error"), ("empty-choices", "empty"), ("no-choices", "missing")]


@pytest.mark.parametrize("what", [b[1] for b in BAD_ANSWERS], ids=[b[0] for b in BAD_ANSWERS])
def test_a_200_that_is_no_answer_fails_after_the_retries(strict_api, fake, db, what):
    response = chat(strict_api, f"bad200:{what} hello")
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_bad_response"
    assert fake.stats()["calls"] == ATTEMPTS
    job_id = response.headers.get("x-gateway-job-id")
    if job_id:  # no usage row may say this was a success
        assert [row for row in usage_rows(db, job_id) if row[0] == "success"] == []


def test_an_async_job_answered_with_an_error_body_ends_failed(strict_api, fake, db):
    accepted = requests.post(
        f"{strict_api.url}/v1/jobs",
        timeout=30,
        json={"model": "strict-model", "messages": [{"role": "user", "content": "bad200:error later"}]},
    )
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]

    def job() -> dict[str, Any]:
        return requests.get(f"{strict_api.url}/v1/jobs/{job_id}", timeout=10).json()

    wait_until(lambda: job()["status"] not in ("queued", "running"), 30)
    final = job()
    assert final["status"] == "failed" and final["error"]["code"] == "upstream_bad_response"
    assert final["result"] is None and fake.stats()["calls"] == ATTEMPTS
    assert [row for row in usage_rows(db, job_id) if row[0] == "success"] == []


def stream_error(response: requests.Response) -> tuple[int, str | None]:
    """The status and error code of a streamed call: an error before the first chunk is a plain JSON
    error answer; after it, an error event ends the stream."""
    with response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return response.status_code, response.json()["error"]["code"]
        events = [
            json.loads(line[5:])
            for line in response.iter_lines()
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"
        ]
    errors = [e["error"]["code"] for e in events if isinstance(e.get("error"), dict)]
    return response.status_code, errors[-1] if errors else None


@pytest.mark.parametrize("what", ["error", "empty"], ids=["error-event", "done-before-any-choice"])
def test_a_stream_that_is_no_answer_fails_after_the_retries(strict_api, fake, what):
    status, code = stream_error(chat(strict_api, f"bad200:{what} hello", stream=True))
    assert (status, code) == (502, "upstream_bad_response")
    assert fake.stats()["calls"] == ATTEMPTS


def test_absurd_token_counts_are_billed_clamped(strict_api, fake, db):
    response = chat(strict_api, "tokens:-5,3000000000 count me")
    assert response.status_code == 200, response.text
    job_id = response.headers["x-gateway-job-id"]
    wait_until(lambda: usage_rows(db, job_id), 30)
    [(outcome, prompt, completion, cost)] = usage_rows(db, job_id)
    # 0 prompt tokens (not -5), 1e9 completion tokens (not 3e9) at $2 per 1M: $2,000, never negative
    assert (outcome, prompt, completion, str(cost)) == ("success", 0, 1_000_000_000, "2000.0000000000")


def test_a_drip_fed_answer_ends_at_the_call_deadline(strict_api, fake):
    """One byte every 0.4 s: no read ever waits long, so only the whole-call deadline (3 s) stops it."""
    started = time.monotonic()
    response = chat(strict_api, "drip:0.4 take your time")
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert fake.stats()["calls"] == ATTEMPTS
    assert ATTEMPTS * TIMEOUT <= elapsed < ATTEMPTS * TIMEOUT + MARGIN


def test_a_drip_fed_stream_ends_at_its_first_event_deadline(strict_api, fake):
    """The SSE text one byte every 0.4 s: its first event is not complete within the 3 s first-event
    deadline. Nothing went out yet, so the call is retried once, then the stream ends with a timeout."""
    started = time.monotonic()
    status, code = stream_error(chat(strict_api, "drip:0.4 stream slowly", stream=True))
    elapsed = time.monotonic() - started
    # the API may have opened the event stream already (its keep-alive), so the status can be 200
    assert status in (200, 504) and code == "upstream_timeout"
    assert fake.stats()["calls"] == ATTEMPTS
    assert ATTEMPTS * TIMEOUT <= elapsed < ATTEMPTS * TIMEOUT + MARGIN


def test_a_stream_that_goes_quiet_ends_at_the_idle_deadline(strict_api, fake):
    """Chunks 1.5 s apart, more than the 1 s idle limit: the stream is cut after its first chunks
    went out (so it is not retried) and ends with a timeout error event, well before its 3 s cap."""
    fake.configure(chunk_delay_ms=1500)
    started = time.monotonic()
    status, code = stream_error(chat(strict_api, "one two three four", stream=True))
    elapsed = time.monotonic() - started
    assert status == 200 and code in ("upstream_timeout", "upstream_stream_broken")
    assert fake.stats()["calls"] == 1
    assert elapsed < IDLE + MARGIN
