"""Hostile and malformed input at the API edge: always a 4xx in the caller's protocol's shape, never a
500, never gunicorn's HTML; idle and slow clients cannot starve the API of connections."""

from __future__ import annotations

import re
import socket
import time

import pytest
import requests

from tests.integration.conftest import Api

pytestmark = pytest.mark.integration

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC = {"model": "fake-model", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
OLLAMA = {"model": "fake-model", "stream": False, "messages": [{"role": "user", "content": "hi"}]}


def openai_shaped(body: object) -> bool:
    return isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict) \
        and {"message", "type", "code"} <= set(body["error"])


def anthropic_shaped(body: object) -> bool:
    return isinstance(body, dict) and body.get("type") == "error" and isinstance(body.get("error"), dict)


def ollama_shaped(body: object) -> bool:
    return isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str)


ENDPOINTS = [("/v1/chat/completions", CHAT, openai_shaped), ("/v1/embeddings", {"model": "fake-model",
                                                                             "input": "x"}, openai_shaped),
             ("/v1/jobs", CHAT, openai_shaped), ("/v1/messages", ANTHROPIC, anthropic_shaped),
             ("/api/chat", OLLAMA, ollama_shaped)]
ENDPOINT_IDS = [path for path, _, _ in ENDPOINTS]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(("path", "body", "shaped"), ENDPOINTS, ids=ENDPOINT_IDS)
@pytest.mark.parametrize(("raw", "code"), [
    (lambda b: '{"model": "fake-model", "messages": ' + nested(1000) + "}", "nesting_too_deep"),
    (lambda b: '{"model": "fake-model", "messages": [], "x": NaN}', "invalid_number"),
    (lambda b: '{"model": "fake-model", "messages": [], "x": -Infinity}', "invalid_number"),
    (lambda b: '{"model": "fake-model", "messages": [], "max_wait": 1e999}', "invalid_number"),
    (lambda b: '{"model": "fake-model", "messages": [], "max_wait": ' + "9" * 400 + "}", "invalid_number"),
    (lambda b: '{"model": "fake-model", "messages": [{"role": "user", "content": "a\\u0000b"}]}',
     "invalid_string"),
    (lambda b: '{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "invalid_string"),
], ids=["deep", "nan", "infinity", "float-overflow", "400-digits", "nul", "lone-surrogate"])
def test_bad_json_is_a_400_in_the_callers_shape(api, path, body, shaped, raw, code):
    r = requests.post(f"{api.url}{path}", data=raw(body).encode(),
                      headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert shaped(r.json()), r.text
    if shaped is openai_shaped:
        assert r.json()["error"]["code"] == code


@pytest.mark.parametrize("field", ["api_key", "base_url", "provider", "extra_headers", "api_base"])
def test_fields_that_would_steer_the_upstream_are_refused(api, fake, field):
    r = requests.post(f"{api.url}/v1/chat/completions", json={**CHAT, field: "https://evil.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    assert r.json()["error"]["param"] == field
    assert fake.requests() == []  # nothing reached the upstream


def test_huge_numbers_in_known_fields_are_400(api):
    r = requests.post(f"{api.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2**62})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = requests.post(f"{api.url}/v1/chat/completions", json=CHAT, headers={"x-gateway-max-wait": "9" * 400})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_wait"
    r = requests.post(f"{api.url}/v1/messages", json={**ANTHROPIC, "max_tokens": 2**62})
    assert r.status_code == 400 and anthropic_shaped(r.json())


@pytest.mark.parametrize("job_id", ["%00", "%ff%fe", "x" * 3000, "..%2f..%2fetc", "%E2%80%AE"],
                         ids=["nul", "bad-utf8", "long", "traversal", "bidi"])
def test_odd_job_ids_are_404(api, job_id):
    r = requests.get(f"{api.url}/v1/jobs/{job_id}")
    assert r.status_code in (400, 404), r.text
    assert openai_shaped(r.json())


def test_errors_of_werkzeug_come_in_the_blueprints_shape(api):
    big = b'{"x": "' + b"a" * 70_000 + b'"}'  # the suite's API takes 64 KiB
    r = requests.post(f"{api.url}/v1/messages", data=big)
    assert r.status_code == 413 and anthropic_shaped(r.json())
    r = requests.post(f"{api.url}/api/chat", data=big)
    assert r.status_code == 413 and ollama_shaped(r.json())
    r = requests.post(f"{api.url}/v1/chat/completions", data=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = requests.get(f"{api.url}/no/such/path")  # no blueprint: OpenAI's shape
    assert r.status_code == 404 and openai_shaped(r.json())
    r = requests.post(f"{api.url}/api/pull", json={"model": "x"})  # every /api/ path is Ollama's
    assert r.status_code == 404 and ollama_shaped(r.json())
    r = requests.get(f"{api.url}/api/chat")
    assert r.status_code == 405 and ollama_shaped(r.json()) and "POST" in r.headers["Allow"]


def test_an_oversize_chunked_body_is_413(api):
    def chunks():
        for _ in range(100):
            yield b"[" * 1024
    r = requests.post(f"{api.url}/v1/chat/completions", data=chunks())  # no Content-Length: chunked
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = requests.post(f"{api.url}/v1/messages", data=chunks())
    assert r.status_code == 413 and anthropic_shaped(r.json())


def test_a_small_chunked_body_is_served(api, fake):
    import json
    r = requests.post(f"{api.url}/v1/chat/completions", data=iter([json.dumps(CHAT).encode()]))
    assert r.status_code == 200, r.text


def raw_exchange(api: Api, payload: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the server closes): status, headers, body."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=timeout) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(("payload", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
     431),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
], ids=["garbage", "version", "long-line", "long-header", "many-headers", "bad-header-name", "bad-chunk",
        "transfer-coding"])
def test_malformed_http_is_answered_in_json(api, payload, status):
    code, headers, body = raw_exchange(api, payload)
    assert code == status, body
    assert headers["content-type"].startswith("application/json")
    import json
    assert openai_shaped(json.loads(body)), body


@pytest.fixture(scope="module")
def tight_api(gateway_env, workers, tmp_path_factory):
    """An API with few connection slots and a short client timeout."""
    server = Api({**gateway_env, "GATEWAY_CLIENT_TIMEOUT": "2"}, tmp_path_factory.mktemp("tight") / "api.log",
                 args=("--connections", "20")).start()
    yield server
    server.stop()


def test_idle_sockets_beyond_the_connection_count_do_not_starve_health(tight_api):
    idle = [socket.create_connection(("127.0.0.1", tight_api.port)) for _ in range(30)]
    slow = [socket.create_connection(("127.0.0.1", tight_api.port)) for _ in range(5)]
    for sock in slow:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    try:
        started = time.monotonic()
        r = requests.get(f"{tight_api.url}/health", timeout=15)
        assert r.status_code == 200
        assert time.monotonic() - started < 10  # a 2 s client timeout frees the slots
        slow[0].settimeout(5)
        answer = slow[0].recv(4096)  # the slowloris gets a 408 in JSON (or its socket is already closed)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
    finally:
        for sock in idle + slow:
            sock.close()


def read_answer(sock: socket.socket) -> bytes:
    """One answer (headers and a Content-Length body) from a kept-alive connection; b"" if it closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)Content-Length: (\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return data


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_kept_alive_connections_next_headers_must_arrive_within_the_client_timeout(tight_api):
    """The second request on a kept-alive connection gets the same header deadline as the first
    (2 s here), not the 75 s keep-alive: drip-feeding its headers ends in a 408 in JSON."""
    with socket.create_connection(("127.0.0.1", tight_api.port), timeout=15) as sock:
        sock.sendall(HEALTH)
        assert read_answer(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        data = b""
        sock.settimeout(0.5)
        while time.monotonic() - started < 20 and b"\r\n\r\n" not in data:
            try:
                sock.sendall(b"X")   # a header that never ends, one byte at a time
                data += sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
        waited = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b'"request_timeout"' in data or b"Content-Length" in data
    assert waited < 8, waited   # the 2 s client timeout, with slack; the keep-alive would be 75 s


def test_a_kept_alive_connection_may_idle_longer_than_the_client_timeout(tight_api):
    """Idle between requests is bounded by the keep-alive, not the header deadline: a client that
    reuses its connection 3 s later (client timeout 2 s) is served on it."""
    with socket.create_connection(("127.0.0.1", tight_api.port), timeout=15) as sock:
        sock.sendall(HEALTH)
        assert read_answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(3)
        sock.sendall(HEALTH)
        assert read_answer(sock).startswith(b"HTTP/1.1 200")


def test_a_drip_fed_body_gets_408_in_json(tight_api):
    with socket.create_connection(("127.0.0.1", tight_api.port), timeout=15) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n")
        started = time.monotonic()
        data = b""
        while time.monotonic() - started < 10 and b"\r\n\r\n" not in data:
            try:
                sock.sendall(b" ")
            except OSError:
                break
            sock.settimeout(0.5)
            try:
                data += sock.recv(4096)
            except TimeoutError:
                continue
        assert data.startswith(b"HTTP/1.1 408"), data
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        sock.settimeout(5)
        while len(body) < length:  # the body may come in a later segment than the headers
            more = sock.recv(4096)
            if not more:
                break
            body += more
        assert b'"type":"error"' in body  # /v1/messages: Anthropic's shape
    assert time.monotonic() - started < 6
