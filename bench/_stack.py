"""Shared plumbing for the benchmarks: start the fake upstream, a fresh database, and the gateway's
API and worker through the real CLI (``llm-gateway``), each in its own process group; stop them all.

Not a benchmark itself; imported by ``bench/overhead.py``, ``bench/held.py``, ``bench/limits.py`` and
``bench/faults.py`` (which also restarts processes one by one — :meth:`Stack.spawn_worker`,
:meth:`Stack.spawn_api` — and runs a private ``redis-server`` it may kill or wipe, :class:`RedisServer`).
Options beyond the defaults (which are what ``overhead.py`` measures): several worker processes on the
one provider (``workers``), limits the gateway holds (``limits``, the registry's ``providers.fake.limits``)
and limits the fake upstream enforces with real 429s (``fake_limits``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fakeprovider import FakeProvider  # noqa: E402 - needs ROOT on sys.path

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"          # its own DB: nothing else's queues or keys
DEFAULT_ADMIN_DB_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CHAT_BODY = b'{"model":"fake-model","messages":[{"role":"user","content":"hello from the benchmark"}]}'
AUTH = {"Authorization": "Bearer bench-key"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gateway_cli() -> list[str]:
    """``python -m launcher.cli`` run in this checkout (cwd ROOT): the code measured is the code next to
    the benchmark — the venv's ``llm-gateway`` script imports whichever checkout was pip-installed."""
    return [sys.executable, "-m", "launcher.cli"]


