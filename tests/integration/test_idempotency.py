"""Idempotency-Key: a retried POST returns the first outcome instead of running the call twice.

The fake upstream counts the calls it received per prompt (``by_content``): every repeat below must
leave that count at one. Errors are checked in each protocol's own shape.
"""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration


def chat_body(content: str, **extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


def post(api, path: str, body: dict, key: str | None, **headers: str) -> requests.Response:
    if key is not None:
        headers["Idempotency-Key"] = key
    return requests.post(f"{api.url}{path}", json=body, headers=headers, timeout=30)


def new_key() -> str:
    return "retry-" + secrets.token_hex(8)


def upstream_calls(fake, content: str) -> int:
    return fake.stats()["by_content"].get(content, 0)


def test_an_async_repeat_returns_the_same_job_and_runs_once(api, fake):
    key, body = new_key(), chat_body("idem async once")
    first = post(api, "/v1/jobs", body, key)
    assert first.status_code == 202, first.text
    again = post(api, "/v1/jobs", body, key)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    wait_until(lambda: requests.get(f"{api.url}/v1/jobs/{first.json()['id']}").json()["status"]
               == "succeeded", 20)
    done = post(api, "/v1/jobs", body, key)
    assert done.json()["id"] == first.json()["id"] and done.json()["status"] == "succeeded"
    assert upstream_calls(fake, "idem async once") == 1


def test_concurrent_async_repeats_share_one_job(api, fake):
    key, body = new_key(), chat_body("idem async concurrent")
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: post(api, "/v1/jobs", body, key), range(5)))
    assert sorted(r.status_code for r in answers) == [200, 200, 200, 200, 202], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    job_url = f"{api.url}/v1/jobs/{answers[0].json()['id']}"
    wait_until(lambda: requests.get(job_url).json()["status"] == "succeeded", 20)
    assert upstream_calls(fake, "idem async concurrent") == 1


def test_an_async_repeat_finds_its_job_in_postgres_after_redis_lost_the_key(api, fake, prefix):
    import redis

    from tests.conftest import TEST_REDIS_URL
    key, body = new_key(), chat_body("idem async after wipe")
    first = post(api, "/v1/jobs", body, key)
    assert first.status_code == 202, first.text
    client = redis.Redis.from_url(TEST_REDIS_URL)
    assert client.delete(*client.keys(f"{prefix}:idem:*")) >= 1
    again = post(api, "/v1/jobs", body, key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = post(api, "/v1/jobs", chat_body("idem async after wipe, changed"), key)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_a_sync_repeat_after_completion_returns_the_same_answer_and_one_usage_row(api, fake, db):
    key, body = new_key(), chat_body("idem sync done")
    first = post(api, "/v1/chat/completions", body, key)
    assert first.status_code == 200, first.text
    again = post(api, "/v1/chat/completions", body, key)
    assert again.status_code == 200
    assert again.headers["x-gateway-job-id"] == first.headers["x-gateway-job-id"]
    assert again.json()["choices"] == first.json()["choices"]
    assert upstream_calls(fake, "idem sync done") == 1
    job_id = first.headers["x-gateway-job-id"]

    def usage_rows() -> int:
        return db.execute("SELECT count(*) FROM usage WHERE job_id = %s", (job_id,)).fetchone()[0]

    wait_until(lambda: usage_rows() >= 1, 15)
    assert usage_rows() == 1


def test_a_sync_repeat_while_the_first_runs_waits_for_its_answer(api, fake):
    key, body = new_key(), chat_body("sleep:1.5 idem sync running")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, api, "/v1/chat/completions", body, key)
        wait_until(lambda: fake.stats()["in_flight"] >= 1, 10)
        again = pool.submit(post, api, "/v1/chat/completions", body, key).result()
        first_answer = first.result()
    assert first_answer.status_code == 200 and again.status_code == 200, again.text
    assert again.headers["x-gateway-job-id"] == first_answer.headers["x-gateway-job-id"]
    assert again.json()["choices"] == first_answer.json()["choices"]
    assert upstream_calls(fake, "sleep:1.5 idem sync running") == 1


def test_a_recorded_error_is_answered_again_with_its_job_id(api, fake):
    key, body = new_key(), chat_body("status:400 idem rejected")
    first = post(api, "/v1/chat/completions", body, key)
    again = post(api, "/v1/chat/completions", body, key)
    assert first.status_code == again.status_code == 400
    assert again.json()["error"] == first.json()["error"]
    assert again.headers["x-gateway-job-id"] == first.headers["x-gateway-job-id"]
    assert upstream_calls(fake, "status:400 idem rejected") == 1


