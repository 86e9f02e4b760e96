"""The worker command line the CLI builds from the settings."""

from __future__ import annotations

import argparse

import pytest

from common.settings import load_settings
from launcher.cli import worker_argv


def args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"provider": "mock", "concurrency": None, "name": "w1", "loglevel": "info",
                                 **overrides})


@pytest.mark.parametrize(("env", "events"), [({}, True), ({"GATEWAY_TASK_EVENTS": "off"}, False)])
def test_task_events_follow_the_setting(env, events):
    argv = worker_argv(load_settings(env), args())
    assert ("--task-events" in argv) is events
    assert argv[argv.index("--queues") + 1] == "llm.mock"
    assert argv[argv.index("--concurrency") + 1] == "256"  # the provider's pool


def test_an_unknown_provider_is_named():
    with pytest.raises(SystemExit, match="unknown provider 'nope'"):
        worker_argv(load_settings({}), args(provider="nope"))
