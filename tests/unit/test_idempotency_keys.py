"""Idempotency-Key validation, body fingerprints and the endpoint/body check (api/idempotency.py)."""

from __future__ import annotations

import pytest

from api.idempotency import IdemCall, body_fingerprint, validate_key
from common.errors import IdempotencyConflict, InvalidRequest


@pytest.mark.parametrize(("raw", "valid"), [
    (None, True), ("a", True), ("x" * 255, True), ("retry 1/2: ~!@#$%^&*()", True),
    ("3f1c7d2a-8e0b-4c4e-9d6f-0a1b2c3d4e5f", True),
    ("", False), ("x" * 256, False), ("caf\u00e9", False), ("tab\tkey", False), ("nul\x00", False),
    ("del\x7f", False), ("line\nbreak", False),
], ids=["absent", "one-char", "255-chars", "punctuation", "uuid",
        "empty", "256-chars", "non-ascii", "tab", "nul", "del", "newline"])
def test_key_validation(raw: str | None, valid: bool) -> None:
    if valid:
        assert validate_key(raw) == raw
    else:
        with pytest.raises(InvalidRequest, match="Idempotency-Key"):
            validate_key(raw)


@pytest.mark.parametrize(("a", "b", "same"), [
    ({"model": "m", "n": 1}, {"n": 1, "model": "m"}, True),
    ({"x": [1, 2]}, {"x": [2, 1]}, False),
    ({"x": 1}, {"x": 1.0}, False),
    ({"x": "a"}, {"x": "a", "y": None}, False),
    ({"t": "caf\u00e9"}, {"t": "caf\u00e9"}, True),
    ({"nested": {"b": 1, "a": {"d": 2, "c": 3}}}, {"nested": {"a": {"c": 3, "d": 2}, "b": 1}}, True),
    ({"x": True}, {"x": 1}, False),
], ids=["key-order", "list-order", "int-vs-float", "extra-null", "unicode", "nested-order", "bool-vs-int"])
def test_body_fingerprint(a: object, b: object, same: bool) -> None:
    assert (body_fingerprint(a) == body_fingerprint(b)) is same
    assert len(body_fingerprint(a)) == 64


@pytest.mark.parametrize(("endpoint", "body", "error"), [
    ("/v1/jobs", {"a": 1}, None),
    ("/v1/chat/completions", {"a": 1}, "already used for /v1/chat/completions"),
    ("/v1/jobs", {"a": 2}, "different request body"),
], ids=["same", "other-endpoint", "other-body"])
def test_a_key_names_one_endpoint_and_one_body(endpoint: str, body: dict, error: str | None) -> None:
    call = IdemCall.of("k", None, "/v1/jobs", {"a": 1})
    assert call is not None and call.owner == "anonymous"
    if error is None:
        call.check(endpoint, body_fingerprint(body))
    else:
        with pytest.raises(IdempotencyConflict, match=error) as raised:
            call.check(endpoint, body_fingerprint(body))
        assert raised.value.status == 422


def test_no_header_means_no_idempotency() -> None:
    assert IdemCall.of(None, "key_1", "/v1/jobs", {}) is None
    call = IdemCall.of("k", "key_1", "/v1/jobs", {})
    assert call is not None and call.owner == "key_1"
