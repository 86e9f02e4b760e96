"""Metric label values are bounded: whatever a caller sends, a label takes one of a known set of
values (common/observability/labels.py); log lines render as JSON or text with their fields."""

from __future__ import annotations

import json
import logging

import pytest

from common.contract import JobSpec, Kind, Mode
from common.errors import ExceedsLimit, GatewayError, QueueTimeout, UpstreamRejected, UpstreamTimeout
from common.observability.labels import (
    NONE,
    OTHER,
    bounded,
    error_codes,
    error_label,
    key_label,
    status_class,
)
from common.observability.logs import JsonFormatter, TextFormatter
from common.settings import SettingsError, load_settings

MODELS = frozenset({"gpt-4o-mini", "claude-haiku", "fake-model"})


@pytest.mark.parametrize(("value", "expected"), [
    ("gpt-4o-mini", "gpt-4o-mini"),
    ("fake-model", "fake-model"),
    ("GPT-4O-MINI", OTHER),                       # aliases are exact
    ("no-such-model", OTHER),
    ("x" * 10_000, OTHER),
    ("gpt-4o-mini\n{evil=\"1\"}", OTHER),
    ("\u2603", OTHER),
    ("", NONE),
    (None, NONE),
], ids=["known", "known-2", "case-differs", "unknown", "huge", "injection", "unicode", "empty", "absent"])
def test_model_names_outside_the_registry_collapse_to_one_value(value, expected):
    assert bounded(value, MODELS) == expected


def test_any_number_of_junk_names_makes_one_label_value():
    assert {bounded(f"junk-{i}", MODELS) for i in range(1000)} == {OTHER}


@pytest.mark.parametrize(("status", "expected"), [
    (200, "2xx"), (202, "2xx"), (301, "3xx"), (404, "4xx"), (429, "4xx"), (499, "4xx"), (500, "5xx"),
    (504, "5xx"), (100, "1xx"), (99, OTHER), (600, OTHER), (-1, OTHER), (0, OTHER),
], ids=lambda v: str(v))
def test_status_classes(status, expected):
    assert status_class(status) == expected


@pytest.mark.parametrize(("error", "expected"), [
    (None, NONE),
    (QueueTimeout("waited"), "queue_timeout"),
    (UpstreamTimeout("slow"), "upstream_timeout"),
    (ExceedsLimit("big", code="request_exceeds_tpm"), "request_exceeds_limit"),   # its class's code
    (UpstreamRejected("no", code="context_length_exceeded"), "upstream_rejected"),  # an upstream's own code
    (GatewayError("bare"), OTHER),
], ids=["none", "ours", "upstream", "instance-code", "upstream-code", "no-code"])
def test_error_labels_are_our_codes(error, expected):
    assert error_label(error) == expected


def test_error_codes_come_from_the_hierarchy():
    assert {"queue_timeout", "upstream_timeout", "invalid_api_key", "internal_error"} <= error_codes()
    assert all(code.isidentifier() for code in error_codes())


@pytest.mark.parametrize(("key_id", "opted_in", "expected"), [
    ("key_abc123", False, None),
    ("key_abc123", True, "key_abc123"),
    ("anonymous", True, "anonymous"),
    (None, True, NONE),
    ("key with spaces", True, OTHER),
    ("k" * 65, True, OTHER),
], ids=["off", "on", "anonymous", "no-key", "odd", "too-long"])
def test_api_keys_are_labels_only_when_the_operator_opts_in(key_id, opted_in, expected):
    assert key_label(key_id, opted_in) == expected


def _record(fields: dict | None) -> logging.LogRecord:
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "request %s", ("done",), None)
    if fields is not None:
        record.fields = fields
    return record


@pytest.mark.parametrize("fields", [None, {"request_id": "req_1", "status": 200, "duration_ms": 1.5},
                                    {"msg": "not overwritten", "text": "a \"quoted\"\nline"}],
                         ids=["plain", "fields", "awkward"])
