"""A seeded, bounded fuzzer against every ingress endpoint of the real API.

Valid bodies are mutated (deep nesting, huge and non-finite numbers, NUL and lone surrogates, wrong
types, fields that would steer the upstream, truncation), sent with odd headers and content types, and
odd paths and job ids are requested. Every answer must be a non-5xx JSON document in the caller's
protocol's shape, and the gateway must still serve a normal call afterwards. ``FUZZ_SEED`` and
``FUZZ_COUNT`` (environment) replay or widen a run.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.integration.test_hostile_input import anthropic_shaped, ollama_shaped, openai_shaped

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("FUZZ_SEED", "20261130"))
COUNT = int(os.environ.get("FUZZ_COUNT", "800"))

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "fuzz"}], "max_tokens": 5,
        "temperature": 0.5}
VALID: dict[str, tuple[dict[str, Any], Callable[[Any], bool]]] = {
    "/v1/chat/completions": (CHAT, openai_shaped),
    "/v1/embeddings": ({"model": "fake-model", "input": ["a", "b"]}, openai_shaped),
    "/v1/jobs": (CHAT, openai_shaped),
    "/v1/messages": ({"model": "fake-model", "max_tokens": 5, "system": "s",
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "fuzz"}]}]},
                     anthropic_shaped),
    "/v1/messages/count_tokens": ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}]},
                                  anthropic_shaped),
    "/api/chat": ({"model": "fake-model", "stream": False, "options": {"num_predict": 5},
                   "messages": [{"role": "user", "content": "fuzz"}]}, ollama_shaped),
    "/api/generate": ({"model": "fake-model", "prompt": "fuzz", "stream": False}, ollama_shaped),
    "/api/embed": ({"model": "fake-model", "input": "fuzz"}, ollama_shaped),
    "/api/show": ({"model": "fake-model"}, ollama_shaped),
}
STEERING = ["api_key", "base_url", "api_base", "provider", "extra_headers", "extra_query", "organization"]
ODD_VALUES: list[Any] = [None, True, -1, 0, 2**63, -(2**63) - 1, 1e308, -0.0, "", "x" * 5000, [], {}, [[[]]],
                         {"a": {"b": {}}}, "\u202e", "\U0001F600"]
RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "9" * 400, '"\\u0000"', '"\\ud800"', '"\\udfff x"',
              "[" * 2000 + "]" * 2000, '{"a":' * 500 + "1" + "}" * 500]
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                 "application/json; charset=latin-1", ""]  # a malformed header: test_hostile_input
ODD_PATHS = ["/v1/jobs/%00", "/v1/jobs/%ff", "/v1/jobs/" + "a" * 2000, "/v1/jobs/..%2f", "/v1/models/%00",
             "/v1/models/" + "%e2%80%ae" * 10, "/api/pull", "/v1/chat/completions/x", "/%", "/v1//jobs",
             "/api/tags?x=%00", "/health?%zz"]


def mutate_value(rng: random.Random, value: Any) -> str:
    """A JSON text: ``value`` with one part replaced by something odd (raw, possibly invalid JSON)."""
    marker = "\u2063FUZZ\u2063"
    doc = json.loads(json.dumps(value))
    paths: list[tuple[Any, Any]] = []
    stack = [doc]
    while stack:
        item = stack.pop()
        keys = list(item) if isinstance(item, dict) else range(len(item)) if isinstance(item, list) else []
        for key in keys:
            paths.append((item, key))
            stack.append(item[key])
    container, key = rng.choice(paths)
    choice = rng.random()
    if choice < 0.45:
        container[key] = marker
        return json.dumps(doc).replace(json.dumps(marker), rng.choice(RAW_TOKENS))
    if choice < 0.8:
        container[key] = rng.choice(ODD_VALUES)
    elif choice < 0.9:
        doc[rng.choice(STEERING)] = rng.choice(["https://evil.example", {"x-api-key": "k"}, 1])
    else:
        doc[rng.choice(["max_wait", "max_tokens", "temperature", "n", "stream"])] = rng.choice(ODD_VALUES)
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.05:
        text = text[: rng.randrange(len(text))]  # truncated
    return text


def case(rng: random.Random) -> tuple[str, str, bytes, dict[str, str], Callable[[Any], bool]]:
    """(method, path, body, headers, shape check) for one fuzzed request."""
    if rng.random() < 0.08:
        path = rng.choice(ODD_PATHS)
        return "GET", path, b"", {}, ollama_shaped if path.startswith("/api/") else openai_shaped
    path = rng.choice(list(VALID))
    valid, shaped = VALID[path]
    headers = {"content-type": rng.choice(CONTENT_TYPES)}
    if rng.random() < 0.1:
        headers[rng.choice(["x-gateway-max-wait", "x-request-id", "anthropic-version"])] = rng.choice(
            ["-1", "nan", "inf", "9" * 400, "1e999", "", "x" * 200, "0x10"])
    if rng.random() < 0.1:
        headers["Authorization"] = rng.choice(["Bearer", "Bearer ", "Basic x", "Bearer " + "k" * 3000])
    body = mutate_value(rng, valid).encode("utf-8", "surrogatepass")
    if rng.random() < 0.03:
        body = body.replace(b"fuzz", b"\xff\xfe")  # invalid UTF-8
    return "POST", path, body, headers, shaped


def test_fuzzed_requests_never_get_a_5xx(api, fake):
    rng = random.Random(SEED)
    cases = [case(rng) for _ in range(COUNT)]
    session_local = requests.Session

    def send(item: tuple[str, str, bytes, dict[str, str], Callable[[Any], bool]]) -> str | None:
        method, path, body, headers, shaped = item
        with session_local() as http:
            try:
                r = http.request(method, f"{api.url}{path}", data=body, headers=headers, timeout=60)
            except requests.RequestException as exc:
                return f"{method} {path} {body[:120]!r}: {exc}"
        problem = None
        if r.status_code >= 500:
            problem = f"status {r.status_code}"
        elif r.status_code >= 400:  # a success may be a stream (NDJSON, SSE); an error is one JSON document
            try:
                problem = None if shaped(r.json()) else "not in the caller's shape"
            except ValueError:
                problem = "not JSON"
        return None if problem is None else f"{method} {path} {body[:200]!r} → {problem}: {r.text[:300]}"

    with ThreadPoolExecutor(8) as pool:
        failures = [f for f in pool.map(send, cases) if f]
    assert not failures, f"{len(failures)} of {COUNT} (seed {SEED}):\n" + "\n".join(failures[:20])

    r = requests.post(f"{api.url}/v1/chat/completions", json={"model": "fake-model", "messages": [
        {"role": "user", "content": "still alive"}]}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: still alive"