class Proc:
    """A child in its own process group (so gunicorn's/celery's children go with it), output to a log."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, tail: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a crash or the OOM killer would; no cleanup runs."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        # stray members of the group (e.g. a gunicorn worker that outlived its master)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._fh.close()


def create_database(admin_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def post_json(url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 10.0
              ) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Stack:
    """fake upstream + fresh database + ``llm-gateway api`` + ``llm-gateway worker --provider fake``."""

    def __init__(self, *, latency_ms: float = 0.0, worker_concurrency: int | None = None, pool: int = 256,
                 api_workers: int = 1, redis_url: str = DEFAULT_REDIS_URL,
                 admin_db_url: str = DEFAULT_ADMIN_DB_URL,
                 db_name: str = "bench_gateway", max_wait: float = 60.0, provider_timeout: float = 120.0,
                 extra_env: dict[str, str] | None = None, keep_logs: bool = False, workers: int = 1,
                 limits: dict[str, int] | None = None, fake_limits: dict[str, int] | None = None,
                 max_output_tokens: int | None = None, api_key: bool = False) -> None:
        self.latency_ms = latency_ms
        self.create_api_key = api_key   # create one key after migrating; calls then carry its secret
        self.auth = dict(AUTH)
        self.n_workers = workers
        self.limits = {k: v for k, v in (limits or {}).items() if v}
        self.fake_limits = fake_limits
        self.max_output_tokens = max_output_tokens
        self.worker_concurrency = worker_concurrency
        self.pool = pool
        self.api_workers = api_workers
        self.redis_url = redis_url
        self.admin_db_url = admin_db_url
        self.db_name = db_name
        self.max_wait = max_wait
        self.provider_timeout = provider_timeout
        self.extra_env = extra_env or {}
        self.keep_logs = keep_logs
        self.prefix = "bench" + secrets.token_hex(4)
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-stack-"))
        self.fake: FakeProvider | None = None
        self.api: Proc | None = None
        self.worker: Proc | None = None      # the first worker process (all of them: ``workers``)
        self.workers: list[Proc] = []
        self.retired: list[Proc] = []        # API processes replaced by a restart (stopped with the rest)
        self.api_port: int | None = None
        self.database_url: str | None = None

    # ------------------------------------------------------------------ start
    def start_fake(self) -> FakeProvider:
        self.fake = FakeProvider(latency_ms=self.latency_ms, limits=self.fake_limits).start()
        return self.fake

    def env(self) -> dict[str, str]:
        assert self.fake is not None
        config = self.workdir / "registry.yaml"
        config.write_text(
            "providers:\n"
            "  fake:\n"
            "    kind: openai\n"
            f"    base_url: {self.fake.base_url}\n"
            "    api_key_env: FAKE_API_KEY\n"
            f"    pool: {self.pool}\n"
            f"    timeout: {self.provider_timeout:g}\n"
            + (f"    limits: {{{', '.join(f'{k}: {v}' for k, v in self.limits.items())}}}\n"
               if self.limits else "")
            + "models:\n"
            "  fake-model:\n"
            "    provider: fake\n"
            "    model: fake-model\n"
            + (f"    max_output_tokens: {self.max_output_tokens}\n" if self.max_output_tokens else "")
            + "    price: {input: 1.0, output: 2.0}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update({
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.database_url or "",
            "GATEWAY_CONFIG": str(config),
            "GATEWAY_KEY_PREFIX": self.prefix,
            "GATEWAY_AUTH": "off",
            "GATEWAY_MAX_WAIT": f"{self.max_wait:g}",
            "FAKE_API_KEY": "sk-bench-upstream",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def start(self, ready_timeout: float = 90.0) -> Self:
        try:
            self.prepare()
            for _ in range(self.n_workers):
                self.spawn_worker()
            self.spawn_api()
            self.wait_ready(ready_timeout)
            return self
        except BaseException:
            self.stop()
            raise

    def prepare(self) -> None:
        """The fake upstream, a fresh migrated database and (``api_key``) one API key; no gateway yet."""
        if self.fake is None:
            self.start_fake()
        self.database_url = create_database(self.admin_db_url, self.db_name)
        mig = self.cli("migrate")
        if mig.returncode != 0:
            raise RuntimeError(f"llm-gateway migrate failed:\n{mig.stdout}\n{mig.stderr}")
        if self.create_api_key:
            out = self.cli("keys", "create", "--name", "bench")
            if out.returncode != 0:
                raise RuntimeError(f"llm-gateway keys create failed:\n{out.stdout}\n{out.stderr}")
            self.auth = {"Authorization": f"Bearer {out.stdout.strip().splitlines()[-1]}"}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*gateway_cli(), *args], cwd=ROOT, env=self.env(), capture_output=True,
                              text=True, timeout=120, check=False)

    def spawn_worker(self) -> Proc:
        """One more ``llm-gateway worker --provider fake`` (each with its own Celery node name)."""
        i = len(self.workers)
        name = "worker" if i == 0 else f"worker{i + 1}"
        proc = Proc(name, [*gateway_cli(), "worker", "--provider", "fake",
                           "--name", self.prefix if i == 0 else f"{self.prefix}-{i + 1}",
                           *([] if self.worker_concurrency is None
                             else ["--concurrency", str(self.worker_concurrency)])],
                    self.env(), self.workdir)
        self.workers.append(proc)
        if self.worker is None:
            self.worker = proc
        return proc

    def spawn_api(self) -> Proc:
        """``llm-gateway api`` on this stack's port (the same one again after a restart)."""
        if self.api_port is None:
            self.api_port = free_port()
        name = "api" if self.api is None else f"api{len(self.retired) + 2}"
        if self.api is not None:
            self.retired.append(self.api)
        self.api = Proc(name, [*gateway_cli(), "api", "--host", "127.0.0.1", "--port", str(self.api_port),
                               "--workers", str(self.api_workers)], self.env(), self.workdir)
        return self.api

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/v1/chat/completions"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for p in (self.api, *self.workers):
                if p is not None and not p.alive():
                    raise RuntimeError(f"{p.name} exited ({p.proc.returncode}):\n{p.output()}")
            try:
                status, body = post_json(self.url, CHAT_BODY, self.auth, timeout=10)
                if status == 200 and b"echo: hello from the benchmark" in body:
                    return
                last = f"HTTP {status}: {body[:500]!r}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise RuntimeError(f"gateway did not answer a chat call within {timeout:g}s: {last}\n"
                           f"--- api log ---\n{self.api.output() if self.api else ''}\n"
                           f"--- worker log ---\n{self.worker.output() if self.worker else ''}")

    # ------------------------------------------------------------------ inspection
    def api_processes(self) -> list[Any]:
        """psutil.Process for the gunicorn master and its workers."""
        import psutil

        if self.api is None or not self.api.alive():
            return []
        master = psutil.Process(self.api.pid)
        return [master, *master.children(recursive=True)]

    def worker_processes(self) -> list[Any]:
        """psutil.Process for every worker process (and its children)."""
        import psutil

        out = []
        for w in self.workers:
            if w.alive():
                root = psutil.Process(w.pid)
                out += [root, *root.children(recursive=True)]
        return out

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        for p in (self.api, *self.retired, *self.workers):
            if p is not None:
                p.stop()
        if self.fake is not None:
            self.fake.stop()
        if self.database_url is not None:
            try:
                drop_database(self.admin_db_url, self.db_name)
            except Exception as exc:  # noqa: BLE001 - cleanup is best effort
                print(f"warning: could not drop database {self.db_name}: {exc}", file=sys.stderr)
        try:
            import redis

            client = redis.Redis.from_url(self.redis_url)
            keys = list(client.scan_iter(f"{self.prefix}:*", count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i:i + 500])
            client.close()
        except Exception as exc:  # noqa: BLE001
            print(f"warning: could not clean Redis keys {self.prefix}:*: {exc}", file=sys.stderr)
        if not self.keep_logs:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer:
    """A private ``redis-server`` on a free loopback port with AOF on, in its own directory, so a
    benchmark can SIGKILL it (:meth:`kill`), start it again on the same port and data (:meth:`start`)
    or wipe it, touching nothing else on the machine."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> Self:
        import redis

        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes"]
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}")
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    client.close()
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout:g}s")

    def kill(self) -> None:
        """SIGKILL: whatever the AOF has not fsynced yet is lost, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def cpu_seconds(procs: list[Any]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(Exception):  # a process may be gone
            t = p.cpu_times()
            total += t.user + t.system
    return total


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
