"""The admin API for keys, over real HTTP: who may call it, key CRUD and pagination, validation, and what
a key's scope does to calls in every protocol — allowed models, expiry, revocation (within a second on
two API processes) and its own limits, enforced by the workers from the job's spec.

The module runs two API processes (auth required, ``GATEWAY_ADMIN_KEY`` set) on one database and
Redis prefix, and the module's two ``llm.fake`` workers (``fake`` has no limits of its own, so a key's
limits are the only ones a call meets there).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from tests.integration.conftest import ROOT, Api, wait_until
from tests.integration.test_auth import cli

pytestmark = pytest.mark.integration

ADMIN_SECRET = "admin-secret-for-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def admin_env(gateway_env):
    return {**gateway_env, "GATEWAY_AUTH": "required", "GATEWAY_ADMIN_KEY": ADMIN_SECRET}


@pytest.fixture(scope="module")
def apis(admin_env, workers, tmp_path_factory):
    logs = tmp_path_factory.mktemp("admin-keys")
    servers = [Api(admin_env, logs / f"api-{n}.log").launch() for n in ("a", "b")]
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.kill()


@pytest.fixture(scope="module")
def api_url(apis) -> str:
    return apis[0].url


def create(url: str, **body: Any) -> dict[str, Any]:
    r = requests.post(f"{url}/admin/keys", json={"name": "k", **body}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


def bearer(key: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['secret']}"}


def chat(url: str, key: dict[str, Any], **body: Any) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", json={**CHAT, **body}, headers=bearer(key), timeout=30)


def said(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_only_admins_may_call_the_admin_api(api_url):
    client, admin = create(api_url, name="client"), create(api_url, name="root", role="admin")
    assert requests.get(f"{api_url}/admin/keys").status_code == 401
    unknown = {"Authorization": "Bearer sk-gw-nope"}
    assert requests.get(f"{api_url}/admin/keys", headers=unknown).status_code == 401
    r = requests.get(f"{api_url}/admin/keys", headers=bearer(client))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert requests.get(f"{api_url}/admin/keys", headers=ADMIN).status_code == 200
    assert requests.get(f"{api_url}/admin/keys", headers=bearer(admin)).status_code == 200
    made = requests.post(f"{api_url}/admin/keys", json={"name": "by-admin-key"}, headers=bearer(admin))
    assert made.status_code == 201
    # the admin key's secret is not an API key: it calls no model
    assert requests.post(f"{api_url}/v1/chat/completions", json=CHAT, headers=ADMIN).status_code == 401


def test_key_crud(api_url, db):
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    key = create(api_url, name="crud", allowed_models=["fake-*"], expires_at=expires.isoformat(),
                 metadata={"owner": "ops", "n": 1}, limits={"rpm": 100}, team="search")
    assert key["secret"].startswith("sk-gw-") and key["prefix"] == key["secret"][:10]
    assert {k: key[k] for k in ("name", "role", "allowed_models", "metadata", "limits", "team")} == {
        "name": "crud", "role": "client", "allowed_models": ["fake-*"], "metadata": {"owner": "ops", "n": 1},
        "limits": {"rpm": 100}, "team": "search"}
    assert datetime.fromisoformat(key["expires_at"]) == expires and key["last_used_at"] is None
    stored = db.execute("SELECT key_hash FROM api_keys WHERE id = %s", (key["id"],)).fetchone()[0]
    assert key["secret"] not in stored and len(stored) == 64

    got = requests.get(f"{api_url}/admin/keys/{key['id']}", headers=ADMIN).json()
    assert "secret" not in got and got == {k: v for k, v in key.items() if k != "secret"}

    r = requests.patch(f"{api_url}/admin/keys/{key['id']}", headers=ADMIN,
                       json={"name": "renamed", "limits": None, "team": None, "expires_at": None,
                             "metadata": {"owner": "dev"}})
    assert r.status_code == 200, r.text
    fields = ("name", "limits", "team", "expires_at", "metadata", "allowed_models")
    assert {k: r.json()[k] for k in fields} == {
        "name": "renamed", "limits": None, "team": None, "expires_at": None, "metadata": {"owner": "dev"},
        "allowed_models": ["fake-*"]}

    r = requests.delete(f"{api_url}/admin/keys/{key['id']}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    again = requests.post(f"{api_url}/admin/keys/{key['id']}/revoke", headers=ADMIN)
    assert again.status_code == 200 and again.json()["revoked_at"] == r.json()["revoked_at"]
    late = requests.patch(f"{api_url}/admin/keys/{key['id']}", json={"name": "x"}, headers=ADMIN)
    assert late.status_code == 409 and late.json()["error"]["code"] == "key_revoked"

    for method in ("get", "patch", "delete"):
        missing = requests.request(method, f"{api_url}/admin/keys/key_missing", json={"name": "x"},
                                   headers=ADMIN)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "key_not_found", method


def test_list_pages_through_every_key_once_in_creation_order(api_url):
    made = [create(api_url, name=f"page-{i}")["id"] for i in range(5)]
    seen, after, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = requests.get(f"{api_url}/admin/keys", params=params, headers=ADMIN).json()
        pages += 1
        assert len(page["data"]) <= 2 and all("secret" not in k for k in page["data"])
        seen += [k["id"] for k in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        after = page["next_cursor"]
    assert len(seen) == len(set(seen)) and seen[-5:] == made and pages == (len(seen) + 1) // 2
    bad = requests.get(f"{api_url}/admin/keys", params={"limit": 0}, headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    bad = requests.get(f"{api_url}/admin/keys", params={"after": "key_nope"}, headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"


@pytest.mark.parametrize(("body", "field"), [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x", "role": "root"}, "role"),
    ({"name": "x", "limits": {"rpm": -1}}, "limits.rpm"),
    ({"name": "x", "limits": {"rps": 5}}, "limits.rps"),
    ({"name": "x", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ({"name": "x", "expires_at": "2999-01-01T00:00:00"}, "expires_at"),
    ({"name": "x", "metadata": {"blob": "x" * 5000}}, "metadata"),
    ({"name": "x", "metadata": [1]}, "metadata"),
    ({"name": "x", "allowed_models": ["bad model"]}, "allowed_models"),
    ({"name": "x", "budget": []}, "budget"),   # budgets (plural) is a field
], ids=["no-name", "empty-name", "role", "negative-limit", "unknown-limit", "past-expiry", "naive-expiry",
        "metadata-too-big", "metadata-not-object", "model-pattern", "unknown-field"])
def test_a_bad_body_gets_400_naming_its_field(api_url, body, field):
    r = requests.post(f"{api_url}/admin/keys", json=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field.split(".")[0] in r.json()["error"]["message"]


def test_a_key_scoped_to_models_gets_403_on_others_in_each_protocols_shape(api_url):
    key = create(api_url, name="scoped", allowed_models=["fake*"])
    assert chat(api_url, key).status_code == 200
    h = bearer(key)
    msgs = [{"role": "user", "content": "hi"}]
    openai = chat(api_url, key, model="stalled-model")
    assert openai.status_code == 403 and openai.json()["error"]["code"] == "model_not_allowed"
    anthropic = requests.post(f"{api_url}/v1/messages", headers=h,
                              json={"model": "stalled-model", "max_tokens": 5, "messages": msgs})
    assert anthropic.status_code == 403
    assert anthropic.json()["type"] == "error" and anthropic.json()["error"]["type"] == "permission_error"
    ollama = requests.post(f"{api_url}/api/chat", headers=h,
                           json={"model": "stalled-model", "messages": msgs})
    assert ollama.status_code == 403 and "stalled-model" in ollama.json()["error"]
    gemini = requests.post(f"{api_url}/v1beta/models/stalled-model:generateContent", headers=h,
                           json={"contents": [{"parts": [{"text": "hi"}]}]})
    assert gemini.status_code == 403 and gemini.json()["error"]["status"] == "PERMISSION_DENIED"
    job = requests.post(f"{api_url}/v1/jobs", headers=h, json={**CHAT, "model": "stalled-model"})
    assert job.status_code == 403 and job.json()["error"]["type"] == "permission_error"
    # listings show only what the key may use
    openai_list = requests.get(f"{api_url}/v1/models", headers=h).json()["data"]
    assert [m["id"] for m in openai_list] == ["fake-model"]
    ollama_list = requests.get(f"{api_url}/api/tags", headers=h).json()["models"]
    assert [m["name"] for m in ollama_list] == ["fake-model"]
    gemini_list = requests.get(f"{api_url}/v1beta/models", headers={"x-goog-api-key": key["secret"]}).json()
    assert [m["name"] for m in gemini_list["models"]] == ["models/fake-model"]
    unscoped = create(api_url, name="unscoped")
    assert len(requests.get(f"{api_url}/v1/models", headers=bearer(unscoped)).json()["data"]) > 1


def test_an_expired_key_gets_401_saying_so_and_use_is_recorded(api_url, db):
    key = create(api_url, name="expiring", expires_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
    assert chat(api_url, key).status_code == 200
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    assert requests.patch(f"{api_url}/admin/keys/{key['id']}", json={"expires_at": past},
                          headers=ADMIN).status_code == 200
    wait_until(lambda: chat(api_url, key).status_code == 401, 2)
    r = chat(api_url, key)
    assert r.json()["error"]["code"] == "key_expired" and "expired" in r.json()["error"]["message"]
    # last_used_at is written in batches (every few seconds), not per request
    wait_until(lambda: db.execute("SELECT last_used_at FROM api_keys WHERE id = %s",
                                  (key["id"],)).fetchone()[0] is not None, 15, interval=0.25)


def test_revoke_takes_effect_within_a_second_on_every_api_process(apis):
    key = create(apis[0].url, name="revoked")
    for api in apis:  # each process has the key in its cache
        assert chat(api.url, key).status_code == 200
    assert requests.delete(f"{apis[1].url}/admin/keys/{key['id']}", headers=ADMIN).status_code == 200
    revoked_at = time.monotonic()
    refused_after = []
    for api in apis:
        wait_until(lambda url=api.url: chat(url, key).status_code == 401, 3, interval=0.02)
        refused_after.append(time.monotonic() - revoked_at)
    assert max(refused_after) < 1.0, refused_after
    assert chat(apis[0].url, key).json()["error"]["code"] == "key_revoked"


def test_a_keys_own_limits_set_by_the_admin_api_are_held_by_the_workers(apis, fake):
    key = create(apis[0].url, name="one-at-a-time", limits={"concurrency": 1})
    with ThreadPoolExecutor(4) as pool:
        # two API processes, two workers: the key's concurrency holds across all of them
        calls = [pool.submit(chat, apis[i % 2].url, key, messages=said(f"sleep:0.5 {i}")) for i in range(4)]
        assert [c.result().status_code for c in calls] == [200] * 4
    assert fake.stats()["concurrent_max"] == 1
    limits = requests.get(f"{apis[1].url}/v1/limits", headers=bearer(key)).json()["api_key"]
    assert limits["id"] == key["id"] and limits["limits"] == {"concurrency": 1}

    # raised to 3: the next calls run side by side, no restart
    r = requests.patch(f"{apis[0].url}/admin/keys/{key['id']}", json={"limits": {"concurrency": 3}},
                       headers=ADMIN)
    assert r.status_code == 200
    time.sleep(1.0)  # the change reaches every API process within a second (tested above)
    fake.reset()
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(chat, apis[i % 2].url, key, messages=said(f"sleep:0.5 b{i}")) for i in range(3)]
        assert [c.result().status_code for c in calls] == [200] * 3
    assert fake.stats()["concurrent_max"] > 1


def test_the_cli_manages_the_same_keys(apis, admin_env):
    url = apis[0].url
    out = cli(admin_env, "keys", "create", "--name", "from-cli", "--role", "admin", "--models", "fake*,x-?",
              "--expires", "30d", "--team", "infra", "--limits", "concurrency=2,rpm=60",
              "--metadata", '{"ticket": 7}')
    key_id, secret = out.split()[2], out.strip().splitlines()[-1]
    seen = requests.get(f"{url}/admin/keys/{key_id}", headers=ADMIN).json()
    assert {k: seen[k] for k in ("name", "role", "allowed_models", "team", "limits", "metadata")} == {
        "name": "from-cli", "role": "admin", "allowed_models": ["fake*", "x-?"], "team": "infra",
        "limits": {"concurrency": 2, "rpm": 60}, "metadata": {"ticket": 7}}
    expires = datetime.fromisoformat(seen["expires_at"])
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)
    # an admin-role key made by the CLI opens the admin API
    assert requests.get(f"{url}/admin/keys", headers={"Authorization": f"Bearer {secret}"}).status_code == 200

    updated = json.loads(cli(admin_env, "keys", "update", key_id, "--models", "all", "--limits", "default",
                             "--team", "none", "--expires", "never", "--role", "client"))
    assert [updated[k] for k in ("allowed_models", "limits", "team", "expires_at", "role")] == [None] * 4 + [
        "client"]
    assert json.loads(cli(admin_env, "keys", "get", key_id))["role"] == "client"
    assert key_id in cli(admin_env, "keys", "list")
    # the change reached the API: the key lost its admin role
    wait_until(lambda: requests.get(f"{url}/admin/keys",
                                    headers={"Authorization": f"Bearer {secret}"}).status_code == 403, 1.5)

    bad = subprocess.run([sys.executable, "-m", "launcher.cli", "keys", "create", "--name", "x", "--limits",
                          "rpm=-1"], cwd=ROOT, env=admin_env, capture_output=True, text=True)
    assert bad.returncode == 2 and "limits.rpm" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "launcher.cli", "keys", "get", "key_nope"], cwd=ROOT,
                             env=admin_env, capture_output=True, text=True)
    assert missing.returncode == 2 and "no API key" in missing.stderr

    assert "revoked" in cli(admin_env, "keys", "revoke", key_id)
    assert requests.get(f"{url}/admin/keys/{key_id}", headers=ADMIN).json()["revoked_at"] is not None


def test_a_revoked_keys_queued_jobs_never_run(apis, start_worker, fake, db):
    """Jobs accepted before the revoke, still queued (``stalled`` has no worker yet): when a worker
    takes them they fail ``key_revoked`` without an upstream call."""
    key = create(apis[0].url, name="leaked")
    body = {**CHAT, "model": "stalled-model", "messages": said("queued before the revoke")}
    jobs = [requests.post(f"{apis[i % 2].url}/v1/jobs", json=body, headers=bearer(key)).json()["id"]
            for i in range(3)]
    assert requests.delete(f"{apis[0].url}/admin/keys/{key['id']}", headers=ADMIN).status_code == 200
    start_worker("stalled")

    def settled() -> list[tuple[str, Any]]:
        rows = db.execute("SELECT status, error FROM jobs WHERE id = ANY(%s)", (jobs,)).fetchall()
        return [(status, error) for status, error in rows if status not in ("queued", "running")]
    wait_until(lambda: len(settled()) == 3, 30)
    assert {(status, (error or {}).get("code")) for status, error in settled()} == {("failed", "key_revoked")}
    assert "queued before the revoke" not in fake.stats()["by_content"]
