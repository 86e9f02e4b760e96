"""Fixtures that run the real thing: a fresh Postgres database migrated by Alembic, an isolated
Redis key prefix, the fake OpenAI upstream, real ``celery worker`` processes and the real API under
gunicorn+gevent — all started through the same CLI operators use."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import requests

from tests.conftest import TEST_DATABASE_URL, TEST_REDIS_URL
from tests.fakeprovider import FakeProvider

ROOT = Path(__file__).resolve().parents[2]
VISIBILITY_TIMEOUT = 10  # seconds; small so the crash test sees redelivery quickly

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _admin_url() -> str:
    return TEST_DATABASE_URL.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = "gwtest_" + secrets.token_hex(4)
    with psycopg.connect(_admin_url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = _admin_url().rpartition("/")
    url = f"{base}/{name}"
    subprocess.run([sys.executable, "-m", "launcher.cli", "migrate"], cwd=ROOT, check=True,
                   env={**os.environ, "DATABASE_URL": url, "REDIS_URL": TEST_REDIS_URL}, capture_output=True)
    yield url
    with psycopg.connect(_admin_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


@pytest.fixture(scope="session")
def prefix() -> Iterator[str]:
    value = "gwtest" + secrets.token_hex(4)
    yield value
    client = redis.Redis.from_url(TEST_REDIS_URL)
    keys = list(client.scan_iter(f"{value}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])


@pytest.fixture(scope="session")
def gateway_env(tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider, database_url: str,
                prefix: str) -> dict[str, str]:
    """Providers: ``fake`` (served by the session's workers), ``stalled`` (no worker unless a test
    starts one: jobs wait in line), ``crashy`` (workers a test may kill), ``wide`` (a worker pool of
    400 greenlets) and the limited ones below."""
    config = tmp_path_factory.mktemp("config") / "registry.yaml"
    providers = "\n".join(
        f"  {name}:\n    kind: openai\n    base_url: {fake.base_url}\n    api_key_env: FAKE_API_KEY\n"
        f"    pool: {pool}\n    max_retries: 1\n    timeout: 30"
        for name, pool in (("fake", 64), ("stalled", 64), ("crashy", 64), ("wide", 400)))
    limited = {"limited": "{concurrency: 2}", "metered": "{tpm: 400}", "fair": "{concurrency: 1}",
               "leasy": "{concurrency: 1}"}
    providers += "\n" + "\n".join(
        f"  {name}:\n    kind: openai\n    base_url: {fake.base_url}\n    api_key_env: FAKE_API_KEY\n"
        f"    pool: 64\n    max_retries: 1\n    timeout: 30\n    limits: {limits}"
        for name, limits in limited.items())
    models = "\n".join(
        f"  {alias}:\n    provider: {provider}\n    model: fake-model\n    price: {{input: 1.0, output: 2.0}}"
        for alias, provider in (("fake-model", "fake"), ("stalled-model", "stalled"), ("crashy-model", "crashy"),
                                ("wide-model", "wide"),
                                ("limited-model", "limited"), ("metered-model", "metered"), ("fair-model", "fair"),
                                ("leasy-model", "leasy")))
    config.write_text(f"providers:\n{providers}\n  nokey:\n    kind: openai\n    base_url: {fake.base_url}\n"
                      f"    api_key_env: GATEWAY_TEST_UNSET_KEY\nmodels:\n{models}\n"
                      f"  nokey-model:\n    provider: nokey\n    model: fake-model\n")
    return {
        **os.environ,
        "REDIS_URL": TEST_REDIS_URL,
        "DATABASE_URL": database_url,
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_KEY_PREFIX": prefix,
        "GATEWAY_AUTH": "off",
        "GATEWAY_MAX_WAIT": "20",
        "GATEWAY_MAX_WAIT_LIMIT": "60",
        "GATEWAY_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
        "GATEWAY_MAX_BODY_BYTES": "65536",
        "FAKE_API_KEY": "sk-fake-upstream",
        "PYTHONUNBUFFERED": "1",
    }


class Process:
    """A CLI child process in its own process group, with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=env,
                                     stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=15)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class WorkerFactory:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.count = 0

    def start(self, provider: str, name: str | None = None) -> Process:
        self.count += 1
        name = name or f"{provider}{self.count}"
        proc = Process(["worker", "--provider", provider, "--name", name, "--loglevel", "info"],
                       self.env, self.logs / f"worker-{name}.log")
        wait_until(lambda: "ready." in proc.output() or proc.proc.poll() is not None, 30)
        assert proc.proc.poll() is None, proc.output()
        return proc


def stop_all(processes: list[Process]) -> None:
    for proc in processes:  # cold shutdown: a test's leftover job need not finish (it is redelivered)
        if proc.proc.poll() is None:
            os.killpg(proc.proc.pid, signal.SIGQUIT)
    for proc in processes:
        proc.stop()


@pytest.fixture(scope="session")
def worker_factory(gateway_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> WorkerFactory:
    return WorkerFactory(gateway_env, tmp_path_factory.mktemp("logs"))


@pytest.fixture
def start_worker(worker_factory: WorkerFactory):
    """Start extra workers for one test; they are stopped when the test ends."""
    started: list[Process] = []

    def start(provider: str, name: str | None = None) -> Process:
        proc = worker_factory.start(provider, name)
        started.append(proc)
        return proc

    yield start
    stop_all(started)


@pytest.fixture(scope="session")
def workers(worker_factory: WorkerFactory) -> Iterator[list[Process]]:
    """Two real Celery worker processes on ``llm.fake`` for the whole session."""
    procs = [worker_factory.start("fake", "a"), worker_factory.start("fake", "b")]
    yield procs
    stop_all(procs)


class Api:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process: Process | None = None

    def start(self) -> Api:
        self.process = Process(["api", "--port", str(self.port)], self.env, self.log)
        wait_until(self._healthy, 30)
        return self

    def _healthy(self) -> bool:
        assert self.process is not None and self.process.proc.poll() is None, self.process.output()
        try:
            return requests.get(f"{self.url}/health", timeout=5).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    def restart(self) -> None:
        assert self.process is not None
        self.process.stop()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@pytest.fixture(scope="session")
def api(gateway_env: dict[str, str], workers: list[Process], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    server = Api(gateway_env, tmp_path_factory.mktemp("api") / "api.log").start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_fake(request: pytest.FixtureRequest) -> None:
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def wait_until(predicate, timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
