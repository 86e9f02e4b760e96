"""Pure pieces of the API and workers: max_wait parsing, error round-trips, auth, upstream errors."""

import json
from typing import Any

import pytest
from urllib3 import HTTPHeaderDict

from api.auth import Authenticator
from api.gateway import parse_max_wait
from common.apikeys import hash_secret
from common.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    JobTimeout,
    QueueTimeout,
    UpstreamCredentialsRejected,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from workers.adapters.openai import error_for, retry_after_seconds

MAX_WAITS = [
    ("default", None, 30.0),
    ("number", 5, 5.0),
    ("string-header", "2.5", 2.5),
    ("at-limit", 60, 60.0),
]


@pytest.mark.parametrize("raw,expected", [c[1:] for c in MAX_WAITS], ids=[c[0] for c in MAX_WAITS])
def test_max_wait_accepted(raw, expected):
    assert parse_max_wait(raw, 30.0, 60.0) == expected


@pytest.mark.parametrize("raw", ["soon", 0, -1, 61, float("nan"), float("inf"), True, [1]],
                         ids=["word", "zero", "negative", "above-limit", "nan", "inf", "bool", "list"])
def test_max_wait_rejected(raw):
    with pytest.raises(InvalidRequest) as err:
        parse_max_wait(raw, 30.0, 60.0)
    assert err.value.param == "max_wait"


@pytest.mark.parametrize("error", [
    QueueTimeout("waited", retry_after=7),
    UpstreamRejected("bad", status=422),
    UpstreamCredentialsRejected("down"),
    JobTimeout("the job did not finish"),
], ids=["queue-timeout", "rejected-422", "auth-failed", "job-timeout"])
def test_errors_cross_the_queue_intact(error):
    back = GatewayError.from_dict(error.to_dict())
    assert type(back) is type(error)
    assert (back.status, back.code, back.message, back.retry_after) == (
        error.status, error.code, error.message, error.retry_after)


def _body(raw: bytes) -> Any:
    """An error body as the adapter hands it to ``error_for``: its JSON, or None."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


UPSTREAM = [
    ("429-retry-after", 429, b'{"error":{"message":"slow down"}}', {"Retry-After": "3"},
     UpstreamRateLimited, 429),
    ("429-retry-after-ms", 429, b"{}", {"retry-after-ms": "1500", "Retry-After": "9"},
     UpstreamRateLimited, 429),
    ("400-passes-through", 400, b'{"error":{"message":"bad param"}}', {}, UpstreamRejected, 400),
    ("422-passes-through", 422, b'{"error":"unprocessable"}', {}, UpstreamRejected, 422),
    ("401-is-the-operators-problem", 401, b'{"error":{"message":"Incorrect API key sk-abc"}}', {},
     UpstreamCredentialsRejected, 502),
    ("500", 500, b"oops", {}, UpstreamUnavailable, 502),
    ("504", 504, b"", {}, UpstreamTimeout, 504),
]


@pytest.mark.parametrize("status,body,headers,kind,client_status", [c[1:] for c in UPSTREAM],
                         ids=[c[0] for c in UPSTREAM])
def test_upstream_errors_map_to_ours(status, body, headers, kind, client_status):
    error = error_for("openai", status, HTTPHeaderDict(headers), _body(body))
    assert type(error) is kind and error.status == client_status
    assert "sk-abc" not in error.message  # upstream credential errors never echo key material


def test_retry_after_prefers_milliseconds():
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_seconds({}) is None


def test_auth_modes():
    keys = {hash_secret("sk-good"): "key_1"}
    assert Authenticator("off", lambda: keys).authenticate({}) is None
    assert Authenticator("auto", dict).authenticate({}) is None  # no keys yet: open
    auto = Authenticator("auto", lambda: keys)
    assert auto.authenticate({"Authorization": "Bearer sk-good"}) == "key_1"
    assert auto.authenticate({"x-api-key": "sk-good"}) == "key_1"
    assert auto.authenticate({"x-goog-api-key": "sk-good"}) == "key_1"  # Gemini's header
    assert auto.authenticate({}, query_key="sk-good") == "key_1"  # Gemini's ?key=
    assert auto.authenticate({"x-api-key": "sk-good"}, query_key="sk-bad") == "key_1"  # a header comes first
    with pytest.raises(AuthenticationFailed, match="missing"):
        auto.authenticate({})
    with pytest.raises(AuthenticationFailed, match="invalid"):
        auto.authenticate({"Authorization": "Bearer sk-bad"})
    with pytest.raises(AuthenticationFailed):
        Authenticator("required", dict).authenticate({"Authorization": "Bearer sk-good"})


DURATIONS = [("seconds", "1s", 1.0), ("minutes-seconds", "6m0s", 360.0), ("millis", "120ms", 0.12),
             ("fraction", "1.5s", 1.5), ("hours", "1h2m", 3720.0), ("garbage", "soon", None),
             ("empty", "", None)]


@pytest.mark.parametrize("text,seconds", [c[1:] for c in DURATIONS], ids=[c[0] for c in DURATIONS])
def test_openai_reset_durations(text, seconds):
    from workers.adapters.openai import parse_duration

    assert parse_duration(text) == seconds


QUOTA = [
    ("nothing-spent", {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "1s"}, 0.0),
    ("requests-spent", {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}, 2.0),
    ("tokens-spent-longer", {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s",
                             "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    ("spent-unreadable-reset", {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "?"}, 1.0),
    ("no-headers", {}, 0.0),
]


@pytest.mark.parametrize("headers,seconds", [c[1:] for c in QUOTA], ids=[c[0] for c in QUOTA])
def test_quota_exhaustion_from_rate_limit_headers(headers, seconds):
    from workers.adapters.openai import quota_exhausted_for

    assert quota_exhausted_for(HTTPHeaderDict(headers)) == seconds
