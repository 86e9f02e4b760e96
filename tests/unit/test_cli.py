"""The worker command line the CLI builds from the settings."""

from __future__ import annotations

import argparse

import pytest

from common.settings import load_settings
from launcher.cli import describe_upstream, flower_argv, worker_argv


def args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"provider": "mock", "concurrency": None, "name": "w1", "loglevel": "info",
                                 **overrides})


@pytest.mark.parametrize(("env", "events"), [({}, True), ({"GATEWAY_TASK_EVENTS": "off"}, False)])
def test_task_events_follow_the_setting(env, events):
    argv = worker_argv(load_settings(env), args())
    assert ("--task-events" in argv) is events
    assert argv[argv.index("--queues") + 1] == "llm.mock"
    assert argv[argv.index("--concurrency") + 1] == "256"  # the provider's pool


@pytest.mark.parametrize(("env", "enabling"), [({}, True), ({"GATEWAY_TASK_EVENTS": "off"}, False)],
                         ids=["events-on", "events-off"])
def test_flower_turns_task_events_on_only_when_they_are_on(env, enabling):
    argv = flower_argv(load_settings(env), argparse.Namespace(port=None, public=False))
    assert ("--enable_events=False" not in argv) is enabling
    assert "--address=127.0.0.1" in argv


def test_an_unknown_provider_is_named():
    with pytest.raises(SystemExit, match="unknown provider 'nope'"):
        worker_argv(load_settings({}), args(provider="nope"))


@pytest.mark.parametrize(
    ("entry", "text"),
    [
        ({"status": "ok", "attempts": 0, "errors": 0, "window_s": 300, "last_error": None},
         "upstream ok (0 calls, 0 errors in 5 min)"),
        ({"status": "credentials_rejected", "attempts": 2, "errors": 2, "window_s": 300,
          "last_error": {"seconds_ago": 12.5, "status_class": "credentials_rejected", "message": "HTTP 401"}},
         "upstream credentials_rejected (2 calls, 2 errors in 5 min; last error 12.5 s ago: "
         "credentials_rejected: HTTP 401)"),
    ],
    ids=["idle", "key-rejected"],
)
def test_providers_describe_the_recent_upstream(entry, text):
    assert describe_upstream(entry) == text
