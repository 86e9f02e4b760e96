"""A 200 is an answer only if it holds one, and token counts are billable numbers: tables of real
payload shapes per provider kind (no I/O — the HTTP side is in tests/integration/test_upstream_answers.py)."""

from __future__ import annotations

from typing import Any

import pytest

from common.errors import UpstreamBadResponse
from common.protocols import anthropic, gemini, ollama
from common.types import MAX_CALL_TOKENS, Usage, sane_token_count
from workers.adapters import _http as http
from workers.adapters import openai

OPENAI_OK = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}
ANTHROPIC_OK = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 5, "output_tokens": 1},
}
OLLAMA_OK = {
    "model": "llama3.2",
    "created_at": "2025-01-01T00:00:00Z",
    "message": {"role": "assistant", "content": "hi"},
    "done": True,
    "done_reason": "stop",
    "prompt_eval_count": 5,
    "eval_count": 1,
}
GEMINI_OK = {
    "candidates": [
        {"content": {"role": "model", "parts": [{"text": "hi"}]}, "finishReason": "STOP", "index": 0}
    ],
    "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1, "totalTokenCount": 6},
    "modelVersion": "gemini-2.5-flash",
    "responseId": "r1",
}

OPENAI_ERROR = {
    "error": {
        "message": "The server had an error while processing your request.",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}
ANTHROPIC_ERROR = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
OLLAMA_ERROR = {"error": "model runner has unexpectedly stopped"}
GEMINI_ERROR = {"error": {"code": 500, "message": "An internal error has occurred.", "status": "INTERNAL"}}

ERROR_MESSAGE = {
    "openai": openai.upstream_error_message,
    "anthropic": anthropic.upstream_error_message,
    "ollama": ollama.upstream_error_message,
    "gemini": gemini.upstream_error_message,
}

# id, kind, body of a 200, what the error says (None: it is an answer)
ANSWER_OBJECTS = [
    ("openai-answer", "openai", OPENAI_OK, None),
    ("openai-error-body", "openai", OPENAI_ERROR, "The server had an error"),
    ("openai-error-null-is-fine", "openai", {**OPENAI_OK, "error": None}, None),
    ("anthropic-answer", "anthropic", ANTHROPIC_OK, None),
    ("anthropic-error-body", "anthropic", ANTHROPIC_ERROR, "Overloaded"),
    ("ollama-answer", "ollama", OLLAMA_OK, None),
    ("ollama-error-body", "ollama", OLLAMA_ERROR, "unexpectedly stopped"),
    ("gemini-answer", "gemini", GEMINI_OK, None),
    ("gemini-error-body", "gemini", GEMINI_ERROR, "internal error"),
    ("gemini-array-is-no-object", "gemini", [GEMINI_OK], "not a JSON object"),
    ("null-body", "openai", None, "not a JSON object"),
]


@pytest.mark.parametrize(
    ("kind", "body", "error"), [r[1:] for r in ANSWER_OBJECTS], ids=[r[0] for r in ANSWER_OBJECTS]
)
def test_a_200_error_body_is_a_bad_response(kind: str, body: Any, error: str | None) -> None:
    if error is None:
        assert http.answer_object("up", body, ERROR_MESSAGE[kind]) is body
    else:
        with pytest.raises(UpstreamBadResponse, match=error):
            http.answer_object("up", body, ERROR_MESSAGE[kind])


# id, kind, answer body, what is missing (None: a whole answer)
ANSWERS = [
    ("openai-answer", "openai", OPENAI_OK, None),
    ("openai-empty-choices", "openai", {**OPENAI_OK, "choices": []}, "without choices"),
    (
        "openai-no-choices",
        "openai",
        {k: v for k, v in OPENAI_OK.items() if k != "choices"},
        "without choices",
    ),
    ("openai-choices-not-a-list", "openai", {**OPENAI_OK, "choices": {"0": {}}}, "without choices"),
    (
        "openai-choice-without-message",
        "openai",
        {**OPENAI_OK, "choices": [{"index": 0, "finish_reason": "stop"}]},
        "without a message",
    ),
    ("anthropic-answer", "anthropic", ANTHROPIC_OK, None),
    ("anthropic-empty-content-is-an-answer", "anthropic", {**ANTHROPIC_OK, "content": []}, None),
    (
        "anthropic-no-content",
        "anthropic",
        {k: v for k, v in ANTHROPIC_OK.items() if k != "content"},
        "without content",
    ),
    ("ollama-answer", "ollama", OLLAMA_OK, None),
    (
        "ollama-no-message",
        "ollama",
        {k: v for k, v in OLLAMA_OK.items() if k != "message"},
        "without a message",
    ),
    ("gemini-answer", "gemini", GEMINI_OK, None),
    (
        "gemini-no-candidates",
        "gemini",
        {"usageMetadata": {"promptTokenCount": 5}, "modelVersion": "g"},
        "without candidates",
    ),
    ("gemini-empty-candidates", "gemini", {**GEMINI_OK, "candidates": []}, "without candidates"),
    (
        "gemini-blocked-prompt-is-an-answer",
        "gemini",
        {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 5}},
        None,
    ),
]