def test_a_streamed_repeat_replays_the_recorded_chunks(api, fake):
    key, body = new_key(), chat_body("idem streamed", stream=True)
    first = post(api, "/v1/chat/completions", body, key)
    again = post(api, "/v1/chat/completions", body, key)
    assert first.status_code == again.status_code == 200
    assert again.text == first.text and "[DONE]" in again.text
    assert upstream_calls(fake, "idem streamed") == 1


ANTHROPIC_BODY = {"model": "fake-model", "max_tokens": 16, "messages": [{"role": "user", "content": "x"}]}
OLLAMA_BODY = {"model": "fake-model", "stream": False, "messages": [{"role": "user", "content": "x"}]}


def openai_code(r: requests.Response) -> str:
    """The message of an error in OpenAI's shape (whose every field is checked to be there)."""
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"}
    return error["message"]


def anthropic_type(r: requests.Response) -> str:
    assert r.json()["type"] == "error"
    return r.json()["error"]["type"]


def ollama_message(r: requests.Response) -> str:
    assert isinstance(r.json()["error"], str)
    return r.json()["error"]


PROTOCOLS = [("/v1/chat/completions", chat_body("x"), openai_code),
             ("/v1/jobs", chat_body("x"), openai_code),
             ("/v1/messages", ANTHROPIC_BODY, anthropic_type),
             ("/api/chat", OLLAMA_BODY, ollama_message)]
PROTOCOL_IDS = ["openai", "jobs", "anthropic", "ollama"]


@pytest.mark.parametrize(("path", "body", "shape"), PROTOCOLS, ids=PROTOCOL_IDS)
def test_the_same_key_with_another_body_is_a_422_in_the_callers_shape(api, path, body, shape):
    key = new_key()
    first = post(api, path, {**body, "messages": [{"role": "user", "content": "idem first " + key}]}, key)
    assert first.status_code in (200, 202), first.text
    other = post(api, path, {**body, "messages": [{"role": "user", "content": "idem other " + key}]}, key)
    assert other.status_code == 422
    assert shape(other)  # the protocol's error shape (each shape function checks its structure)
    assert "different request body" in other.text


def test_the_same_key_on_another_endpoint_is_a_422(api):
    key = new_key()
    assert post(api, "/v1/chat/completions", chat_body("idem endpoint"), key).status_code == 200
    other = post(api, "/v1/jobs", chat_body("idem endpoint"), key)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert "/v1/chat/completions" in other.text


@pytest.mark.parametrize(("path", "body", "shape"), PROTOCOLS, ids=PROTOCOL_IDS)
@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9"], ids=["empty", "too-long", "non-ascii"])
def test_a_malformed_key_is_a_400_in_the_callers_shape(api, fake, path, body, shape, key):
    r = requests.post(f"{api.url}{path}", json=body, timeout=30,
                      headers={"Idempotency-Key": key.encode("utf-8").decode("latin-1")})
    assert r.status_code == 400, r.text
    assert shape(r) and "Idempotency-Key" in r.text
    assert fake.stats()["calls"] == 0


def test_a_call_that_never_ran_frees_its_key(api):
    """stalled-model has no worker: the first call expires in line (429, it never ran). A repeat made
    while it waited is told the same; the key is then free, so the next retry is a new job."""
    key, body = new_key(), {**chat_body("idem never ran"), "model": "stalled-model", "max_wait": 1.5}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, api, "/v1/chat/completions", body, key)
        repeat = pool.submit(post, api, "/v1/chat/completions", body, key)
        answers = [first.result(), repeat.result()]
    assert [r.status_code for r in answers] == [429, 429], [r.text for r in answers]
    assert answers[0].headers["x-gateway-job-id"] == answers[1].headers["x-gateway-job-id"]
    retry = post(api, "/v1/chat/completions", body, key)
    assert retry.status_code == 429
    assert retry.headers["x-gateway-job-id"] != answers[0].headers["x-gateway-job-id"]


def test_gemini_generate_content_repeats_and_conflicts(api, fake):
    key, path = new_key(), "/v1beta/models/fake-model:generateContent"

    def body(text: str) -> dict:
        return {"contents": [{"role": "user", "parts": [{"text": text}]}]}

    first = post(api, path, body("idem gemini"), key)
    again = post(api, path, body("idem gemini"), key)
    assert first.status_code == again.status_code == 200, first.text
    assert again.headers["x-gateway-job-id"] == first.headers["x-gateway-job-id"]
    assert upstream_calls(fake, "idem gemini") == 1
    other = post(api, path, body("idem gemini, changed"), key)
    assert other.status_code == 422
    error = other.json()["error"]
    assert error["code"] == 422 and "different request body" in error["message"]
