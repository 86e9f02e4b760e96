"""Streaming through the queue: the worker relays upstream chunks via Redis, the API relays them as SSE."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import openai
import pytest
import redis
import requests

from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                   "required": ["location"]}}}


def sdk(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="x", max_retries=0)


def test_sdk_stream_gets_every_token_and_done(api, fake, db):
    stream = sdk(api).chat.completions.create(
        model="fake-model", stream=True, messages=[{"role": "user", "content": "stream these five words"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream these five words"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # not asked for: the gateway's own usage chunk is dropped
    wait_until(lambda: db.execute("SELECT count(*) FROM usage WHERE outcome = 'success' "
                                  "AND completion_tokens = 5 AND prompt_tokens = 4").fetchone()[0] >= 1, 10)


def test_include_usage_gets_the_usage_chunk(api, fake):
    stream = sdk(api).chat.completions.create(model="fake-model", stream=True,
                                               stream_options={"include_usage": True},
                                               messages=[{"role": "user", "content": "count me"}])
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_streamed_tool_call_arrives_whole(api, fake):
    stream = sdk(api).chat.completions.create(
        model="fake-model", stream=True, tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "what is the weather in Oslo"}])
    name, arguments, finish = "", "", None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                assert call.index == 0
                name += call.function.name or ""
                arguments += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert name == "get_weather" and json.loads(arguments) == {"location": "Oslo"} and finish == "tool_calls"


def test_stream_failing_before_its_first_chunk_gets_a_real_http_error(api, fake):
    with pytest.raises(openai.BadRequestError):
        list(sdk(api).chat.completions.create(model="fake-model", stream=True,
                                              messages=[{"role": "user", "content": "status:400 nope"}]))


def test_tokens_are_relayed_as_they_arrive_not_buffered(api, fake):
    fake.configure(chunk_delay_ms=300)
    started = time.monotonic()
    arrivals = []
    with requests.post(f"{api.url}/v1/chat/completions", stream=True,
                       json={"model": "fake-model", "stream": True,
                             "messages": [{"role": "user", "content": "one two three four"}]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) >= 6
    assert arrivals[-1] - arrivals[1] > 1.0  # spread out over the upstream's pace, not delivered at once


def test_client_leaving_a_queued_stream_withdraws_its_job(api, fake, start_worker, gateway_env):
    with requests.post(f"{api.url}/v1/chat/completions", stream=True, timeout=30,
                       json={"model": "stalled-model", "stream": True,
                             "messages": [{"role": "user", "content": "never streamed"}]}) as r:
        assert r.status_code == 200
        job_id = r.headers["x-gateway-job-id"]
        first = next(r.iter_lines())
        assert first.startswith(b": waiting in line")  # kept alive while it waits
    # the API notices at a keep-alive write that fails (the first may still fit in the socket buffer)
    jobs = redis.Redis.from_url(gateway_env["REDIS_URL"])
    job_key = f"{gateway_env['GATEWAY_KEY_PREFIX']}:job:{job_id}"
    wait_until(lambda: jobs.hget(job_key, "state") == b"cancelled", 20)
    worker = start_worker("stalled")
    wait_until(lambda: job_id in worker.finished_tasks(), 15)  # its message was taken and dropped
    assert "never streamed" not in fake.stats()["by_content"]


def test_client_leaving_a_running_stream_aborts_the_upstream_call(api, fake, gateway_env):
    fake.configure(chunk_delay_ms=400)
    words = " ".join(f"w{i}" for i in range(30))  # ~12 s of streaming at the upstream's pace
    with requests.post(f"{api.url}/v1/chat/completions", stream=True, timeout=30,
                       json={"model": "fake-model", "stream": True,
                             "messages": [{"role": "user", "content": words}]}) as r:
        job_id = r.headers["x-gateway-job-id"]
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith(b"data: {"))
    jobs = redis.Redis.from_url(gateway_env["REDIS_URL"])
    job_key = f"{gateway_env['GATEWAY_KEY_PREFIX']}:job:{job_id}"
    wait_until(lambda: jobs.hget(job_key, "state") == b"cancelled", 8)
    wait_until(lambda: fake.stats()["in_flight"] == 0, 3)  # the worker closed its upstream connection


def test_a_streamed_call_records_its_first_token_and_the_requests_page_shows_it(api, fake, db, gateway_env):
    """The worker measures a stream's first chunk (from the upstream call's start) into its usage row;
    the request log (the dashboard's Requests page) places it between started and done."""
    from common.db import make_session_factory
    from common.requestlog import CallFilter, recent_calls

    fake.configure(latency_ms=150)   # the fake waits this long before its first chunk
    try:
        streamed = requests.post(f"{api.url}/v1/chat/completions", timeout=30, json={
            "model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "first token"}]})
        whole = requests.post(f"{api.url}/v1/chat/completions", timeout=30, json={
            "model": "fake-model", "messages": [{"role": "user", "content": "no stream"}]})
    finally:
        fake.configure(latency_ms=0)
    assert streamed.status_code == 200 and whole.status_code == 200
    ids = {streamed.headers["x-gateway-job-id"]: True, whole.headers["x-gateway-job-id"]: False}

    def rows() -> dict:
        found = db.execute("SELECT job_id, first_token_ms, upstream_latency_ms FROM usage "
                           "WHERE job_id = ANY(%s) AND outcome = 'success'", (list(ids),)).fetchall()
        return {job: (first, latency) for job, first, latency in found}

    wait_until(lambda: len(rows()) == 2, 10)
    for job, (first, latency) in rows().items():
        if ids[job]:
            assert 150 <= first <= latency, (first, latency)
        else:
            assert first is None

    sessions = make_session_factory(gateway_env["DATABASE_URL"], pool_size=1)
    for job, is_stream in ids.items():
        [call] = recent_calls(sessions, CallFilter(since=datetime.now(UTC) - timedelta(minutes=5), job=job))
        if is_stream:
            assert call.first_token_at is not None
            assert call.started_at <= call.first_token_at <= call.done_at
        else:
            assert call.first_token_at is None
