"""Fixtures that run the real thing: a Postgres database migrated by Alembic, a Redis key prefix, the fake
OpenAI upstream, real ``celery worker`` processes and the real API under gunicorn+gevent — all started
through the same CLI operators use.

Isolation: every test *module* gets its own database (a copy of one template migrated once per run),
its own Redis key prefix (so its own queues, limiter windows and job keys), its own fake upstream,
workers and API. Nothing a module does — deleting a queue, filling an RPM window, leaving usage rows —
is seen by another module. Tests inside one module share them and run in file order.

No child binds a port chosen beforehand: the API and the fakes bind port 0 and say which port they got
(gunicorn's ``Listening at:`` line, the fakes' ``READY <port>``), so concurrent test runs never collide.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
import requests

from tests.conftest import TEST_DATABASE_URL, TEST_REDIS_URL
from tests.fakeprovider import FakeProvider
from tests.faults import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
VISIBILITY_TIMEOUT = 10  # seconds; small so the crash test sees redelivery quickly
_TASK_ENDED = re.compile(r"\] Task [\w.]+\[([^\]]+)\] (?:succeeded in|raised)")
_LISTENING = re.compile(r"Listening at: http://[^\s]+:(\d+) ")

pytestmark = pytest.mark.integration


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> None:
    """Return as soon as ``predicate()`` is truthy; fail the test if it is not within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def free_port() -> int:
    """A port that was free a moment ago. Racy by nature (another process may bind it before the caller
    does): prefer letting the child bind port 0 and report its port, as :class:`Api` does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _admin_url() -> str:
    return TEST_DATABASE_URL.replace("postgresql+psycopg://", "postgresql://")


def _database_url(name: str) -> str:
    return f"{_admin_url().rpartition('/')[0]}/{name}"


def _drop_database(name: str) -> None:
    with psycopg.connect(_admin_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _template_database() -> Iterator[str]:
    """One database migrated by ``llm-gateway migrate`` per run; each module copies it (milliseconds)."""
    name = "gwtmpl_" + secrets.token_hex(4)
    with psycopg.connect(_admin_url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        subprocess.run([sys.executable, "-m", "launcher.cli", "migrate"], cwd=ROOT, check=True,
                       env={**os.environ, "DATABASE_URL": _database_url(name), "REDIS_URL": TEST_REDIS_URL},
                       capture_output=True)
        yield name
    finally:
        _drop_database(name)


@pytest.fixture(scope="module")
def database_url(_template_database: str) -> Iterator[str]:
    """This module's own database, migrated (a copy of the run's template)."""
    name = "gwtest_" + secrets.token_hex(4)
    with psycopg.connect(_admin_url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_template_database}"')
    yield _database_url(name)
    _drop_database(name)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


def delete_prefix(prefix: str) -> None:
    """Delete every Redis key under ``prefix:``."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])
    client.close()


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    """This module's own Redis key prefix: its queues, job keys and limiter state."""
    value = "gwtest" + secrets.token_hex(4)
    yield value
    delete_prefix(value)


def _registry_yaml(base_url: str) -> str:
    provider = ("  {name}:\n    kind: openai\n    base_url: " + base_url + "\n    api_key_env: {key}\n"
                "    pool: {pool}\n    max_retries: 1\n    timeout: 30\n")
    plain = (("fake", 64), ("stalled", 64), ("crashy", 64), ("wide", 400))
    limited = {"limited": "{concurrency: 2}", "metered": "{tpm: 400}", "fair": "{concurrency: 1}",
               "leasy": "{concurrency: 1}"}
    providers = "".join(provider.format(name=name, key="FAKE_API_KEY", pool=pool) for name, pool in plain)
    providers += "".join(provider.format(name=name, key="FAKE_API_KEY", pool=64) + f"    limits: {limits}\n"
                         for name, limits in limited.items())
    providers += provider.format(name="nokey", key="GATEWAY_TEST_UNSET_KEY", pool=64)
    model = "  {alias}:\n    provider: {provider}\n    model: fake-model\n"
    priced = model + "    price: {{input: 1.0, output: 2.0}}\n"
    models = "".join(priced.format(alias=f"{name}-model", provider=name)
                     for name in [*(n for n, _ in plain), *limited])
    models += model.format(alias="nokey-model", provider="nokey")
    return f"providers:\n{providers}models:\n{models}"


