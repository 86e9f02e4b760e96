"""Upstream failures are visible to the operator: every failed upstream attempt is a warning line in
the worker's log (provider, model, status class, message — never the upstream key), and ``/health``
shows each provider's recent error rate and last error, counted in Redis across worker processes.

Providers: ``refused`` (its base URL refuses connections; two workers of pool 1, so attempts are
spread over both processes), ``badkey`` (the fake rejects its key) and ``good`` (the same fake, the
right key)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.fakeprovider import FakeProvider
from tests.integration.conftest import ROOT, Api, Process, WorkerFactory, kill_all, wait_until

pytestmark = pytest.mark.integration

RIGHT_KEY = "sk-right-upstream-key"
WRONG_KEY = "sk-wrong-Zq8xUPSTREAMSECRET"  # must never appear in a log or in /health


def _refusing_url() -> str:
    """A loopback address nothing listens on (bound, then closed): connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


@pytest.fixture(scope="module")
def stack(gateway_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Api, list[Process]]]:
    logs = tmp_path_factory.mktemp("visibility")
    with FakeProvider(api_key=RIGHT_KEY) as fake:
        provider = ("  {name}:\n    kind: openai\n    base_url: {url}\n    api_key_env: {key}\n"
                    "    pool: {pool}\n    max_retries: 1\n    connect_timeout: 2\n    timeout: 10\n")
        config = logs / "registry.yaml"
        config.write_text(
            "providers:\n"
            + provider.format(name="refused", url=_refusing_url(), key="GOOD_UPSTREAM_KEY", pool=1)
            + provider.format(name="badkey", url=fake.base_url, key="BAD_UPSTREAM_KEY", pool=8)
            + provider.format(name="good", url=fake.base_url, key="GOOD_UPSTREAM_KEY", pool=8)
            + "models:\n" + "".join(f"  {n}-model:\n    provider: {n}\n    model: fake-model\n"
                                    for n in ("refused", "badkey", "good")))
        env = {**gateway_env, "GATEWAY_CONFIG": str(config), "GOOD_UPSTREAM_KEY": RIGHT_KEY,
               "BAD_UPSTREAM_KEY": WRONG_KEY}
        factory = WorkerFactory(env, logs)
        api = Api(env, logs / "api.log").launch()
        procs = [factory.spawn("refused", "r1"), factory.spawn("refused", "r2"), factory.spawn("badkey", "b"),
                 factory.spawn("good", "g")]
        try:
            for proc in procs:
                WorkerFactory.wait_ready(proc)
            api.wait_ready()
            yield api, procs
        finally:
            api.kill()
            kill_all(procs)


def _call(api: Api, model: str) -> requests.Response:
    return requests.post(f"{api.url}/v1/chat/completions", timeout=30,
                         json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def test_failed_upstream_attempts_are_logged_and_shown_in_health(stack: tuple[Api, list[Process]]) -> None:
    api, procs = stack
    with ThreadPoolExecutor(4) as pool:
        refused = list(pool.map(lambda _: _call(api, "refused-model"), range(4)))
    assert [r.status_code for r in refused] == [502] * 4, [r.text for r in refused]
    assert all(r.json()["error"]["code"] == "upstream_unavailable" for r in refused)
    rejected = _call(api, "badkey-model")
    assert rejected.status_code == 502 and rejected.json()["error"]["code"] == "upstream_auth_failed"
    assert _call(api, "good-model").status_code == 200

    refused_lines = [line for proc in procs[:2] for line in proc.output().splitlines()
                     if "upstream attempt failed: provider=refused model=refused-model" in line]
    assert len(refused_lines) == 8, refused_lines  # 4 calls × (1 try + max_retries 1)
    assert all("provider=refused" in proc.output() for proc in procs[:2])  # both processes made attempts
    assert all("status=unavailable" in line and "cannot reach refused" in line for line in refused_lines)
    assert all("WARNING" in line for line in refused_lines)
    assert any(re.search(r"; retry in \d+\.\d\ds\b", line) for line in refused_lines), refused_lines
    assert any("; giving up" in line for line in refused_lines)
    badkey_lines = [line for line in procs[2].output().splitlines() if "provider=badkey" in line]
    assert len(badkey_lines) == 1 and "status=credentials_rejected" in badkey_lines[0], badkey_lines
    assert "WARNING" in badkey_lines[0] and "giving up" in badkey_lines[0]

    # a success is counted right after its caller's answer (workers/aftercall.py), failures before
    wait_until(lambda: requests.get(f"{api.url}/health", timeout=10).json()["providers"]["good"][
        "attempts"] == 1, 10)
    health = requests.get(f"{api.url}/health", timeout=10)
    assert health.status_code == 200  # a failing upstream is shown per provider, not as the gateway down
    providers = health.json()["providers"]
    assert providers["refused"]["status"] == "failing"
    # counted in Redis by both `refused` workers: all 8 attempts, whichever process made them
    assert providers["refused"]["attempts"] == 8 and providers["refused"]["errors"] == 8
    assert providers["refused"]["error_rate"] == 1.0
    assert providers["refused"]["errors_by_class"] == {"unavailable": 8}
    assert providers["refused"]["last_error"]["status_class"] == "unavailable"
    assert "cannot reach refused" in providers["refused"]["last_error"]["message"]
    assert providers["refused"]["last_error"]["at"].endswith("Z")
    assert providers["badkey"]["status"] == "credentials_rejected"
    assert providers["badkey"]["last_error"]["status_class"] == "credentials_rejected"
    assert providers["good"]["status"] == "ok" and providers["good"]["attempts"] == 1
    assert providers["good"]["errors"] == 0 and providers["good"]["last_error"] is None

    listed = subprocess.run([sys.executable, "-m", "launcher.cli", "providers"], cwd=ROOT, env=api.env,
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert "badkey\topenai\troutable\tupstream credentials_rejected (1 calls, 1 errors in 5 min" in listed
    assert "refused\topenai\troutable\tupstream failing (8 calls, 8 errors" in listed

    logs = [proc.output() for proc in procs] + [Path(api.log).read_text(errors="replace"), health.text]
    logs.append(listed)
    assert not any(WRONG_KEY in text or RIGHT_KEY in text for text in logs)
