"""Metrics, JSON logs and traces from the real processes: an API (keys required, JSON logs, traces to a
tiny OTLP/HTTP receiver in this test) and a worker on ``llm.fake``, sharing one metrics directory.

* ``/metrics`` moves by exactly the calls made, on the API's side and the worker's;
* every log line of ours is JSON, one per request and one per upstream attempt, and no log holds the
  client's key, the upstream's key or a prompt;
* a call's trace: the API's span, the worker's ``chat {model}`` span with GenAI attributes, and its
  queue / admission / upstream children, in one trace.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Api, Process, WorkerFactory, free_port, kill_all, wait_until
from tests.integration.test_auth import cli

pytestmark = pytest.mark.integration

PROMPT = "observability probe with a private prompt"
UPSTREAM_KEY = "sk-fake-upstream"


class OtlpReceiver:
    """Accepts OTLP/HTTP protobuf trace exports at ``/v1/traces`` and keeps the spans."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                export = ExportTraceServiceRequest.FromString(body)
                for resource in export.resource_spans:
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            receiver.spans.append(_span(span))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _span(span: Any) -> dict[str, Any]:
    def value(v: Any) -> Any:
        kind = v.WhichOneof("value")
        if kind == "array_value":
            return [value(x) for x in v.array_value.values]
        return getattr(v, kind)
    return {"name": span.name, "trace": span.trace_id.hex(), "id": span.span_id.hex(),
            "parent": span.parent_span_id.hex(), "kind": span.kind,
            "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
            "attributes": {a.key: value(a.value) for a in span.attributes}}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    otlp = OtlpReceiver()
    yield otlp
    otlp.server.shutdown()


@pytest.fixture(scope="module")
def env(gateway_env: dict[str, str], receiver: OtlpReceiver) -> dict[str, str]:
    return {**gateway_env, "GATEWAY_AUTH": "required", "GATEWAY_LOG_FORMAT": "json",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}


@pytest.fixture(scope="module")
def stack(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, Process]]:
    logs = tmp_path_factory.mktemp("obs")
    worker = WorkerFactory(env, logs).spawn("fake", "obs")
    server = Api(env, logs / "api.log").launch()
    try:
        WorkerFactory.wait_ready(worker)
        server.wait_ready()
        yield server, worker
    finally:
        server.kill()
        kill_all([worker])


@pytest.fixture(scope="module")
def secret(env: dict[str, str], stack: tuple[Api, Process]) -> str:
    return cli(env, "keys", "create", "--name", "obs").strip().splitlines()[-1]


def scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = requests.get(f"{api.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there are none yet)."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


def call(api: Api, secret: str, content: str, *, model: str = "fake-model", stream: bool = False,
         request_id: str | None = None, traceparent: str | None = None) -> requests.Response:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    headers = {"authorization": f"Bearer {secret}"}
    if request_id:
        headers["x-request-id"] = request_id
    if traceparent:
        headers["traceparent"] = traceparent
    return requests.post(f"{api.url}/v1/chat/completions", json=body, headers=headers, timeout=30,
                         stream=stream)


def _stream_usage(response: requests.Response) -> dict[str, int]:
    usage: dict[str, int] = {}
    for line in response.iter_lines():
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
    return usage


def test_metrics_move_by_exactly_the_calls_made(stack, secret):
    api, _ = stack
    before = scrape(api)
    usages = []
    for i in range(3):
        r = call(api, secret, f"{PROMPT} {i}")
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    streamed = call(api, secret, PROMPT, stream=True)
    assert streamed.status_code == 200
    usages.append(_stream_usage(streamed))
    failed = call(api, secret, "status:503 fail twice")   # max_retries 1: two attempts, then 502
    assert failed.status_code == 502, failed.text
    junk = call(api, secret, "hi", model="no-such-model-\u2603")
    assert junk.status_code == 404

    ok = dict(protocol="openai", model="fake-model")
    requests_before = get(before, "gateway_requests_total", **ok)
    wait_until(lambda: get(scrape(api), "gateway_requests_total", **ok) - requests_before >= 5, 10)
    after = scrape(api)

    def delta(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    # API side
    assert delta("gateway_requests_total", **ok, status_class="2xx") == 4
    assert delta("gateway_requests_total", **ok, status_class="5xx") == 1
    assert delta("gateway_request_errors_total", **ok, code="upstream_unavailable") == 1
    # the junk name never becomes a label value: no job was made for it, so no model
    assert delta("gateway_requests_total", protocol="openai", model="none", status_class="4xx") == 1
    assert not any("no-such-model" in str(labels) for _, labels in after)
    assert delta("gateway_request_duration_seconds_count", **ok) == 5
    assert delta("gateway_overhead_seconds_count", protocol="openai") == 3   # non-streamed successes
    # worker side
    fake = dict(provider="fake", model="fake-model")
    assert delta("gateway_upstream_attempts_total", **fake, outcome="success") == 4
    assert delta("gateway_upstream_attempts_total", **fake, outcome="upstream_unavailable") == 2
    assert delta("gateway_retries_total", **fake) == 1
    assert delta("gateway_upstream_duration_seconds_count", **fake) == 6
    assert delta("gateway_queue_wait_seconds_count", **fake) == 5
    assert delta("gateway_time_to_first_token_seconds_count", **fake) == 1
    assert delta("gateway_jobs_finished_total", **fake, state="succeeded") == 4
    assert delta("gateway_jobs_finished_total", **fake, state="failed") == 1
    assert delta("gateway_tokens_total", **fake, direction="input") == sum(u["prompt_tokens"] for u in usages)
    assert delta("gateway_tokens_total", **fake, direction="output") == sum(u["completion_tokens"]
                                                                           for u in usages)
    # priced 1.0 / 2.0 USD per million tokens (conftest's registry)
    cost = sum(u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0 for u in usages) / 1e6
    assert delta("gateway_cost_usd_total", **fake) == pytest.approx(cost)
    # read from Redis at scrape time
    assert get(after, "gateway_queue_depth", provider="fake") == 0
    assert ("gateway_line_length", (("provider", "fake"),)) in after
    assert get(after, "gateway_limit", scope="limited", limit="concurrency") == 2


def _lines(proc: Process) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]


def test_logs_are_json_one_line_per_request_and_attempt_and_hold_no_secret(stack, secret):
    api, worker = stack
    r = call(api, secret, f"{PROMPT} logged", request_id="req-obs-1")
    assert r.status_code == 200
    job_id = r.headers["x-gateway-job-id"]
    assert call(api, secret, "status:503 logged failure", request_id="req-obs-2").status_code == 502
    assert api.process is not None

    def access(request_id: str) -> list[dict[str, Any]]:
        return [x for x in _lines(api.process) if x.get("request_id") == request_id]
    wait_until(lambda: access("req-obs-2"), 10)
    [line] = access("req-obs-1")
    assert line["logger"] == "gateway.access" and line["level"] == "info"
    assert line["status"] == 200 and line["job_id"] == job_id and line["model"] == "fake-model"
    assert line["provider"] == "fake" and line["key_id"].startswith("key_") and line["duration_ms"] > 0
    assert [x["status"] for x in access("req-obs-2")] == [502]

    attempts = [x for x in _lines(worker) if x.get("logger") == "gateway.upstream"]
    [ok] = [x for x in attempts if x.get("job_id") == job_id]
    assert ok["outcome"] == "success" and ok["try"] == 1 and ok["input_tokens"] > 0
    assert ok["provider"] == "fake" and ok["key_id"] == line["key_id"] and ok["latency_ms"] >= 0
    failed_job = access("req-obs-2")[0]["job_id"]
    failures = [x for x in attempts if x.get("job_id") == failed_job]
    assert [(x["level"], x["try"], x["outcome"]) for x in failures] == [
        ("warning", 1, "upstream_unavailable"), ("warning", 2, "upstream_unavailable")]
    assert failures[0]["msg"].startswith("upstream attempt failed: provider=fake model=fake-model")
    assert failures[-1]["then"] == "giving up"

    for proc in (api.process, worker):
        text = proc.output()
        assert secret not in text and UPSTREAM_KEY not in text
        assert PROMPT not in text   # prompts are logged only with GATEWAY_LOG_CONTENT=on


def test_a_call_is_one_trace_with_genai_spans(stack, secret, receiver):
    api, _ = stack
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = call(api, secret, f"{PROMPT} traced", traceparent=f"00-{caller_trace}-00f067aa0ba902b7-01")
    assert r.status_code == 200
    job_id = r.headers["x-gateway-job-id"]

    def chat_span() -> dict[str, Any] | None:
        found = [s for s in receiver.spans if s["attributes"].get("gateway.job_id") == job_id
                 and s["name"].startswith("chat ")]
        return found[0] if found else None
    wait_until(lambda: chat_span() is not None and any(
        s["attributes"].get("gateway.job_id") == job_id and s["kind"] == 2 for s in receiver.spans), 15)
    chat = chat_span()
    assert chat is not None
    assert chat["name"] == "chat fake-model" and chat["kind"] == 3   # CLIENT
    attrs = chat["attributes"]
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "fake-model" and attrs["gen_ai.response.model"] == "fake-model"
    assert attrs["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"]
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    [server] = [s for s in receiver.spans
                if s["kind"] == 2 and s["attributes"].get("gateway.job_id") == job_id]
    assert server["name"] == "POST /v1/chat/completions" and server["trace"] == chat["trace"]
    assert server["trace"] == caller_trace and server["parent"] == "00f067aa0ba902b7"   # the caller's trace
    assert chat["parent"] == server["id"]   # the context crossed to the worker in the job's spec
    wait_until(lambda: {s["name"] for s in receiver.spans if s["parent"] == chat["id"]}
               >= {"queue", "admission", "upstream fake"}, 10)
    children = [s for s in receiver.spans if s["parent"] == chat["id"]]
    assert all(chat["start"] <= s["start"] <= s["end"] <= chat["end"] for s in children)


def test_a_worker_host_without_an_api_serves_its_own_metrics(env, stack, secret, tmp_path):
    api, _ = stack
    assert call(api, secret, "counted").status_code == 200
    port = free_port()
    worker = WorkerFactory({**env, "GATEWAY_WORKER_METRICS_PORT": str(port)}, tmp_path).start("fake", "own")
    try:
        def served() -> str:
            try:
                return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except requests.ConnectionError:
                return ""
        wait_until(served, 15)
        # the host's directory: the other processes' samples too (this one has run nothing yet)
        served_now = parse(served())
        assert get(served_now, "gateway_upstream_attempts_total", provider="fake", outcome="success") >= 1
    finally:
        kill_all([worker])
