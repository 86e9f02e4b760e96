"""The worker's per-attempt log line (workers/observe.py): its fields, the provider's key scrubbed from
any message, prompts and answers only when GATEWAY_LOG_CONTENT is on."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from common.contract import JobSpec, Kind, Mode
from common.errors import UpstreamUnavailable
from common.observability.logs import UPSTREAM, JsonFormatter
from common.settings import load_settings
from common.types import ChatResponse, Usage
from workers.observe import WorkerObserver
from workers.policy import Action, Decision

UPSTREAM_SECRET = "sk-upstream-secret-123456"
PROMPT = "the private prompt"


def _observer_and_job(content: bool) -> tuple[WorkerObserver, SimpleNamespace]:
    env = {"OPENAI_API_KEY": UPSTREAM_SECRET, "GATEWAY_LOG_CONTENT": "on" if content else "off"}
    settings = load_settings(env)
    model = settings.registry.models["gpt-4o-mini"]
    spec = JobSpec(Mode.SYNC, Kind.CHAT, "gpt-4o-mini", "openai",
                   {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}, "key_1")
    provider = settings.registry.provider_of(model)
    job = SimpleNamespace(job_id="job_1", spec=spec, model=model, provider=provider)
    return WorkerObserver(settings), job


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [JsonFormatter().format(r) for r in caplog.records if r.name == UPSTREAM]


@pytest.mark.parametrize("content", [False, True], ids=["default", "content-on"])
def test_attempt_lines_scrub_the_key_and_hold_content_only_on_request(caplog, content):
    observer, job = _observer_and_job(content)
    caplog.set_level(logging.INFO, logger=UPSTREAM)
    observer.delivered(job.job_id)
    observer.timed(job, lambda: None)()
    error = UpstreamUnavailable(f"upstream said: bad key {UPSTREAM_SECRET}")
    observer.attempt(job, 1, error=error, then=Decision(Action.RETRY, 0.5))
    answer = ChatResponse(body={"choices": [{"message": {"content": "the private answer"}}]},
                          usage=Usage(prompt_tokens=3, completion_tokens=4))
    observer.attempt(job, 2, response=answer)
    failed, ok = caplog.records[-2:]
    assert failed.levelname == "WARNING" and ok.levelname == "INFO"
    assert failed.fields["then"] == "retry in 0.50s" and failed.fields["outcome"] == "upstream_unavailable"
    assert ok.fields["input_tokens"] == 3 and ok.fields["output_tokens"] == 4 and ok.fields["try"] == 2
    text = "\n".join(_lines(caplog))
    assert UPSTREAM_SECRET not in text and "***" in text
    assert (PROMPT in text) is content and ("the private answer" in text) is content
