"""The model registry: parsing, credentials from the environment, routability, prices."""

from decimal import Decimal
from pathlib import Path

import pytest

from common.registry import Price, RegistryError, load_registry, parse_registry
from common.settings import DEFAULT_REGISTRY, SettingsError, load_settings, normalise_database_url

DOC = {
    "providers": {
        "openai": {"kind": "openai", "base_url": "https://api.openai.com/v1/",
                   "api_key_env": "OPENAI_API_KEY", "base_url_env": "OPENAI_BASE_URL"},
        "local": {"kind": "openai", "base_url_env": "LOCAL_URL", "requires_key": False},
        "mock": {"kind": "mock"},
    },
    "models": {
        "gpt": {"provider": "openai", "model": "gpt-4o-mini", "price": {"input": 0.15, "output": 0.6}},
        "loc": {"provider": "local", "model": "llama"},
        "m": {"provider": "mock", "model": "mock-1"},
    },
}

ROUTABILITY = [
    ("nothing-set", {}, {"openai": False, "local": False, "mock": True}),
    ("openai-key", {"OPENAI_API_KEY": "sk-x"}, {"openai": True, "local": False, "mock": True}),
    ("local-url-no-key-needed", {"LOCAL_URL": "http://h:8000/v1"},
     {"openai": False, "local": True, "mock": True}),
]


@pytest.mark.parametrize("env,expected", [c[1:] for c in ROUTABILITY], ids=[c[0] for c in ROUTABILITY])
def test_providers_are_routable_only_with_what_they_need(env, expected):
    registry = parse_registry(DOC, env)
    assert {name: p.routable for name, p in registry.providers.items()} == expected


def test_unroutable_reason_names_the_variable():
    registry = parse_registry(DOC, {})
    assert "OPENAI_API_KEY" in registry.providers["openai"].unroutable_reason
    assert "LOCAL_URL" in registry.providers["local"].unroutable_reason


def test_base_url_env_overrides_the_file_and_trailing_slash_is_dropped():
    registry = parse_registry(DOC, {"OPENAI_BASE_URL": "http://proxy:1/v1/"})
    assert registry.providers["openai"].base_url == "http://proxy:1/v1"
    assert parse_registry(DOC, {}).providers["openai"].base_url == "https://api.openai.com/v1"


def test_api_key_is_never_in_the_repr():
    registry = parse_registry(DOC, {"OPENAI_API_KEY": "sk-secret"})
    assert "sk-secret" not in repr(registry.providers["openai"])


BAD_DOCS = [
    ("not-a-mapping", [1], "mapping"),
    ("unknown-provider", {"providers": {}, "models": {"x": {"provider": "nope", "model": "y"}}},
     "unknown provider"),
    ("unknown-kind", {"providers": {"p": {"kind": "telepathy"}}, "models": {}}, "kind"),
    ("unknown-field", {"providers": {"p": {"kind": "mock", "colour": "red"}}, "models": {}}, "colour"),
    ("negative-price", {"providers": {"p": {"kind": "mock"}},
                        "models": {"x": {"provider": "p", "model": "y", "price": {"input": "abc"}}}},
     "input"),
    ("zero-rpm", {**DOC, "providers": {**DOC["providers"], "mock": {"kind": "mock", "limits": {"rpm": 0}}}},
     "rpm"),
    ("unknown-limit", {**DOC, "key_limits": {"*": {"rph": 5}}}, "rph"),
    ("key-limit-with-no-limit", {**DOC, "key_limits": {"key_a": {}}}, "key_limits.key_a sets no limit"),
    ("negative-tpd", {**DOC, "key_limits": {"key_a": {"tpd": -1}}}, "tpd"),
]


@pytest.mark.parametrize("doc,fragment", [c[1:] for c in BAD_DOCS], ids=[c[0] for c in BAD_DOCS])
def test_bad_registries_are_rejected_with_a_clear_error(doc, fragment):
    with pytest.raises(RegistryError) as err:
        parse_registry(doc, {})
    assert fragment in str(err.value)


def test_unreadable_and_invalid_yaml_files(tmp_path: Path):
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(tmp_path / "missing.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [unclosed")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry(bad, {})