def test_json_lines_parse_and_carry_their_fields(fields):
    line = JsonFormatter().format(_record(fields))
    assert "\n" not in line
    parsed = json.loads(line)
    assert (parsed["msg"], parsed["level"], parsed["logger"]) == ("request done", "info", "gateway.access")
    for key, value in (fields or {}).items():
        if key != "msg":
            assert parsed[key] == value


def test_text_lines_append_fields_to_the_base_format():
    base = logging.Formatter("[%(levelname)s] %(message)s")
    line = TextFormatter(base).format(_record({"job_id": "job_1", "model": "fake model", "skip": None}))
    assert line == '[INFO] request done job_id=job_1 model="fake model"'


@pytest.mark.parametrize(("env", "problem"), [
    ({"GATEWAY_LOG_FORMAT": "xml"}, "GATEWAY_LOG_FORMAT"),
    ({"GATEWAY_LOG_LEVEL": "loud"}, "GATEWAY_LOG_LEVEL"),
    ({"GATEWAY_METRICS_KEY_LABELS": "maybe"}, "GATEWAY_METRICS_KEY_LABELS"),
    ({"GATEWAY_WORKER_METRICS_PORT": "-1"}, "GATEWAY_WORKER_METRICS_PORT"),
], ids=["format", "level", "key-labels", "port"])
def test_bad_observability_settings_name_their_variable(env, problem):
    with pytest.raises(SettingsError, match=problem):
        load_settings(env)


def test_observability_settings_defaults_and_overrides():
    default = load_settings({}).observability
    assert (default.log_format, default.log_level, default.metrics, default.metrics_dir) == ("json", "INFO",
                                                                                           True, None)
    assert not default.log_content and not default.metrics_key_labels and default.otlp_endpoint is None
    given = load_settings({"GATEWAY_LOG_FORMAT": "TEXT", "GATEWAY_LOG_LEVEL": "debug",
                           "PROMETHEUS_MULTIPROC_DIR": "/tmp/m", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                           "GATEWAY_METRICS": "off"}).observability
    seen = (given.log_format, given.log_level, str(given.metrics_dir), given.otlp_endpoint, given.metrics)
    assert seen == ("text", "DEBUG", "/tmp/m", "http://c:4318", False)


@pytest.mark.parametrize("trace", [None, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
                         ids=["untraced", "traced"])
def test_the_trace_context_rides_in_the_job_spec(trace):
    spec = JobSpec(Mode.SYNC, Kind.CHAT, "m", "p", {"messages": []}, "key_1", trace=trace)
    assert JobSpec.parse(spec.to_json(), 1.0).trace == trace
    assert ("trace" in spec.to_json()) is (trace is not None)   # untraced specs are as before


def _exposed(name: str) -> dict[tuple[tuple[str, str], ...], float]:
    from prometheus_client.parser import text_string_to_metric_families

    from common.observability.metrics import exposition

    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(exposition(None).decode())
            for s in family.samples if s.name == name}


def test_the_hooks_for_other_branches_bound_their_labels_too():
    from common.observability import hooks

    providers, models = {"openai", "anthropic"}, {"gpt-4o-mini"}
    hooks.breaker_state("openai", "open", providers)
    hooks.breaker_state("made-up", "open", providers)
    for reason in ("breaker_open", "whatever\n"):
        hooks.fallback("gpt-4o-mini", "openai", "anthropic", reason, models=models, providers=providers)
    hooks.cache_lookup("junk-model", True, models)
    hooks.budget_remaining("team-a", 12.5, {"team-a"})
    assert _exposed("gateway_breaker_state")[(("provider", "openai"),)] == 2
    assert _exposed("gateway_breaker_state")[(("provider", OTHER),)] == 2
    reasons = {dict(labels)["reason"] for labels in _exposed("gateway_fallbacks_total")}
    assert reasons == {"breaker_open", OTHER}
    assert _exposed("gateway_cache_lookups_total")[(("model", OTHER), ("result", "hit"))] >= 1
    assert _exposed("gateway_budget_remaining_usd")[(("budget", "team-a"),)] == 12.5
