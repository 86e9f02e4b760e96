"""Fair share inside one provider's line: one API key's burst does not starve another key."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.integration.conftest import Api, wait_until
from tests.integration.test_auth import cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keyed_api(gateway_env, workers, tmp_path_factory):
    env = {**gateway_env, "GATEWAY_AUTH": "required"}
    server = Api(env, tmp_path_factory.mktemp("fair") / "api.log").start()
    yield server
    server.kill()


def test_a_burst_from_one_key_is_interleaved_with_another_keys_call(keyed_api, gateway_env, fake,
                                                                   start_worker):
    start_worker("fair")  # concurrency 1: strictly one call at a time
    key_a = cli(gateway_env, "keys", "create", "--name", "bursty").strip().splitlines()[-1]
    key_b = cli(gateway_env, "keys", "create", "--name", "polite").strip().splitlines()[-1]

    def call(key: str, content: str) -> int:
        return requests.post(f"{keyed_api.url}/v1/chat/completions",
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": "fair-model",
                                   "messages": [{"role": "user", "content": content}]}).status_code

    with ThreadPoolExecutor(8) as pool:
        burst = [pool.submit(call, key_a, f"sleep:0.4 a{i}") for i in range(6)]
        wait_until(lambda: fake.stats()["in_flight"] == 1, 10)
        # the rest of the burst is in line before the polite key's call arrives
        wait_until(lambda: requests.get(f"{keyed_api.url}/v1/limits",
                                        headers={"Authorization": f"Bearer {key_a}"})
                   .json()["providers"]["fair"]["waiting_in_line"] == 5, 10)
        polite = pool.submit(call, key_b, "b")
        assert polite.result() == 200 and all(f.result() == 200 for f in burst)

    order = [r["body"]["messages"][-1]["content"] for r in fake.requests()]
    # plain FIFO would serve "b" last (7th); fair queueing gives it the next or the one after
    assert order.index("b") <= 2, order
    assert sorted(c for c in order if c != "b") == [f"sleep:0.4 a{i}" for i in range(6)]
    assert fake.stats()["concurrent_max"] == 1
