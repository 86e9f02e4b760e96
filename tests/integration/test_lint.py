"""The code base stays within its lint rules and type-checks: ruff (pyproject's [tool.ruff.lint], the
110-character line limit included) and mypy (pyproject's [tool.mypy]) over every package, as CI sees it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("command", [
    ["ruff", "check", "--no-cache", "."],
    ["mypy", "api", "common", "workers", "launcher"],
], ids=["ruff", "mypy"])
def test_clean(command: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
