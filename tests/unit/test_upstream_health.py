"""The pure parts of common/upstream_health.py: an upstream error's status class, scrubbing a message,
and the one word /health says about a provider."""

from __future__ import annotations

import pytest

from common.errors import (
    UpstreamBadResponse,
    UpstreamCredentialsRejected,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from common.upstream_health import MESSAGE_LIMIT, provider_status, scrub, status_class


@pytest.mark.parametrize(
    ("error", "label"),
    [
        (UpstreamCredentialsRejected("401"), "credentials_rejected"),
        (UpstreamBadResponse("no choices"), "bad_response"),
        (UpstreamStreamBroken("cut"), "stream_broken"),
        (UpstreamUnavailable("cannot reach x"), "unavailable"),
        (UpstreamTimeout("slow"), "timeout"),
        (UpstreamRateLimited("429", retry_after=1), "rate_limited"),
        (UpstreamRejected("bad field", status=422), "rejected"),
        (UpstreamError("other"), "error"),
    ],
    ids=["401-403", "bad-200", "stream-broken", "5xx-or-refused", "timeout", "429", "4xx", "unknown"],
)
def test_status_class_of_each_upstream_error(error, label):
    assert status_class(error) == label


@pytest.mark.parametrize(
    ("message", "secret", "expect"),
    [
        ("Incorrect API key provided: sk-abc123", "sk-abc123", "Incorrect API key provided: ***"),
        ("cannot reach openai", "sk-abc123", "cannot reach openai"),
        ("cannot reach openai", None, "cannot reach openai"),
        ("a" * 1000, None, "a" * MESSAGE_LIMIT),
    ],
    ids=["key-cut-out", "no-key-in-it", "provider-without-key", "shortened"],
)
def test_scrub_cuts_the_key_and_the_length(message, secret, expect):
    assert scrub(message, secret) == expect


CRED = {"at": 100.0, "status_class": "credentials_rejected", "message": "401"}
DOWN = {"at": 100.0, "status_class": "unavailable", "message": "cannot reach"}


@pytest.mark.parametrize(
    ("attempts", "errors", "last_error", "last_ok_at", "status"),
    [
        (0, 0, None, None, "ok"),
        (10, 0, None, 99.0, "ok"),
        (10, 1, DOWN, 120.0, "degraded"),
        (10, 5, DOWN, 120.0, "failing"),
        (3, 3, CRED, None, "credentials_rejected"),
        (3, 3, CRED, 50.0, "credentials_rejected"),
        (10, 1, CRED, 150.0, "degraded"),
        (0, 0, CRED, None, "credentials_rejected"),
    ],
    ids=["idle", "all-good", "some-errors", "half-failing", "key-rejected", "key-rejected-after-success",
         "key-fixed-since", "key-rejected-before-the-window"],
)
def test_provider_status(attempts, errors, last_error, last_ok_at, status):
    assert provider_status(attempts, errors, last_error, last_ok_at) == status
