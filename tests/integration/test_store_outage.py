"""Postgres outages at the API: auth keeps serving from the last good key set (one log line per
outage, not a traceback per request), async job creation and reads answer 503 with Retry-After in
the caller's shape, and everything works again when Postgres is back.

Postgres is cut for real: the API reaches it through a small TCP proxy that this module closes."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

from tests.integration.conftest import Api, wait_until
from tests.integration.test_auth import cli

pytestmark = pytest.mark.integration


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; :meth:`cut` drops every connection and refuses new
    ones, :meth:`restore` accepts again. Threads, no gevent: it runs in the test process."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._up.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass  # the other direction or cut() closed a socket: this pipe is done either way
        finally:
            self._close(source, sink)

    def _close(self, *socks: socket.socket) -> None:
        with self._lock:
            for sock in socks:
                self._open.discard(sock)
                sock.close()

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by its peer
                sock.close()
            self._open.clear()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def through(url: str, proxy: TcpProxy) -> str:
    """``url`` (credentials kept) pointed at ``proxy``."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    host = f"{parts.hostname}:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}" if userinfo else host))


@pytest.fixture(scope="module")
def proxied(gateway_env, workers, database_url, tmp_path_factory) -> Iterator[tuple[Api, TcpProxy, str]]:
    """An API with GATEWAY_AUTH=auto and one key, reaching Postgres only through a proxy."""
    parts = urlsplit(database_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    secret = cli(gateway_env, "keys", "create", "--name", "outage").strip().splitlines()[-1]
    env = {**gateway_env, "DATABASE_URL": through(database_url, proxy), "GATEWAY_AUTH": "auto",
           "GATEWAY_AUTH_STALE_LIMIT": "300"}
    server = Api(env, tmp_path_factory.mktemp("outage") / "api.log").start()
    yield server, proxy, secret
    server.stop()
    proxy.close()


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "during the outage"}]}


def test_postgres_outage_serves_known_keys_and_answers_503_for_jobs(proxied, fake):
    api, proxy, secret = proxied
    auth = {"Authorization": f"Bearer {secret}"}
    assert requests.post(f"{api.url}/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
    job = requests.post(f"{api.url}/v1/jobs", json=CHAT, headers=auth).json()
    proxy.cut()
    try:
        statuses = [requests.post(f"{api.url}/v1/chat/completions", json=CHAT, headers=auth,
                                  timeout=30).status_code for _ in range(20)]
        assert statuses == [200] * 20  # sync calls need no Postgres: the last key set answers
        assert requests.post(f"{api.url}/v1/chat/completions", json=CHAT,
                             headers={"Authorization": "Bearer sk-gw-unknown"}).status_code == 401

        created = requests.post(f"{api.url}/v1/jobs", json=CHAT, headers=auth, timeout=30)
        assert created.status_code == 503 and created.headers["Retry-After"]
        assert created.json()["error"]["code"] == "database_unavailable"
        read = requests.get(f"{api.url}/v1/jobs/{job['id']}", headers=auth, timeout=30)
        assert read.status_code == 503 and read.headers["Retry-After"]
        anthropic = requests.post(f"{api.url}/v1/messages", headers=auth, timeout=30,
                                  json={"model": "fake-model", "max_tokens": 5, "messages": CHAT["messages"]})
        assert anthropic.status_code == 200
    finally:
        proxy.restore()
    wait_until(lambda: requests.get(f"{api.url}/v1/jobs/{job['id']}", headers=auth).status_code == 200, 30)
    log = api.log.read_text(errors="replace")
    assert log.count("API key store (Postgres) unreachable") == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    wait_until(lambda: requests.get(f"{api.url}/v1/jobs/{job['id']}", headers=auth).status_code == 200
               and "reachable again" in api.log.read_text(errors="replace"), 20)


def test_no_key_set_ever_loaded_means_503_not_open(gateway_env, workers, database_url, tmp_path_factory):
    """With no key set to fall back on, an outage must not open the gateway (auto mode) — 503."""
    parts = urlsplit(database_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    server = Api({**gateway_env, "DATABASE_URL": through(database_url, proxy), "GATEWAY_AUTH": "auto"},
                 tmp_path_factory.mktemp("outage-cold") / "api.log").start()  # /health: no key load
    try:
        proxy.cut()
        r = requests.post(f"{server.url}/v1/messages", timeout=30,
                          json={"model": "fake-model", "max_tokens": 5, "messages": CHAT["messages"]})
        assert r.status_code == 503 and r.json()["type"] == "error" and r.headers["Retry-After"]
    finally:
        server.stop()
        proxy.close()


def test_redis_outage_is_503_in_the_callers_shape(gateway_env, workers, tmp_path_factory, fake):
    """The API loses Redis (the workers do not): calls and job reads that need it are 503
    ``queue_unavailable`` with Retry-After, in each protocol's shape; service resumes when it is back."""
    parts = urlsplit(gateway_env["REDIS_URL"])
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    server = Api({**gateway_env, "REDIS_URL": through(gateway_env["REDIS_URL"], proxy)},
                 tmp_path_factory.mktemp("outage-redis") / "api.log").start()
    try:
        queued = requests.post(f"{server.url}/v1/jobs", json={**CHAT, "model": "stalled-model"}).json()
        assert requests.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
        proxy.cut()
        chat = requests.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30)
        assert chat.status_code == 503 and chat.headers["Retry-After"]
        assert chat.json()["error"]["code"] == "queue_unavailable"
        claude = requests.post(f"{server.url}/v1/messages", timeout=30,
                               json={"model": "fake-model", "max_tokens": 5, "messages": CHAT["messages"]})
        assert claude.status_code == 503 and claude.json()["type"] == "error"
        llama = requests.post(f"{server.url}/api/chat", timeout=30,
                              json={"model": "fake-model", "stream": False, "messages": CHAT["messages"]})
        assert llama.status_code == 503 and isinstance(llama.json()["error"], str)
        read = requests.get(f"{server.url}/v1/jobs/{queued['id']}", timeout=30)
        assert read.status_code == 503 and read.json()["error"]["code"] == "queue_unavailable"
        proxy.restore()
        wait_until(lambda: requests.post(f"{server.url}/v1/chat/completions", json=CHAT,
                                         timeout=30).status_code == 200, 30)
        assert "Traceback" not in server.log.read_text(errors="replace")
    finally:
        server.stop()
        proxy.close()
