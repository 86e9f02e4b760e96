"""The job contract: every event and the spec survive the trip through Redis (JSON) unchanged."""

from __future__ import annotations

import json

import pytest

from common.contract import (
    TERMINAL,
    Cancelled,
    Chunk,
    Done,
    EventType,
    Expired,
    Failed,
    JobEvent,
    JobSpec,
    JobState,
    Kind,
    Mode,
    Result,
    Start,
    failure_state,
    parse_event,
    start_or_state,
    state_or_start,
    unrun_event,
)
from common.db import Job
from common.errors import ClientGone, JobTimeout, QueueTimeout, UpstreamRateLimited
from common.jobrows import spec_of
from common.registry import Limits
from common.types import ChatRequest, EmbeddingsRequest

CHUNK = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
EVENTS = [
    ("chunk", Chunk(CHUNK), None),
    ("first-chunk-saying-where-it-runs",
     Chunk(CHUNK, {"provider": "fake", "provider_model": "m", "deployment": "fake/m",
                   "routing_decision": "only", "fallback_used": False}), None),
    ("result", Result({"id": "r1", "choices": []}, {"provider": "fake", "cost_usd": "0.1"}),
     JobState.SUCCEEDED),
    ("done", Done({"provider": "fake"}, {"prompt_tokens": 2, "completion_tokens": 3}), JobState.SUCCEEDED),
    ("done-without-usage", Done({"provider": "fake"}), JobState.SUCCEEDED),
    ("error", Failed.of(UpstreamRateLimited("slow down", retry_after=3)), JobState.FAILED),
    ("expired", Expired("waited too long"), JobState.EXPIRED),
    ("cancelled", Cancelled(), JobState.CANCELLED),
]


def test_every_event_type_has_a_case():
    assert {type(e).type for _, e, _ in EVENTS} == set(EventType)


@pytest.mark.parametrize(("event", "state"), [c[1:] for c in EVENTS], ids=[c[0] for c in EVENTS])
def test_event_round_trips_through_json(event: JobEvent, state: JobState | None):
    back = parse_event(json.loads(event.to_json()))
    assert back == event and type(back) is type(event)
    assert back.to_dict()["type"] == type(event).type.value
    assert back.state == state and back.final == (state is not None)


def test_a_chunk_without_where_it_runs_carries_no_such_field():
    """Only a stream's first chunk says where it runs: the others stay as small as they were."""
    assert json.loads(Chunk(CHUNK).to_json()) == {"type": "chunk", "chunk": CHUNK}


def test_error_event_gives_back_the_error_class():
    error = Failed.of(QueueTimeout("waited", retry_after=7)).exception()
    assert type(error) is QueueTimeout and error.retry_after == 7


def test_unknown_event_type_is_refused():
    with pytest.raises(ValueError, match="unknown job event type"):
        parse_event({"type": "started"})


def _chat(text: str) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": text}]})


SPECS = [
    ("sync-chat", JobSpec.of(_chat("x"), mode=Mode.SYNC, model="m", provider="p", api_key_id="key_1"),
     Kind.CHAT),
    ("async-chat-anonymous",
     JobSpec.of(_chat("y"), mode=Mode.ASYNC, model="m", provider="p", api_key_id=None), Kind.CHAT),
    ("embeddings", JobSpec.of(EmbeddingsRequest.model_validate({"model": "e", "input": ["a", "b"]}),
                              mode=Mode.SYNC, model="e", provider="p", api_key_id="key_2"), Kind.EMBEDDINGS),
    ("own-key-limits", JobSpec.of(_chat("z"), mode=Mode.SYNC, model="m", provider="p", api_key_id="key_3",
                                  key_limits=Limits(concurrency=1, tpd=9)), Kind.CHAT),
]


@pytest.mark.parametrize(("spec", "kind"), [c[1:] for c in SPECS], ids=[c[0] for c in SPECS])
def test_spec_round_trips_with_its_deadline(spec: JobSpec, kind: Kind):
    back = JobSpec.parse(spec.to_json().encode(), 1234.5)
    assert back.kind is kind and back.mode is spec.mode
    assert back == JobSpec(spec.mode, kind, spec.model, spec.provider, spec.request, spec.api_key_id, 1234.5,
                           spec.key_limits)
    assert back.own_limits() == (None if spec.key_limits is None else Limits(**spec.key_limits))
    assert type(back.canonical_request()) is (EmbeddingsRequest if kind is Kind.EMBEDDINGS else ChatRequest)


STATES = [
    ("client-gone-cancels", ClientGone("left"), JobState.CANCELLED),
    ("timeout-fails", JobTimeout("slow"), JobState.FAILED),
]


@pytest.mark.parametrize(("error", "state"), [c[1:] for c in STATES], ids=[c[0] for c in STATES])
def test_failure_state(error, state):
    assert failure_state(error) is state


def test_unrun_events_and_terminal_states():
    assert isinstance(unrun_event(JobState.EXPIRED, "x"), Expired)
    assert isinstance(unrun_event(JobState.CANCELLED, "x"), Cancelled)
    assert {s for s in JobState if s.terminal} == TERMINAL == {JobState.SUCCEEDED, JobState.FAILED,
                                                               JobState.CANCELLED, JobState.EXPIRED}


ANSWERS = [
    # (id, text, as a claim's answer, as a job's state)
    ("run", "run", Start.RUN, Start.RUN),
    ("limited", "limited", Start.LIMITED, Start.LIMITED),
    ("busy", "busy", Start.BUSY, Start.BUSY),
    ("missing", "missing", Start.MISSING, Start.MISSING),
    ("settled", "succeeded", JobState.SUCCEEDED, JobState.SUCCEEDED),
    ("expired: by this claim / is expired", "expired", Start.EXPIRED, JobState.EXPIRED),
    ("cancelled", "cancelled", JobState.CANCELLED, JobState.CANCELLED),
]


@pytest.mark.parametrize(("text", "claim", "state"), [c[1:] for c in ANSWERS], ids=[c[0] for c in ANSWERS])
def test_claim_answers_and_states_parse(text, claim, state):
    assert start_or_state(text) is claim
    assert state_or_start(text) is state


@pytest.mark.parametrize("key_limits", [None, {"concurrency": 1}], ids=["registry-default", "own"])
def test_a_job_rebuilt_from_its_row_keeps_its_key_limits(key_limits):
    row = Job(id="job_1", api_key_id="key_1", model="m", provider="p", request={"model": "m"},
              key_limits=key_limits)
    spec = spec_of(row)
    assert spec.key_limits == key_limits and spec.api_key_id == "key_1"
