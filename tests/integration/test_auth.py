"""API keys: created by the CLI, stored hashed, required by an API running with GATEWAY_AUTH=required."""

from __future__ import annotations

import subprocess
import sys
import time

import openai
import pytest
import requests

from api.auth import CACHE_SECONDS
from tests.integration.conftest import ROOT, Api, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secured_api(gateway_env, workers, tmp_path_factory):
    env = {**gateway_env, "GATEWAY_AUTH": "required"}
    server = Api(env, tmp_path_factory.mktemp("secured") / "api.log").start()
    yield server
    server.kill()


def cli(env, *args) -> str:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True).stdout


def test_keys_are_required_hashed_and_revocable(secured_api, gateway_env, db):
    out = cli(gateway_env, "keys", "create", "--name", "ci")
    key_id, secret = out.split()[2], out.strip().splitlines()[-1]
    assert secret.startswith("sk-gw-")
    stored = db.execute("SELECT key_hash FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0]
    assert secret not in stored and len(stored) == 64

    body = {"model": "fake-model", "messages": [{"role": "user", "content": "who am i"}]}
    r = requests.post(f"{secured_api.url}/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    sdk = openai.OpenAI(base_url=f"{secured_api.url}/v1", api_key=secret, max_retries=0)
    reply = sdk.chat.completions.with_raw_response.create(**body)
    job_id = reply.headers["x-gateway-job-id"]
    assert reply.parse().choices[0].message.content == "echo: who am i"
    assert requests.get(f"{secured_api.url}/health").status_code == 200  # health stays public

    # the key's jobs are its own
    job = requests.post(f"{secured_api.url}/v1/jobs", json=body, headers={"x-api-key": secret}).json()
    other_out = cli(gateway_env, "keys", "create", "--name", "other")
    other = other_out.strip().splitlines()[-1]
    job_url = f"{secured_api.url}/v1/jobs/{job['id']}"
    assert requests.get(job_url, headers={"x-api-key": other}).status_code == 404
    assert requests.get(job_url, headers={"x-api-key": secret}).status_code == 200

    # the sync call was billed to the key that made it
    wait_until(lambda: db.execute("SELECT api_key_id FROM usage WHERE job_id = %s", (job_id,)).fetchall(), 10)
    assert db.execute("SELECT api_key_id FROM usage WHERE job_id = %s", (job_id,)).fetchall() == [(key_id,)]

    assert "revoked" in cli(gateway_env, "keys", "revoke", key_id)
    revoked_at = time.monotonic()
    assert key_id in cli(gateway_env, "keys", "list")

    def refused() -> bool:
        return requests.post(f"{secured_api.url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    wait_until(refused, CACHE_SECONDS + 5, interval=0.5)  # the API caches active keys this long
    assert time.monotonic() - revoked_at < CACHE_SECONDS + 2
    with pytest.raises(openai.AuthenticationError):
        sdk.chat.completions.create(**body)