PRICES = [
    ("zero", Price(), 1000, 1000, Decimal(0)),
    ("input-only", Price(input=Decimal("2.5")), 1_000_000, 0, Decimal("2.5")),
    ("both", Price(input=Decimal("0.15"), output=Decimal("0.6")), 1000, 500, Decimal("0.00045")),
    ("one-token", Price(input=Decimal(1), output=Decimal(2)), 1, 1, Decimal("0.000003")),
]


@pytest.mark.parametrize("price,prompt,completion,cost", [c[1:] for c in PRICES], ids=[c[0] for c in PRICES])
def test_cost_is_exact_decimal_per_million_tokens(price, prompt, completion, cost):
    assert price.cost(prompt, completion) == cost


def test_default_registry_loads_and_mock_is_always_routable():
    settings = load_settings({})
    assert settings.registry.models["mock-1"].provider == "mock"
    assert settings.routable_providers() == ["mock"]
    assert DEFAULT_REGISTRY.exists()


SETTINGS_ERRORS = [
    ("max-wait-not-number", {"GATEWAY_MAX_WAIT": "soon"}, "GATEWAY_MAX_WAIT"),
    ("max-wait-above-limit", {"GATEWAY_MAX_WAIT": "100", "GATEWAY_MAX_WAIT_LIMIT": "10"}, "GATEWAY_MAX_WAIT"),
    ("auth-mode", {"GATEWAY_AUTH": "maybe"}, "GATEWAY_AUTH"),
    ("negative-body", {"GATEWAY_MAX_BODY_BYTES": "-1"}, "GATEWAY_MAX_BODY_BYTES"),
    ("task-events-not-a-flag", {"GATEWAY_TASK_EVENTS": "sometimes"}, "GATEWAY_TASK_EVENTS"),
    ("reconcile-too-often", {"GATEWAY_RECONCILE_INTERVAL": "0"}, "GATEWAY_RECONCILE_INTERVAL"),
]


@pytest.mark.parametrize(("raw", "expected"), [(None, True), ("", True), ("on", True), ("1", True),
                                               ("off", False), ("OFF", False), ("0", False),
                                               ("false", False)])
def test_task_events_flag(raw, expected):
    assert load_settings({} if raw is None else {"GATEWAY_TASK_EVENTS": raw}).task_events is expected


@pytest.mark.parametrize("env,name", [c[1:] for c in SETTINGS_ERRORS], ids=[c[0] for c in SETTINGS_ERRORS])
def test_bad_settings_name_their_variable(env, name):
    with pytest.raises(SettingsError, match=name):
        load_settings(env)


def test_visibility_timeout_outlasts_max_wait_and_time_limit():
    settings = load_settings({"GATEWAY_MAX_WAIT_LIMIT": "100", "GATEWAY_TASK_TIME_LIMIT": "50"})
    assert settings.visibility_timeout > 150


@pytest.mark.parametrize("url,expected", [
    ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
    ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
], ids=["heroku-style", "plain", "already-explicit"])
def test_database_urls_are_normalised_to_psycopg3(url, expected):
    assert normalise_database_url(url) == expected


KEY_LIMITS = {"*": {"rpm": 60, "tpd": 100000}, "key_vip": {"concurrency": 8}}
KEY_LIMIT_CASES = [
    ("listed key: its own, not the default's", "key_vip", {"concurrency": 8}),
    ("unlisted key: the default", "key_other", {"rpm": 60, "tpd": 100000}),
    ("no key (auth off): the default", "-", {"rpm": 60, "tpd": 100000}),
]


@pytest.mark.parametrize("key,expected", [c[1:] for c in KEY_LIMIT_CASES],
                         ids=[c[0] for c in KEY_LIMIT_CASES])
def test_each_key_counts_against_its_own_limits_or_the_default(key, expected):
    registry = parse_registry({**DOC, "key_limits": KEY_LIMITS}, {})
    assert registry.limits_of_key(key).model_dump(exclude_none=True) == expected


def test_without_key_limits_keys_are_unlimited():
    assert not parse_registry(DOC, {}).limits_of_key("key_any").any
