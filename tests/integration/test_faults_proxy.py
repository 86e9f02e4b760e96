"""The fault-injection proxy (``tests/faults.py``) against the real Redis and Postgres: what passes it
works, a cut fails at once (reset) or holds (hang), and a restore brings everything back."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
import requests

from tests.conftest import TEST_DATABASE_URL, TEST_REDIS_URL
from tests.faults import TcpProxy
from tests.integration.conftest import Api, wait_until

pytestmark = pytest.mark.integration


def _proxy_for(url: str, default_port: int) -> TcpProxy:
    parts = urlsplit(url)
    return TcpProxy(parts.hostname or "127.0.0.1", parts.port or default_port)


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    with _proxy_for(TEST_DATABASE_URL, 5432) as proxy:
        yield proxy


@pytest.fixture
def redis_proxy() -> Iterator[TcpProxy]:
    with _proxy_for(TEST_REDIS_URL, 6379) as proxy:
        yield proxy


def pg_connect(proxy: TcpProxy) -> psycopg.Connection:
    url = proxy.url(TEST_DATABASE_URL.replace("postgresql+psycopg://", "postgresql://"))
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def redis_client(proxy: TcpProxy, timeout: float = 5) -> redis.Redis:
    return redis.Redis.from_url(proxy.url(TEST_REDIS_URL), socket_timeout=timeout,
                                socket_connect_timeout=timeout)


def test_postgres_through_the_proxy_fails_while_cut_and_works_after_restore(pg_proxy):
    with pg_connect(pg_proxy) as open_conn:
        assert open_conn.execute("SELECT 1").fetchone() == (1,)
        pg_proxy.cut()
        with pytest.raises(psycopg.OperationalError):
            open_conn.execute("SELECT 1")  # the open connection is reset
    with pytest.raises(psycopg.OperationalError):
        pg_connect(pg_proxy)                # and new ones are refused
    pg_proxy.restore()
    with pg_connect(pg_proxy) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_redis_through_the_proxy_fails_while_cut_and_works_after_restore(redis_proxy):
    client = redis_client(redis_proxy)
    assert client.ping() is True
    redis_proxy.cut()
    with pytest.raises(redis.ConnectionError):
        client.ping()  # the pooled connection is reset, and reconnecting is refused too
    redis_proxy.restore()
    assert client.ping() is True  # the pool reconnects
    client.close()


def test_a_hang_holds_bytes_until_the_restore(redis_proxy):
    client = redis_client(redis_proxy, timeout=0.5)
    assert client.ping() is True
    redis_proxy.cut("hang")
    with pytest.raises(redis.TimeoutError):
        client.ping()  # no error, no answer: only the client's own timeout ends the wait
    with socket.create_connection(("127.0.0.1", redis_proxy.port), timeout=10) as raw:
        raw.sendall(b"PING\r\n")  # sent into the partition ...
        redis_proxy.restore()
        assert raw.recv(100) == b"+PONG\r\n"  # ... and answered once it heals
    client.close()


def test_the_proxy_keeps_its_port_through_an_outage(redis_proxy):
    redis_proxy.cut()
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", redis_proxy.port))
    assert redis_proxy.url("redis://:secret@10.0.0.1:6379/3") == f"redis://:secret@127.0.0.1:{redis_proxy.port}/3"


def health(api: Api) -> dict:
    return requests.get(f"{api.url}/health", timeout=10).json()


def test_a_gateway_started_with_the_fault_env_loses_redis_when_it_is_cut(fault_api, faults, fake):
    assert faults.env["REDIS_URL"].endswith(f":{faults.redis.port}/0")
    assert f":{faults.postgres.port}/" in faults.env["DATABASE_URL"]
    reply = requests.post(f"{fault_api.url}/v1/chat/completions", timeout=30, json={
        "model": "fake-model", "messages": [{"role": "user", "content": "through the proxies"}]})
    assert reply.status_code == 200 and fake.stats()["by_content"] == {"through the proxies": 1}
    assert faults.redis.accepted > 0 and faults.postgres.accepted > 0  # they went through the proxies
    assert health(fault_api)["redis"] == "ok"
    faults.redis.cut()
    wait_until(lambda: health(fault_api)["redis"] != "ok", 15, interval=0.5)
    faults.restore()
    wait_until(lambda: health(fault_api)["redis"] == "ok", 15, interval=0.5)


def test_the_faults_fixture_restores_after_each_test_1(faults):
    faults.postgres.cut()  # and left cut: the fixture must undo it


def test_the_faults_fixture_restores_after_each_test_2(faults):
    assert not faults.postgres.is_cut and not faults.redis.is_cut
