"""The instrumentation's own CPU per call, in-process: what the API records for one request (metrics in
multiprocess mode + one JSON ``gateway.access`` line) and what a worker records for one job (queue wait,
one attempt's metrics and JSON ``gateway.upstream`` line, the settle's counters). Lines go to
/dev/null; metrics to a temporary PROMETHEUS_MULTIPROC_DIR. A machine's load barely moves this number.

    .venv/bin/python bench/observability_micro.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-micro-")  # before any metric


def main(argv: list[str] | None = None) -> int:
    from flask import Flask, Response, g

    from api.observe import ApiObserver, _seen
    from common.contract import JobSpec, JobState, Kind, Mode, Result
    from common.observability.logs import configure_logging
    from common.settings import load_settings
    from common.types import ChatResponse, Usage
    from workers.observe import WorkerObserver
    from workers.settle import Settlement
    from workers.usage import UsageRecord

    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=20000)
    n = p.parse_args(argv).calls
    settings = load_settings({"GATEWAY_LOG_FORMAT": "json",
                              "PROMETHEUS_MULTIPROC_DIR": os.environ["PROMETHEUS_MULTIPROC_DIR"]})
    configure_logging(settings.observability)
    app = Flask(__name__)
    api = ApiObserver(settings, app)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - for the run
    headers = {"x-gateway-provider": "mock", "x-gateway-model": "mock-1", "x-gateway-job-id": "job_1",
               "x-gateway-queue-wait-ms": "1", "x-gateway-cost-usd": "0"}
    with app.test_request_context("/v1/chat/completions", method="POST"):
        g.request_id, g.api_key_id, g.obs_model, g.obs_job_id = "req_1", "key_1", "mock-1", "job_1"
        g.obs_outcome = {"queue_wait_ms": 1, "upstream_latency_ms": 2}
        response = Response(b"{}", headers=headers, mimetype="application/json")
        t0 = time.process_time()
        for _ in range(n):
            api.record(response, _seen(time.perf_counter()))
        api_us = 1e6 * (time.process_time() - t0) / n

    worker = WorkerObserver(settings)
    model = settings.registry.models["mock-1"]
    job = SimpleNamespace(spec=JobSpec(Mode.SYNC, Kind.CHAT, "mock-1", "mock", {"messages": []}, "key_1"),
                          model=model, provider=settings.registry.provider_of(model), job_id="")
    answer = ChatResponse(body={"choices": [{"finish_reason": "stop"}]},
                          usage=Usage(prompt_tokens=10, completion_tokens=20))
    usage = UsageRecord("c", "j", "key_1", "mock-1", "mock", "mock-1", 10, 20, Decimal("0.001"), 1, 2,
                        "success", 200)
    settlement = Settlement(JobState.SUCCEEDED, Result(answer.body, {}), usage)
    t0 = time.process_time()
    for i in range(n):
        job.job_id = f"job_{i}"
        worker.delivered(job.job_id)
        worker.started(job, 0.001)
        worker.timed(job, lambda: None)()
        worker.attempt(job, 1, response=answer)
        worker.settled(job.job_id, job.spec, settlement)
    worker_us = 1e6 * (time.process_time() - t0) / n
    print(f"| API, per request | {api_us:.0f} µs |\n| worker, per job (one attempt) | {worker_us:.0f} µs |\n"
          f"| total per call | {api_us + worker_us:.0f} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
