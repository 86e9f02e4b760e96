"""Routing and fallbacks with three fake upstreams: an alias served by several deployments, a job that
moves when its deployment cannot serve it (keeping its id and caller), circuit breakers shared by every
worker process, context-window routing, and streams that fail over only before their first token."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import TEST_REDIS_URL
from tests.fakeprovider import FakeProvider
from tests.integration.conftest import VISIBILITY_TIMEOUT, Process, WorkerFactory, stop_all, wait_until

pytestmark = pytest.mark.integration

ADMIN = "admin-secret-routing"
FAILURES, OPEN_S, PROBES = 3, 2, 1


def restart(fake: FakeProvider) -> None:
    """Start a stopped fake again on the port it had (the registry names that port)."""
    port = fake.port
    fake._requested_port = port  # type: ignore[attr-defined]  # the test helper's own start port
    fake.start()


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeProvider]]:
    with FakeProvider() as a, FakeProvider() as b, FakeProvider() as c:
        yield {"a": a, "b": b, "c": c}


def registry_yaml(fakes: dict[str, FakeProvider]) -> str:
    provider = ("  {name}:\n    kind: openai\n    base_url: {url}\n    api_key_env: FAKE_API_KEY\n"
                "    max_retries: 1\n    timeout: 10\n    connect_timeout: 1\n")
    providers = "".join(provider.format(name=n, url=fakes[f].base_url)
                        for n, f in (("fake", "a"), ("pb", "b"), ("pc", "c")))
    return (f"providers:\n{providers}"
            "models:\n"
            "  duo:\n    routing: weighted\n    deployments:\n"
            "      - {provider: fake, model: fake-model}\n      - {provider: pb, model: fake-model}\n"
            "  firstcheap:\n    routing: cheapest\n    deployments:\n"
            "      - {provider: fake, model: fake-model, price: {input: 0.1, output: 0.1}}\n"
            "      - {provider: pb, model: fake-model, price: {input: 1, output: 1}}\n"
            "  stranded:\n    routing: cheapest\n    deployments:\n"
            "      - {provider: fake, model: fake-model, price: {input: 0.1, output: 0.1}}\n"
            "      - {provider: pc, model: fake-model, price: {input: 1, output: 1}}\n"
            "  ctx:\n    deployments:\n"
            "      - {provider: pc, model: fake-model, context_window: 64}\n"
            "      - {provider: pb, model: fake-model, context_window: 100000}\n"
            f"routing:\n  breaker: {{failures: {FAILURES}, window_s: 30, open_s: {OPEN_S}, "
            f"probes: {PROBES}}}\n")


@pytest.fixture(scope="module")
def gateway_env(tmp_path_factory: pytest.TempPathFactory, fakes: dict[str, FakeProvider],
                database_url: str, prefix: str) -> dict[str, str]:
    """This module's registry: ``fake`` (upstream a, the conftest's two workers), ``pb`` (b) and ``pc``
    (c, no worker: nothing may reach it; a job moved there by ``stranded`` waits in its queue)."""
    config: Path = tmp_path_factory.mktemp("config") / "registry.yaml"
    config.write_text(registry_yaml(fakes))
    return {**os.environ, "REDIS_URL": TEST_REDIS_URL, "DATABASE_URL": database_url,
            "GATEWAY_CONFIG": str(config), "GATEWAY_KEY_PREFIX": prefix, "GATEWAY_AUTH": "off",
            "GATEWAY_MAX_WAIT": "20", "GATEWAY_MAX_WAIT_LIMIT": "60",
            "GATEWAY_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT), "GATEWAY_ADMIN_KEY": ADMIN,
            "FAKE_API_KEY": "sk-fake-upstream", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def pb_worker(worker_factory: WorkerFactory) -> Iterator[Process]:
    proc = worker_factory.start("pb", "pb1")
    yield proc
    stop_all([proc])


@pytest.fixture(autouse=True)
def _fresh(fakes: dict[str, FakeProvider], prefix: str) -> None:
    """Healthy upstreams and closed breakers at the start of each test."""
    for fake in fakes.values():
        if fake.proc is None:
            restart(fake)
        fake.reset()
    close_breakers(prefix)


def close_breakers(prefix: str) -> None:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    for key in client.scan_iter(f"{prefix}:brk:*"):
        client.delete(key)
    client.close()


def chat(api, model: str, content: str, **extra) -> requests.Response:
    return requests.post(f"{api.url}/v1/chat/completions", timeout=60,
                         json={"model": model, "messages": [{"role": "user", "content": content}], **extra})


def breaker(prefix: str, deployment: str) -> dict[str, str]:
    client = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=True)
    try:
        return client.hgetall(f"{prefix}:brk:{deployment}")
    finally:
        client.close()


def view_of(api) -> dict:
    return requests.get(f"{api.url}/admin/routing", headers={"Authorization": f"Bearer {ADMIN}"},
                        timeout=10).json()


def test_a_deployment_killed_mid_run_loses_no_call(api, pb_worker, fakes, db):
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(chat, api, "duo", f"call {i}") for i in range(60)]
        wait_until(lambda: sum(f.done() for f in futures) >= 15, 60)
        fakes["a"].stop()
        answers = [f.result() for f in futures]
    assert [r.status_code for r in answers] == [200] * 60, [r.text for r in answers if r.status_code != 200]
    assert [r.json()["choices"][0]["message"]["content"] for r in answers] == [f"echo: call {i}"
                                                                             for i in range(60)]
    served = Counter(r.headers["x-gateway-deployment"] for r in answers)
    assert served["fake/fake-model"] > 0 and served["pb/fake-model"] > 0, served
    moved = [r for r in answers if r.json()["x-gateway"]["attempts"] > 1]
    assert all(r.headers["x-gateway-deployment"] == "pb/fake-model" for r in moved)
    # a move ends its attempt cleanly: never billed as an attempt lost with a dead worker (such a row
    # would be on the usage stream before its job's success row, which has arrived once this passes)
    ids = [r.headers["x-gateway-job-id"] for r in answers]
    wait_until(lambda: db.execute("SELECT count(*) FROM usage WHERE outcome = 'success' AND job_id = ANY(%s)",
                                  (ids,)).fetchone()[0] == 60, 40)
    assert db.execute("SELECT count(*) FROM usage WHERE outcome = 'attempt_lost'").fetchone()[0] == 0


def test_the_breaker_opens_once_for_every_worker_process(api, pb_worker, fakes, prefix, start_worker):
    start_worker("fake", "third")   # three processes call upstream a
    fakes["a"].configure(fail_next={"count": 10_000, "status": 503})
    concurrency, calls = 6, 40
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda i: chat(api, "firstcheap", f"call {i}"), range(calls)))
    assert [r.status_code for r in answers] == [200] * calls
    assert {r.headers["x-gateway-deployment"] for r in answers} == {"pb/fake-model"}
    state = breaker(prefix, "fake/fake-model")
    assert state["state"] == "open"
    # without the breaker: every call tries a twice (max_retries 1) = 80. With it: the failures that
    # opened it, the calls already in flight then (at most one per caller), and one per probe after
    # each open period (each failed probe reopened it: 'opened' counts them)
    reached = fakes["a"].stats()["calls"]
    assert reached <= FAILURES + concurrency + PROBES * (int(state["opened"]) - 1), (reached, state)


def test_an_open_breaker_half_opens_and_a_good_probe_closes_it(api, pb_worker, fakes, prefix):
    fakes["a"].configure(fail_next={"count": 10_000, "status": 503})
    for i in range(4):
        assert chat(api, "firstcheap", f"fail {i}").status_code == 200
    assert breaker(prefix, "fake/fake-model")["state"] == "open"
    fakes["a"].reset()   # upstream a recovers
    assert view_of(api)["deployments"]["fake/fake-model"]["breaker"] == "open"
    wait_until(lambda: view_of(api)["deployments"]["fake/fake-model"]["breaker"] == "half_open", OPEN_S + 5)
    answer = chat(api, "firstcheap", "probe")
    assert answer.status_code == 200 and answer.headers["x-gateway-deployment"] == "fake/fake-model"
    assert breaker(prefix, "fake/fake-model")["state"] == "closed"
    assert chat(api, "firstcheap", "after").headers["x-gateway-deployment"] == "fake/fake-model"


def test_a_429_moves_to_a_deployment_that_starts_sooner(api, pb_worker, fakes):
    fakes["a"].configure(fail_next={"count": 1, "status": 429, "retry_after": 15})
    started = time.monotonic()
    answer = chat(api, "firstcheap", "rate limited on a")
    assert answer.status_code == 200 and answer.headers["x-gateway-deployment"] == "pb/fake-model"
    assert "after upstream_rate_limited" in answer.headers["x-gateway-routing-decision"]
    assert time.monotonic() - started < 10   # it did not wait out a's Retry-After


def test_a_rejected_credential_marks_the_deployment_and_moves_on(api, pb_worker, fakes, prefix):
    fakes["a"].configure(fail_next={"count": 1, "status": 401})
    answer = chat(api, "firstcheap", "wrong key on a")
    assert answer.status_code == 200 and answer.headers["x-gateway-deployment"] == "pb/fake-model"
    assert answer.headers["x-gateway-attempts"] == "2"
    state = breaker(prefix, "fake/fake-model")
    assert (state["state"], state["reason"]) == ("open", "misconfigured")
    assert fakes["a"].stats()["calls"] == 1   # never retried there


def test_a_request_goes_to_the_deployment_whose_context_fits(api, pb_worker, fakes):
    long = " ".join(["word"] * 200)   # over pc's 64-token window
    answer = chat(api, "ctx", long)
    assert answer.status_code == 200 and answer.headers["x-gateway-deployment"] == "pb/fake-model"
    assert fakes["c"].stats()["calls"] == 0
    too_big = chat(api, "ctx", "hello", max_tokens=200_000)
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "context_length_exceeded"


def test_a_stream_failing_before_its_first_token_fails_over(api, pb_worker, fakes):
    fakes["a"].configure(fail_next={"count": 2, "status": 503})   # both tries on a (max_retries 1)
    response = chat(api, "firstcheap", "five words stream fine", stream=True)
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    assert text == "echo: five words stream fine"
    assert response.text.rstrip().endswith("data: [DONE]")
    assert fakes["a"].stats()["calls"] == 2 and fakes["b"].stats()["calls"] == 1


def sse_chunks(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("include_usage", [False, True], ids=["plain", "include-usage"])
def test_a_stream_says_where_it_ran_in_its_headers_and_last_chunk(api, pb_worker, fakes, include_usage):
    fakes["a"].configure(fail_next={"count": 2, "status": 503})   # fails over before its first token
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    response = chat(api, "firstcheap", "where did I run", stream=True, **extra)
    assert response.status_code == 200
    # the headers: where the job was when the stream started (after its first chunk: final)
    assert response.headers["x-gateway-deployment"] == "pb/fake-model"
    assert response.headers["x-gateway-provider"] == "pb"
    assert " after " in response.headers["x-gateway-routing-decision"]   # it moved
    assert response.headers["x-gateway-fallback-used"] == "false"
    chunks = sse_chunks(response.text)
    last = chunks[-1]
    assert [c for c in chunks if "x-gateway" in c] == [last]       # only the last chunk carries it
    routing = last["x-gateway"]
    assert routing["job_id"] == response.headers["x-gateway-job-id"]
    assert (routing["deployment"], routing["provider"], routing["attempts"], routing["fallback_used"]) == (
        "pb/fake-model", "pb", 3, False)
    assert routing["routing_decision"] == response.headers["x-gateway-routing-decision"]
    if include_usage:   # the usage chunk is the last one, as OpenAI sends it
        assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
    else:               # the chunk with the finish_reason, still the last one as OpenAI sends it
        assert last["choices"][0]["finish_reason"] == "stop" and "usage" not in last
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "echo: where did I run"


def test_a_moved_async_job_reports_where_it_is_now(api, pb_worker, fakes, db, prefix):
    # a 401 on a moves the job to pb, which answers: the row says pb
    fakes["a"].configure(fail_next={"count": 1, "status": 401})
    job = requests.post(f"{api.url}/v1/jobs", timeout=10, json={
        "model": "firstcheap", "messages": [{"role": "user", "content": "async and moved"}]}).json()
    assert job["provider"] == "fake"
    wait_until(lambda: requests.get(f"{api.url}/v1/jobs/{job['id']}", timeout=10).json()["status"]
               == "succeeded", 30)
    done = requests.get(f"{api.url}/v1/jobs/{job['id']}", timeout=10).json()
    assert done["provider"] == "pb" and done["result"]["choices"][0]["message"]["content"] == \
        "echo: async and moved"

    # moved to pc, whose queue no worker serves: queued there, and its line position is pc's
    close_breakers(prefix)   # the 401 marked a misconfigured: routing would skip it
    fakes["a"].configure(fail_next={"count": 1, "status": 401})
    stuck = requests.post(f"{api.url}/v1/jobs", timeout=10, json={
        "model": "stranded", "messages": [{"role": "user", "content": "moved to nowhere"}]}).json()
    assert stuck["provider"] == "fake"

    def moved() -> bool:
        return requests.get(f"{api.url}/v1/jobs/{stuck['id']}", timeout=10).json()["provider"] == "pc"

    wait_until(moved, 30)
    now = requests.get(f"{api.url}/v1/jobs/{stuck['id']}", timeout=10).json()
    assert now["status"] == "queued" and now["queue"]["position"] is None and now["queue"]["ahead"] >= 1
    row = db.execute("SELECT provider, model, status FROM jobs WHERE id = %s", (stuck["id"],)).fetchone()
    assert row == ("pc", "stranded", "queued")
    assert requests.delete(f"{api.url}/v1/jobs/{stuck['id']}", timeout=10).json()["status"] == "cancelled"


def test_a_sync_stream_that_moved_while_waiting_says_where_it_waits(api, fakes):
    fakes["a"].configure(fail_next={"count": 1, "status": 401})   # moved to pc: no worker, it waits there
    response = chat(api, "stranded", "waiting on pc", stream=True, max_wait=7)
    assert response.status_code == 200   # the stream started while it waited (after HOLD_S)
    assert response.headers["x-gateway-provider"] == "pc"
    assert response.headers["x-gateway-deployment"] == "pc/fake-model"
    assert "after" in response.headers["x-gateway-routing-decision"]
    last = response.text.strip().splitlines()[-1]
    assert '"queue_timeout"' in last, response.text


STREAM_BREAKS = [
    # (protocol, path, extra body, how its stream says "error", what a clean end would look like)
    ("openai", "/v1/chat/completions", {}, lambda t: '"error"' in t.strip().splitlines()[-1], "data: [DONE]"),
    ("anthropic", "/v1/messages", {"max_tokens": 50}, lambda t: "event: error" in t, "message_stop"),
    ("ollama", "/api/chat", {}, lambda t: "error" in json.loads(t.strip().splitlines()[-1]), '"done": true'),
]


@pytest.mark.parametrize("path,extra,is_error,clean_end", [c[1:] for c in STREAM_BREAKS],
                         ids=[c[0] for c in STREAM_BREAKS])
def test_a_stream_broken_after_its_first_token_ends_with_an_error_event(api, pb_worker, fakes, path,
                                                                         extra, is_error, clean_end):
    body = {"model": "duo", "stream": True, **extra,
            "messages": [{"role": "user", "content": "drop: some words here"}]}
    response = requests.post(f"{api.url}{path}", json=body, timeout=60)
    assert response.status_code == 200
    text = response.text
    assert "echo" in text or "drop" in text    # output started
    assert is_error(text), text
    assert clean_end not in text.replace('"done":true', '"done": true'), text
    calls = fakes["a"].stats()["calls"] + fakes["b"].stats()["calls"]
    assert calls == 1   # never retried or moved once output started


def test_the_routing_view_is_for_admins(api):
    assert requests.get(f"{api.url}/admin/routing", timeout=10).status_code == 401
    view = requests.get(f"{api.url}/admin/routing", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert view.status_code == 200
    body = view.json()
    assert body["models"]["duo"]["deployments"] == ["fake/fake-model", "pb/fake-model"]
    entry = body["deployments"]["pb/fake-model"]
    assert {"breaker", "error_rate", "latency_ms", "waiting", "start_in_s", "limits"} <= set(entry)


def test_when_every_deployment_is_out_a_call_waits_for_the_first_probe(api, pb_worker, fakes, prefix):
    for fake in (fakes["a"], fakes["b"]):
        fake.configure(fail_next={"count": 10_000, "status": 503})
    first = chat(api, "firstcheap", "both down")   # both tried: nothing is left, the caller gets the 5xx
    assert first.status_code == 502 and first.headers["x-gateway-job-id"]
    wait_until(lambda: chat(api, "firstcheap", "both down again") is not None and all(
        breaker(prefix, d).get("state") == "open" for d in ("fake/fake-model", "pb/fake-model")), 30)
    for fake in (fakes["a"], fakes["b"]):
        fake.reset()   # both recover; their breakers do not know yet
    states = {d: e["breaker"] for d, e in view_of(api)["deployments"].items() if d != "pc/fake-model"}
    answer = chat(api, "firstcheap", "wait for the probe")
    assert "closed" not in states.values(), states
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == \
        "echo: wait for the probe"


def test_a_success_is_recorded_after_its_answer(api, fakes, prefix):
    """The caller's answer comes first; the success's bookkeeping follows in one round trip
    (workers/aftercall.py): the breaker's count and latency average, /health's count, the alias's TTFT."""
    client = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=True)
    ttft_key = f"{prefix}:routing:ttft"
    client.hdel(ttft_key, "firstcheap")
    counted = requests.get(f"{api.url}/health", timeout=10).json()["providers"]["fake"]["attempts"]
    fakes["a"].configure(latency_ms=60)
    answer = chat(api, "firstcheap", "count me")
    assert answer.status_code == 200 and answer.headers["x-gateway-deployment"] == "fake/fake-model"
    wait_until(lambda: breaker(prefix, "fake/fake-model").get("calls") == "1", 10)
    state = breaker(prefix, "fake/fake-model")
    assert state.get("state", "closed") == "closed" and float(state["err"]) == 0 and float(state["lat"]) >= 60
    wait_until(lambda: requests.get(f"{api.url}/health", timeout=10).json()["providers"]["fake"]["attempts"]
               == counted + 1, 10)
    wait_until(lambda: client.hget(ttft_key, "firstcheap") is not None, 10)
    assert float(client.hget(ttft_key, "firstcheap").split()[0]) >= 60
    client.close()
