"""The gevent worker writes its INFO lines in batches (common/observability/logs.py, wired by
workers/observe.py): a held ``gateway.upstream`` line still reaches the worker's log on its own within
the batch delay, and a line held when a cold shutdown (SIGQUIT) begins is written before the exit
(workers/celery_tuning.py: write-through from ``worker_shutting_down``; today logging's own shutdown at
exit would write it too — the write-through keeps it so if the cold path ends in ``os._exit``)."""

from __future__ import annotations

import signal

import pytest
import requests

from tests.integration.conftest import Process, WorkerFactory, wait_until

pytestmark = pytest.mark.integration


def _attempt_lines(worker: Process, job_id: str) -> list[str]:
    """The job's ``gateway.upstream`` lines (the workers here log in text, Celery's format + fields)."""
    return [line for line in worker.output().splitlines()
            if "upstream attempt ok: provider=crashy" in line and f"job_id={job_id}" in line]


def _call(api) -> str:
    r = requests.post(f"{api.url}/v1/chat/completions", timeout=30,
                      json={"model": "crashy-model", "messages": [{"role": "user", "content": "log me"}]})
    assert r.status_code == 200, r.text
    return r.headers["x-gateway-job-id"]


def test_a_held_info_line_is_written_without_a_warning_or_an_exit(api, worker_factory: WorkerFactory):
    worker = worker_factory.start("crashy", "batched-lines")
    try:
        job_id = _call(api)
        wait_until(lambda: _attempt_lines(worker, job_id), 5)
        [line] = _attempt_lines(worker, job_id)
        assert "INFO" in line and "outcome=success" in line
    finally:
        worker.kill()


def test_a_cold_shutdown_writes_the_lines_it_held(api, worker_factory: WorkerFactory):
    worker = worker_factory.start("crashy", "cold-lines")
    try:
        job_ids = [_call(api) for _ in range(3)]
        worker.kill(signal.SIGQUIT)   # at once: the last line is likely still held (50 ms)
        assert all(len(_attempt_lines(worker, job_id)) == 1 for job_id in job_ids), worker.output()[-3000:]
    finally:
        worker.kill()
