"""Shared test configuration: where the real services are (override with TEST_REDIS_URL /
TEST_DATABASE_URL), and the suite's parallel run (pytest-xdist, ``addopts`` in pyproject.toml)."""

from __future__ import annotations

import os

import pytest

TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """pyproject's ``addopts`` spread the modules over pytest-xdist workers (``-n auto --dist loadfile``).
    Without xdist (``-p no:xdist``) pytest would reject those options; accepted here, they do nothing
    and the suite runs in one process (as ``-n 0`` does with xdist)."""
    if pluginmanager.has_plugin("xdist"):
        return
    group = parser.getgroup("xdist", "distributed testing (pytest-xdist is not loaded: ignored)")
    # a lowercase short option: pytest reserves those for plugins, so added as xdist itself adds it
    group._addoption("-n", "--numprocesses", dest="numprocesses", default=None, help="ignored")
    group.addoption("--dist", dest="dist", default="no", help="ignored")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` for a run of one test file is one process: no workers to start for it."""
    files = {str(arg).split("::")[0] for arg in config.args}
    return 0 if len(files) == 1 and next(iter(files)).endswith(".py") else None