def read_answer(kind: str, body: dict[str, Any]) -> None:
    if kind == "openai":
        problem = openai.completion_problem(body)
        if problem:
            raise UpstreamBadResponse(problem)
    else:
        {"anthropic": anthropic, "ollama": ollama, "gemini": gemini}[kind].from_upstream(body)


@pytest.mark.parametrize(("kind", "body", "missing"), [r[1:] for r in ANSWERS], ids=[r[0] for r in ANSWERS])
def test_a_200_without_an_answer_is_a_bad_response(
    kind: str, body: dict[str, Any], missing: str | None
) -> None:
    if missing is None:
        read_answer(kind, body)
    else:
        with pytest.raises(UpstreamBadResponse, match=missing):
            read_answer(kind, body)


EMBEDDINGS = [
    (
        "answer",
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        },
        None,
    ),
    ("empty-data", {"object": "list", "data": [], "usage": {}}, "without data"),
    ("no-data", {"object": "list", "usage": {}}, "without data"),
]


@pytest.mark.parametrize(("body", "missing"), [r[1:] for r in EMBEDDINGS], ids=[r[0] for r in EMBEDDINGS])
def test_an_embeddings_answer_needs_data(body: dict[str, Any], missing: str | None) -> None:
    problem = openai.embeddings_problem(body)
    assert problem is None if missing is None else missing in str(problem)


# id, what the upstream reported, what is billed
COUNTS = [
    ("plain", 42, 42),
    ("zero", 0, 0),
    ("missing", None, 0),
    ("negative", -5, 0),
    ("huge", 3_000_000_000, MAX_CALL_TOKENS),
    ("beyond-bigint", 10**20, MAX_CALL_TOKENS),
    ("the-ceiling-itself", MAX_CALL_TOKENS, MAX_CALL_TOKENS),
    ("float", 12.0, 12),
    ("numeric-string", "17", 17),
    ("text", "many", 0),
    ("nan", float("nan"), 0),
    ("infinity", float("inf"), 0),
    ("bool", True, 0),
    ("list", [1], 0),
]


@pytest.mark.parametrize(("reported", "billed"), [c[1:] for c in COUNTS], ids=[c[0] for c in COUNTS])
def test_token_counts_are_clamped_to_billable_numbers(reported: Any, billed: int) -> None:
    assert sane_token_count(reported) == billed
    usage = Usage.model_validate({"prompt_tokens": reported, "completion_tokens": reported})
    assert (usage.prompt_tokens, usage.completion_tokens) == (billed, billed)


def test_an_insane_count_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    Usage(prompt_tokens=-5, completion_tokens=1)
    assert [r.getMessage() for r in caplog.records] == ["upstream reported prompt_tokens=-5: billed as 0"]


USAGE_OF = [
    ("openai", OPENAI_OK, (5, 1)),
    ("openai-negative", {**OPENAI_OK, "usage": {"prompt_tokens": -3, "completion_tokens": 2}}, (0, 2)),
    ("openai-usage-not-an-object", {**OPENAI_OK, "usage": "lots"}, (0, 0)),
    (
        "anthropic-huge",
        {**ANTHROPIC_OK, "usage": {"input_tokens": 5, "output_tokens": 3_000_000_000}},
        (5, MAX_CALL_TOKENS),
    ),
    ("ollama-negative", {**OLLAMA_OK, "prompt_eval_count": -1}, (0, 1)),
    (
        "gemini-huge",
        {**GEMINI_OK, "usageMetadata": {"promptTokenCount": 4_000_000_000, "candidatesTokenCount": 1}},
        (MAX_CALL_TOKENS, 1),
    ),
]


@pytest.mark.parametrize(
    ("kind", "body", "billed"), [(r[0].split("-")[0], *r[1:]) for r in USAGE_OF], ids=[r[0] for r in USAGE_OF]
)
def test_every_kind_bills_clamped_counts(kind: str, body: dict[str, Any], billed: tuple[int, int]) -> None:
    if kind == "openai":
        usage = openai.usage_of(body)
    else:
        usage = {"anthropic": anthropic, "ollama": ollama, "gemini": gemini}[kind].from_upstream(body).usage
    assert (usage.prompt_tokens, usage.completion_tokens) == billed
