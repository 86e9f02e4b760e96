"""Importing the gateway's modules changes nothing outside them: kombu stays as shipped and the
environment untouched until a worker's start-up installs what it needs, explicitly."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, os, pkgutil, importlib
before = dict(os.environ)
from kombu.transport import redis as kombu_redis
original = (kombu_redis.Channel._create_client, kombu_redis.Channel._get_pool)
import common, workers, workers.adapters, api
names = [m.name for pkg in (common, workers, workers.adapters, api)
         for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + ".")
         if m.name not in ("workers.worker", "api.wsgi")]  # entry points: building the app is their job
for name in names:
    importlib.import_module(name)
patched_on_import = (kombu_redis.Channel._create_client, kombu_redis.Channel._get_pool) != original
from workers import kombu_tuning
kombu_tuning.install()
patched_by_install = (kombu_redis.Channel._create_client, kombu_redis.Channel._get_pool) != original
print(json.dumps({"modules": len(names), "env_changed": sorted(set(os.environ.items()) ^ set(before.items())),
                  "patched_on_import": patched_on_import, "patched_by_install": patched_by_install}))
"""


def test_importing_every_module_has_no_side_effects():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["modules"] > 20
    assert report["env_changed"] == []
    assert (report["patched_on_import"], report["patched_by_install"]) == (False, True)


def test_counting_tokens_leaves_the_environment_alone():
    probe = (
        "import os; before = dict(os.environ)\n"
        "from common.registry import Model; from common.tokens import reservation\n"
        "from common.types import ChatRequest\n"
        "r = ChatRequest.model_validate({'model': 'a', 'messages': [{'role': 'user', 'content': 'hi'}]})\n"
        "reservation(r, Model(provider='p', model='gpt-4o')); print(dict(os.environ) == before)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "True"
