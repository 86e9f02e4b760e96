"""Synchronous OpenAI chat calls through API → llm.<provider> queue → Celery worker → fake upstream."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration


def client(api, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="anything", max_retries=0, **kw)


def test_openai_sdk_gets_the_upstream_answer_with_gateway_metadata(api, fake, db):
    raw = client(api).chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "hello gateway"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello gateway"
    assert completion.usage.prompt_tokens == 2 and completion.usage.completion_tokens == 3
    assert raw.headers["x-gateway-provider"] == "fake"
    assert raw.headers["x-gateway-model"] == "fake-model"
    assert 0 <= int(raw.headers["x-gateway-queue-wait-ms"]) < 10_000  # idle workers: it hardly waited
    assert raw.headers["x-request-id"]
    # price 1.0 in / 2.0 out per 1M tokens: 2 * 1 + 3 * 2 = 8 per 1M
    assert raw.headers["x-gateway-cost-usd"] == "0.000008"
    job_id = raw.headers["x-gateway-job-id"]
    assert completion.model_extra["x-gateway"]["job_id"] == job_id
    # the upstream saw the provider's model name and the gateway's upstream key, not the client's
    seen = fake.requests()[-1]
    assert seen["headers"]["authorization"] == "Bearer sk-fake-upstream"
    assert seen["body"]["model"] == "fake-model"
    assert "max_wait" not in seen["body"]

    def usage_row():
        return db.execute("SELECT model, provider, prompt_tokens, completion_tokens, cost_usd, outcome "
                          "FROM usage WHERE job_id = %s", (job_id,)).fetchall()
    wait_until(lambda: usage_row(), 10)
    assert [tuple(map(str, r)) for r in usage_row()] == [
        ("fake-model", "fake", "2", "3", "0.0000080000", "success")]


def test_thirty_concurrent_calls_each_get_their_own_answer(api, fake):
    sdk = client(api)

    def ask(i: int) -> str:
        reply = sdk.chat.completions.create(model="fake-model",
                                            messages=[{"role": "user", "content": f"question {i}"}])
        return reply.choices[0].message.content

    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(ask, range(30)))
    assert answers == [f"echo: question {i}" for i in range(30)]
    assert fake.stats()["calls"] == 30


def test_request_id_is_echoed_and_models_are_listed(api):
    r = requests.get(f"{api.url}/v1/models", headers={"x-request-id": "trace-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-123"
    ids = {m["id"] for m in r.json()["data"]}
    assert {"fake-model", "stalled-model", "crashy-model"} <= ids
    assert "nokey-model" not in ids  # its provider has no credentials
    assert {m.id for m in client(api).models.list()} == ids


def test_health_reports_services_and_unroutable_providers(api):
    body = requests.get(f"{api.url}/health").json()
    assert body["status"] == "ok" and body["redis"] == "ok" and body["database"] == "ok"
    assert body["providers"]["fake"]["routable"] is True
    assert body["providers"]["nokey"]["routable"] is False
    assert "GATEWAY_TEST_UNSET_KEY" in body["providers"]["nokey"]["reason"]


BAD_REQUESTS = [
    # (id, body bytes, headers, status, error code or None, message fragment)
    ("invalid-json", b"{not json", {}, 400, None, "not valid JSON"),
    ("empty-body", b"", {}, 400, None, "empty"),
    ("json-array", b"[1, 2]", {}, 400, None, "JSON object"),
    ("missing-model", json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), {}, 400,
     "missing_required_parameter", "'model'"),
    ("missing-messages", json.dumps({"model": "fake-model"}).encode(), {}, 400, "missing_required_parameter",
     "'messages'"),
    ("empty-messages", json.dumps({"model": "fake-model", "messages": []}).encode(), {}, 400, "invalid_value",
     "messages"),
    ("bad-role",
     json.dumps({"model": "fake-model", "messages": [{"role": "robot", "content": "x"}]}).encode(),
     {}, 400, "invalid_value", "messages.0.role"),
    ("temperature-string",
     json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "x"}],
                 "temperature": "hot"}).encode(), {}, 400, "invalid_value", "temperature"),
    ("max-tokens-negative", json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "x"}],
                                        "max_tokens": -5}).encode(), {}, 400, "invalid_value", "max_tokens"),
    ("unknown-model",
     json.dumps({"model": "gpt-nope", "messages": [{"role": "user", "content": "x"}]}).encode(),
     {}, 404, "model_not_found", "gpt-nope"),
    ("provider-without-key", json.dumps({"model": "nokey-model",
                                         "messages": [{"role": "user", "content": "x"}]}).encode(),
     {}, 503, "provider_not_configured", "GATEWAY_TEST_UNSET_KEY"),
    ("max-wait-not-a-number",
     json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "x"}],
                 "max_wait": "soon"}).encode(), {}, 400, None, "max_wait"),
    ("max-wait-header-too-large", json.dumps({"model": "fake-model",
                                              "messages": [{"role": "user", "content": "x"}]}).encode(),
     {"x-gateway-max-wait": "99999"}, 400, None, "at most"),
    ("oversize",
     json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "x" * 70000}]}).encode(),
     {}, 413, "request_too_large", "exceeds"),
]


@pytest.mark.parametrize("body,headers,status,code,fragment", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_a_clear_openai_shaped_4xx(api, fake, body, headers, status, code, fragment):
    r = requests.post(f"{api.url}/v1/chat/completions", data=body,
                      headers={"Content-Type": "application/json", **headers})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"]
    if code is not None:
        assert error["code"] == code
    assert fake.stats()["calls"] == 0  # nothing bad ever reaches the upstream


@pytest.mark.parametrize("method,path,status",
                         [("GET", "/v1/chat/completions", 405), ("GET", "/v1/nothing", 404)],
                         ids=["wrong-method", "unknown-path"])
def test_routing_errors_are_openai_shaped(api, method, path, status):
    r = requests.request(method, f"{api.url}{path}")
    assert r.status_code == status
    assert r.json()["error"]["message"]


def test_sdk_raises_its_own_error_types(api):
    with pytest.raises(openai.NotFoundError) as err:
        client(api).chat.completions.create(model="no-such-model",
                                            messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"


def test_upstream_4xx_reaches_the_client_as_that_4xx(api, fake):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client(api).chat.completions.create(model="fake-model",
                                            messages=[{"role": "user", "content": "status:422 x"}])
    assert err.value.status_code == 422
    assert fake.stats()["calls"] == 1  # a client error is not retried


def test_upstream_5xx_is_retried_then_succeeds(api, fake):
    fake.configure(fail_next={"count": 1, "status": 503})
    reply = client(api).chat.completions.create(model="fake-model",
                                                messages=[{"role": "user", "content": "retry me"}])
    assert reply.choices[0].message.content == "echo: retry me"
    assert fake.stats()["calls"] == 2


def test_upstream_429_is_waited_out_within_max_wait(api, fake):
    fake.configure(fail_next={"count": 1, "status": 429, "retry_after": 1})
    reply = client(api).chat.completions.create(model="fake-model",
                                                messages=[{"role": "user", "content": "patience"}])
    assert reply.choices[0].message.content == "echo: patience"
    assert fake.stats()["by_status"] == {"429": 1, "200": 1}