@pytest.fixture(scope="module")
def gateway_env(tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider, database_url: str,
                prefix: str) -> dict[str, str]:
    """Providers: ``fake`` (served by the module's workers), ``stalled`` (no worker unless a test
    starts one: jobs wait in line), ``crashy`` (workers a test may kill), ``wide`` (a worker pool of
    400 greenlets), the limited ones (``limited``: concurrency 2, ``metered``: tpm 400, ``fair`` and
    ``leasy``: concurrency 1) and ``nokey`` (no upstream credentials). Each ``<p>`` has a model
    ``<p>-model`` (``fake``'s is ``fake-model``)."""
    config = tmp_path_factory.mktemp("config") / "registry.yaml"
    config.write_text(_registry_yaml(fake.base_url))
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
        # these modules fail calls on purpose, per request: a breaker would hold the next ones back
        # (tests/integration/test_routing.py tests the breakers, with its own environment)
        "GATEWAY_BREAKERS": "off",
        # the module's API and workers share one metrics directory: /metrics shows both sides
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("metrics")),
        # Celery's own line format kept (finished_tasks reads it); test_observability checks JSON
        "GATEWAY_LOG_FORMAT": "text",
    }


class Process:
    """A CLI child process in its own process group, with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, *,
                 module: str = "launcher.cli") -> None:
        """``python -m <module> <args>`` (the CLI unless a test runs e.g. ``celery`` itself)."""
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                                     stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=15)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` s."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finished_tasks(self) -> list[str]:
        """Ids of the jobs whose task this (worker) process has finished, in order — however it ended
        (run, skipped as withdrawn, failed). Once a job's task is here, this worker will not touch it."""
        return _TASK_ENDED.findall(self.output())


class WorkerFactory:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.count = 0

    def spawn(self, provider: str, name: str | None = None) -> Process:
        """Start a worker on ``llm.<provider>`` without waiting for it (see :meth:`wait_ready`)."""
        self.count += 1
        name = name or f"{provider}{self.count}"
        return Process(["worker", "--provider", provider, "--name", name, "--loglevel", "info"],
                       self.env, self.logs / f"worker-{name}.log")

    @staticmethod
    def wait_ready(proc: Process, timeout: float = 30) -> Process:
        wait_until(lambda: "ready." in proc.output() or proc.proc.poll() is not None, timeout)
        assert proc.proc.poll() is None, proc.output()
        return proc

    def start(self, provider: str, name: str | None = None) -> Process:
        return self.wait_ready(self.spawn(provider, name))

    def start_many(self, specs: list[tuple[str, str | None]]) -> list[Process]:
        """Start several workers at once (``(provider, name)`` each) and wait for all: they boot in
        parallel. If one fails to start, all are stopped."""
        procs = [self.spawn(provider, name) for provider, name in specs]
        try:
            for proc in procs:
                self.wait_ready(proc)
        except BaseException:
            stop_all(procs)
            raise
        return procs


def stop_all(processes: list[Process]) -> None:
    """Cold shutdown (~1–2 s for an idle worker; ~6 s before branch coldstop): a test's leftover job
    need not finish, and its message goes back to the queue at once (for a later test of the module;
    nothing is lost)."""
    for proc in processes:
        if proc.proc.poll() is None:
            os.killpg(proc.proc.pid, signal.SIGQUIT)
    for proc in processes:
        proc.stop()


def kill_all(processes: list[Process]) -> None:
    """SIGKILL, at once: for the end of a module, whose Redis prefix and database go away with it."""
    for proc in processes:
        proc.kill()
        proc.stop()


