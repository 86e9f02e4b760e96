"""The built-in ``mock`` provider: deterministic answers with no network and no key.

It answers ``"mock: <last user message>"`` and counts tokens as whitespace-separated words, so a
fresh install works end to end and tests can predict every byte.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator, Mapping
from typing import Any

from common.errors import UpstreamError
from common.registry import Model, Provider
from common.types import ChatRequest, ChatResponse, EmbeddingsRequest, Usage
from workers.adapters import _http as http
from workers.adapters._http import HttpClient


def count_words(text: str) -> int:
    return max(1, len(text.split()))


class MockAdapter:
    def __init__(self, provider: Provider, session: HttpClient) -> None:
        self.provider = provider

    def map_error(self, status: int, headers: Mapping[str, str], data: Any) -> UpstreamError:
        """Never needed (the mock makes no HTTP call); here because every adapter maps errors."""
        return http.status_error(self.provider.name, status, str(data)[:200])

    def stream(self, request: ChatRequest, model: Model) -> Iterator[dict[str, Any]]:
        """The same answer, one chunk per word, then the finish and usage chunks (OpenAI's order)."""
        answer = self.complete(request, model).body
        base = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
                "model": answer["model"]}
        words = answer["choices"][0]["message"]["content"].split(" ")
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            yield {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield {**base, "choices": [], "usage": answer["usage"]}

    def embed(self, request: EmbeddingsRequest, model: Model) -> ChatResponse:
        """A deterministic unit vector of 8 floats per input, from the SHA-256 of its text."""
        texts = request.texts()
        data = [{"object": "embedding", "index": i, "embedding": _vector(text)}
                for i, text in enumerate(texts)]
        tokens = sum(count_words(t) for t in texts)
        return ChatResponse(body={"object": "list", "data": data, "model": model.model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                            usage=Usage(prompt_tokens=tokens))

    def complete(self, request: ChatRequest, model: Model) -> ChatResponse:
        last_user = next((m.text() for m in reversed(request.messages) if m.role == "user"), "")
        content = f"mock: {last_user}"
        prompt_tokens = sum(count_words(m.text()) for m in request.messages)
        completion_tokens = count_words(content)
        body = {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        return ChatResponse(body=body,
                            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    values = [b / 255.0 - 0.5 for b in digest[:8]]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]
