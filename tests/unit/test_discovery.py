"""How a CLI command finds Redis and Postgres: the environment's URLs, or the connection files of a
running ``up`` in the state directory (launcher/discovery.py). Files only; the live servers are in
tests/integration/test_embedded.py."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from common.settings import load_settings
from launcher.discovery import STORES, StoresNotFound, connection_record, resolve_stores

PG, PG_NORMAL = "postgresql://u:s3cr3t@127.0.0.1:2/g", "postgresql+psycopg://u:s3cr3t@127.0.0.1:2/g"
DEAD_PID = 99_999_999  # above any pid_max: no such process
OURS = psutil.Process().name()


def _write(state: Path, store: str, text: str) -> None:
    path = STORES[store].connection_file(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("env", "files", "needs", "expect"),
    [
        ({}, {}, (), {"redis_url": None, "database_url": None}),
        ({"REDIS_URL": "redis://env:6379/0", "DATABASE_URL": "postgresql://env/db"},
         {"redis": "redis://file/0"}, ("redis", "postgres"),
         {"redis_url": "redis://env:6379/0", "database_url": "postgresql+psycopg://env/db"}),
        ({}, {"redis": "redis://:s3cr3t@127.0.0.1:1/0", "postgres": PG},
         ("redis", "postgres"),
         {"redis_url": "redis://:s3cr3t@127.0.0.1:1/0", "database_url": PG_NORMAL}),
        ({"REDIS_URL": "redis://env/0"}, {"postgres": PG},
         ("redis", "postgres"),
         {"redis_url": "redis://env/0", "database_url": PG_NORMAL}),
        ({}, {"postgres": "postgresql://u:s3cr3t@h/g"}, ("postgres",),
         {"redis_url": None, "database_url": "postgresql+psycopg://u:s3cr3t@h/g"}),
    ],
    ids=["nothing-needed", "environment-wins", "both-from-up", "one-from-each", "only-what-is-needed"],
)
def test_unset_urls_come_from_the_running_up(tmp_path, env, files, needs, expect):
    for store, url in files.items():
        _write(tmp_path, store, connection_record(url, psutil.Process().pid, OURS))
    settings = resolve_stores(load_settings({**env, "GATEWAY_STATE_DIR": str(tmp_path)}), needs)
    assert {"redis_url": settings.redis_url, "database_url": settings.database_url} == expect


@pytest.mark.parametrize(
    ("text", "needs", "named"),
    [
        (None, ("redis", "postgres"), "REDIS_URL and DATABASE_URL"),
        (None, ("postgres",), "DATABASE_URL"),
        (connection_record("postgresql://u:s3cr3t@h/g", DEAD_PID, "postgres"), ("postgres",), "DATABASE_URL"),
        (connection_record(PG, psutil.Process().pid, "postgres-not-us"), ("postgres",), "DATABASE_URL"),
        ('{"url": "postgresql://u:s3cr3t@h/g"', ("postgres",), "DATABASE_URL"),
    ],
    ids=["no-up-both", "no-up-one", "up-killed-pid-dead", "pid-reused-by-another-process", "torn-file"],
)
def test_without_a_running_up_one_line_says_what_to_do(tmp_path, text, needs, named):
    if text is not None:
        _write(tmp_path, "postgres", text)
    with pytest.raises(StoresNotFound) as caught:
        resolve_stores(load_settings({"GATEWAY_STATE_DIR": str(tmp_path)}), needs)
    message = str(caught.value)
    assert message.startswith(f"{named} not set") and "\n" not in message
    assert "`llm-gateway up`" in message and str(tmp_path.resolve()) in message
    assert "s3cr3t" not in message