@pytest.fixture(scope="module")
def worker_factory(gateway_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> WorkerFactory:
    return WorkerFactory(gateway_env, tmp_path_factory.mktemp("logs"))


@pytest.fixture
def start_worker(worker_factory: WorkerFactory) -> Iterator[Callable[..., Process]]:
    """Start extra workers for one test; they are stopped when the test ends."""
    started: list[Process] = []

    def start(provider: str, name: str | None = None) -> Process:
        proc = worker_factory.start(provider, name)
        started.append(proc)
        return proc

    yield start
    stop_all(started)


@pytest.fixture(scope="module")
def _fake_workers(worker_factory: WorkerFactory) -> Iterator[list[Process]]:
    """The module's two ``llm.fake`` workers, spawned (not yet ready: see ``workers``)."""
    procs = [worker_factory.spawn("fake", "a"), worker_factory.spawn("fake", "b")]
    yield procs
    kill_all(procs)


@pytest.fixture(scope="module")
def workers(_fake_workers: list[Process]) -> list[Process]:
    """Two real Celery worker processes on ``llm.fake`` for the module, ready."""
    for proc in _fake_workers:
        WorkerFactory.wait_ready(proc)
    return _fake_workers


class Api:
    """``llm-gateway api`` on a port of its own choosing; ``port`` and ``url`` are known once started."""

    def __init__(self, env: dict[str, str], log: Path, args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.log = log
        self.args = args  # more `llm-gateway api` options
        self.port: int | None = None
        self.process: Process | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "the API has not been started"
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> Api:
        """Start the process; :meth:`wait_ready` waits for it to serve."""
        self.port = None
        self.process = Process(["api", "--port", "0", *self.args], self.env, self.log)
        return self

    def wait_ready(self, timeout: float = 30) -> Api:
        wait_until(self._healthy, timeout)
        return self

    def start(self) -> Api:
        return self.launch().wait_ready()

    def _healthy(self) -> bool:
        assert self.process is not None, "the API has not been launched"
        assert self.process.proc.poll() is None, self.process.output()
        if self.port is None:
            listening = _LISTENING.search(self.process.output())
            if listening is None:
                return False
            self.port = int(listening.group(1))
        try:
            return requests.get(f"{self.url}/health", timeout=5).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    def restart(self) -> None:
        """Stop and start again (on a new port: read ``url`` afresh)."""
        assert self.process is not None
        self.process.stop()
        self.start()

    def stop(self, timeout: float = 2) -> None:
        """SIGTERM; killed after ``timeout`` s (gunicorn would wait out idle keep-alive connections that
        clients still hold; the API keeps no state worth a longer wait)."""
        if self.process is not None:
            self.process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL: the API keeps no state, so a test that is done with it need not wait for it."""
        if self.process is not None:
            self.process.kill()
            self.process.stop()


@pytest.fixture(scope="module")
def api(gateway_env: dict[str, str], _fake_workers: list[Process],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The module's API (auth off), with its two ``llm.fake`` workers ready; both boot in parallel."""
    server = Api(gateway_env, tmp_path_factory.mktemp("api") / "api.log").launch()
    try:
        with ThreadPoolExecutor(len(_fake_workers)) as pool:
            list(pool.map(WorkerFactory.wait_ready, _fake_workers))
        server.wait_ready()
        yield server
    finally:
        server.kill()


@pytest.fixture(autouse=True)
def _fresh_fake(request: pytest.FixtureRequest) -> None:
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


class FaultProxies:
    """TCP proxies in front of the test Redis and Postgres (``tests/faults.py``), and ``env``: the
    module's ``gateway_env`` with ``REDIS_URL`` and ``DATABASE_URL`` through them. Processes started
    with ``env`` lose Redis or Postgres when a test cuts ``redis`` or ``postgres``; the test itself
    still reaches both directly (``TEST_REDIS_URL``, ``database_url``) to look at the state."""

    def __init__(self, gateway_env: dict[str, str]) -> None:
        redis_url, database = gateway_env["REDIS_URL"], gateway_env["DATABASE_URL"]
        redis_at, postgres_at = urlsplit(redis_url), urlsplit(database)
        self.redis = TcpProxy(redis_at.hostname or "127.0.0.1", redis_at.port or 6379)
        self.postgres = TcpProxy(postgres_at.hostname or "127.0.0.1", postgres_at.port or 5432)
        self.env = {**gateway_env, "REDIS_URL": self.redis.url(redis_url),
                    "DATABASE_URL": self.postgres.url(database)}

    def restore(self) -> None:
        self.redis.restore()
        self.postgres.restore()

    def close(self) -> None:
        self.redis.close()
        self.postgres.close()


@pytest.fixture(scope="module")
def fault_proxies(gateway_env: dict[str, str]) -> Iterator[FaultProxies]:
    """The module's :class:`FaultProxies`: start the workers and API of an outage test with its ``env``
    (module-scoped, so that module-scoped processes can use it; prefer ``faults`` in tests)."""
    proxies = FaultProxies(gateway_env)
    yield proxies
    proxies.close()


@pytest.fixture(scope="module")
def fault_api(fault_proxies: FaultProxies, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """Like ``api`` (auth off, two ``llm.fake`` workers), but the API and its workers reach Redis and
    Postgres only through ``fault_proxies``: cut those (``faults.redis.cut()``) to stage an outage."""
    logs = tmp_path_factory.mktemp("fault-logs")
    server = Api(fault_proxies.env, logs / "api.log").launch()
    procs = [WorkerFactory(fault_proxies.env, logs).spawn("fake", name) for name in ("fa", "fb")]
    try:
        for proc in procs:
            WorkerFactory.wait_ready(proc)
        server.wait_ready()
        yield server
    finally:
        server.kill()
        kill_all(procs)


@pytest.fixture
def faults(fault_proxies: FaultProxies) -> Iterator[FaultProxies]:
    """The module's :class:`FaultProxies`, restored when the test ends (passed or not): an outage
    never leaks into the next test."""
    yield fault_proxies
    fault_proxies.restore()
